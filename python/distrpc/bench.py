"""``python -m distrpc.bench --impl distrpc|torch|both``: the RPC workloads of ``distrpc
bench`` from Python, on distrpc.rpc or on torch.distributed.rpc, two processes on this machine.
One JSON line per workload; run both implementations in the same run and compare ratios (the
machine is shared and noisy).

Workloads: ``latency`` (no-op ``rpc_sync`` p50/p90/p99), ``echo`` (a small tensor there and
back), ``async`` (no-op ``rpc_async`` with 1/16/128 in flight,
calls/s), ``bandwidth`` (a float32 tensor of 4 KiB / 1 / 16 / 128 MiB to a function returning
its length, GB/s), ``init`` and ``shutdown`` of the two processes (ms), ``scale`` (init and
shutdown of 8 processes after their imports, the slowest rank's, ms) and ``rss`` (a numpy-only
distrpc worker's resident memory after init, MiB).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time


def _noop() -> None:
    return None


def _echo(x):
    return x


def _length(t) -> int:
    return len(t)


def _percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)

    def at(q: float) -> float:
        return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6, 1)

    return {"p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99)}


def _run(rank: int, impl: str, store: str, calls: int, quick: bool, out, ready) -> None:
    import torch  # both implementations move torch tensors

    rpc = importlib.import_module(impl)
    ready.wait(timeout=300)  # init is timed from here: not the other process's imports
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"file://{store}", rpc_timeout=60)
    started = time.perf_counter()
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    init_ms = (time.perf_counter() - started) * 1e3
    lines = []
    if rank == 0:
        lines.append({"workload": "init", "ms": round(init_ms, 1)})
        for _ in range(calls // 10):  # warm up
            rpc.rpc_sync("worker1", _noop)
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            rpc.rpc_sync("worker1", _noop)
            samples.append(time.perf_counter() - t)
        lines.append({"workload": "latency", "calls": calls, **_percentiles(samples)})
        small = torch.ones(4)
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            rpc.rpc_sync("worker1", _echo, args=(small,))
            samples.append(time.perf_counter() - t)
        lines.append({"workload": "echo", "calls": calls, **_percentiles(samples)})
        for window in (1, 16, 128):
            total = calls * (2 if window > 1 else 1)
            t = time.perf_counter()
            done = 0
            while done < total:
                futs = [rpc.rpc_async("worker1", _noop) for _ in range(window)]
                for f in futs:
                    f.wait()
                done += window
            rate = done / (time.perf_counter() - t)
            lines.append({"workload": "async", "window": window, "calls_per_s": round(rate)})
        sizes = [4 << 10, 1 << 20, 16 << 20] + ([] if quick else [128 << 20])
        for size in sizes:
            t_ = torch.ones(size // 4, dtype=torch.float32)
            # About 1 GiB per size (a short run is mostly the first calls' page faults and
            # the scheduler's noise), after a few calls that warm both sides' allocators.
            rounds = max(8, min(2000, (1 << 30) // size)) if not quick else 3
            for _ in range(3):
                rpc.rpc_sync("worker1", _length, args=(t_,))
            t = time.perf_counter()
            for _ in range(rounds):
                rpc.rpc_sync("worker1", _length, args=(t_,))
            gbs = size * rounds / (time.perf_counter() - t) / 1e9
            lines.append({"workload": "bandwidth", "bytes": size, "gb_per_s": round(gbs, 3)})
    started = time.perf_counter()
    rpc.shutdown()
    if rank == 0:
        lines.append(
            {"workload": "shutdown", "ms": round((time.perf_counter() - started) * 1e3, 1)}
        )
    out.put(lines)


def _scale(rank: int, impl: str, store: str, world: int, out, ready) -> None:
    """One of ``world`` processes: how long its ``init_rpc`` and ``shutdown`` take (after
    the imports)."""
    rpc = importlib.import_module(impl)
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"file://{store}", rpc_timeout=120)
    ready.wait(timeout=300)  # every rank has imported: init is timed from here
    started = time.perf_counter()
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world, rpc_backend_options=options)
    init_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    rpc.shutdown()
    out.put((init_ms, (time.perf_counter() - started) * 1e3))


def _rss(store: str, out) -> None:
    """A numpy-only worker's resident memory after init (torch is not imported)."""
    import numpy  # noqa: F401 - a numpy-only worker has numpy loaded

    import distrpc.rpc as rpc

    options = rpc.TensorPipeRpcBackendOptions(init_method=f"file://{store}")
    rpc.init_rpc("worker0", rank=0, world_size=1, rpc_backend_options=options)
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    rpc.shutdown()
    out.put(round(kib / 1024, 1))


def scale(impl: str, world: int) -> dict:
    """Init and shutdown of ``world`` processes (the slowest rank's)."""
    module = {"distrpc": "distrpc.rpc", "torch": "torch.distributed.rpc"}[impl]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="distrpc-bench-"), "store")
    ready = ctx.Barrier(world)
    procs = [
        ctx.Process(target=_scale, args=(r, module, store, world, out, ready)) for r in range(world)
    ]
    for p in procs:
        p.start()
    times = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    init_ms, shutdown_ms = (max(t[i] for t in times) for i in (0, 1))
    return {
        "workload": "scale",
        "workers": world,
        "init_ms": round(init_ms, 1),
        "shutdown_ms": round(shutdown_ms, 1),
        "impl": impl,
    }


def rss() -> dict:
    """A numpy-only distrpc worker's RSS after init, in MiB."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="distrpc-bench-"), "store")
    p = ctx.Process(target=_rss, args=(store, out))
    p.start()
    mib = out.get(timeout=120)
    p.join(60)
    return {"workload": "rss", "numpy_only_mib": mib, "impl": "distrpc"}


def run(impl: str, calls: int, quick: bool) -> list[dict]:
    """Runs every workload on ``impl`` (``distrpc`` or ``torch``); returns the JSON lines."""
    module = {"distrpc": "distrpc.rpc", "torch": "torch.distributed.rpc"}[impl]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="distrpc-bench-"), "store")
    ready = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_run, args=(r, module, store, calls, quick, out, ready)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    lines = next(r for r in results if r)
    for line in lines:
        line["impl"] = impl
    lines.append(scale(impl, 2 if quick else 8))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, runs, prints one JSON line per workload (and ratios with
    ``--impl both``)."""
    parser = argparse.ArgumentParser(prog="python -m distrpc.bench", description=__doc__)
    parser.add_argument("--impl", choices=["distrpc", "torch", "both"], default="both")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    opts = parser.parse_args(argv)
    from ._core import DEBUG_BUILD

    if DEBUG_BUILD and not opts.quick:
        # Not a measurement of distrpc: a debug extension is about twice as slow per call.
        print(
            "warning: distrpc._core is a debug build; build it with `maturin develop --release`"
            " (scripts/bench-py does) before measuring",
            file=sys.stderr,
        )
    calls = 100 if opts.quick else opts.calls
    impls = ["distrpc", "torch"] if opts.impl == "both" else [opts.impl]
    every = {impl: run(impl, calls, opts.quick) for impl in impls}
    if "distrpc" in every:
        every["distrpc"].append(rss())
    for lines in every.values():
        for line in lines:
            print(json.dumps(line), flush=True)
    if len(every) == 2:
        key = ("workload", "window", "bytes", "workers")
        torch_by_key = {tuple(line.get(k) for k in key): line for line in every["torch"]}
        for line in every["distrpc"]:
            other = torch_by_key.get(tuple(line.get(k) for k in key))
            for field in ("p50_us", "calls_per_s", "gb_per_s", "ms", "init_ms", "shutdown_ms"):
                if other and field in line and other.get(field):
                    ratio = round(line[field] / other[field], 3)
                    name = {k: line[k] for k in key if k in line}
                    print(json.dumps({**name, "field": field, "distrpc_over_torch": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
