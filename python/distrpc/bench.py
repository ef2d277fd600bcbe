"""``python -m distrpc.bench --impl distrpc|torch|both``: the RPC workloads of ``distrpc
bench`` from Python, on distrpc.rpc or on torch.distributed.rpc, two processes on this machine.
One JSON line per workload; run both implementations in the same run and compare ratios (the
machine is shared and noisy).

Workloads: ``latency`` (no-op ``rpc_sync`` p50/p90/p99), ``echo`` (a small tensor there and
back), ``remote`` (``remote`` of a small tensor + ``to_here``), ``async`` (no-op
``rpc_async`` with 1/16/128 in flight, calls/s), ``bandwidth`` (a float32 tensor of 4 KiB /
1 / 16 / 128 MiB to a function returning its length, GB/s), ``init`` and ``shutdown`` of the
two processes (ms), ``scale`` (init and shutdown of 8 processes after their imports, the
slowest rank's, ms) and ``rss`` (a numpy-only distrpc worker's resident memory after init,
MiB). With both implementations, their two pairs of processes are up at once and take the
two-process workloads in alternating blocks, the idle pair stopped (SIGSTOP: torch's idle
processes busy-poll a core each). With ``--rust BINARY`` (``scripts/bench-py`` passes the
release ``distrpc`` binary), the Rust front's own ``distrpc bench latency``, ``remote`` and
``bandwidth`` (16 and 128 MiB, one size per block) run in the same blocks, every pair stopped,
and a last line gives the Python no-op over the Rust one, each front's ``remote`` +
``to_here`` over its own no-op, and the Python bandwidth over the Rust one at each size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
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


def _timed(n: int, call) -> list[float]:
    """``n`` timed calls of ``call`` after ``n // 10`` untimed ones."""
    for _ in range(max(1, n // 10)):
        call()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    return samples


def _latency(rpc, torch, n: int) -> list[float]:
    return _timed(n, lambda: rpc.rpc_sync("worker1", _noop))


def _echo_small(rpc, torch, n: int) -> list[float]:
    small = torch.ones(4)
    return _timed(n, lambda: rpc.rpc_sync("worker1", _echo, args=(small,)))


def _remote(rpc, torch, n: int) -> list[float]:
    small = torch.ones(4)
    return _timed(n, lambda: rpc.remote("worker1", _echo, args=(small,)).to_here())


def _async(rpc, torch, window: int, total: int) -> tuple[int, float]:
    def burst() -> None:
        for f in [rpc.rpc_async("worker1", _noop) for _ in range(window)]:
            f.wait()

    burst()
    t = time.perf_counter()
    done = 0
    while done < total:
        burst()
        done += window
    return done, time.perf_counter() - t


def _bandwidth(rpc, torch, size: int, rounds: int) -> tuple[int, float]:
    tensor = torch.ones(size // 4, dtype=torch.float32)
    for _ in range(3):  # warms both sides' allocators
        rpc.rpc_sync("worker1", _length, args=(tensor,))
    t = time.perf_counter()
    for _ in range(rounds):
        rpc.rpc_sync("worker1", _length, args=(tensor,))
    return size * rounds, time.perf_counter() - t


_WORKLOADS = {
    "latency": _latency,
    "echo": _echo_small,
    "remote": _remote,
    "async": _async,
    "bandwidth": _bandwidth,
}


def _pair(rank: int, impl: str, store: str, ready, commands, results) -> None:
    """One of the two processes of ``impl``: rank 0 runs the workloads ``commands`` names,
    one block at a time, and puts what it measured in ``results``."""
    import torch  # both implementations move torch tensors

    rpc = importlib.import_module(impl)
    ready.wait(timeout=300)  # init is timed from here: not the other process's imports
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"file://{store}", rpc_timeout=60)
    started = time.perf_counter()
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    init_ms = (time.perf_counter() - started) * 1e3
    if rank == 0:
        results.put(init_ms)
        while (command := commands.get()) is not None:
            name, *args = command
            results.put(_WORKLOADS[name](rpc, torch, *args))
    started = time.perf_counter()
    rpc.shutdown()
    if rank == 0:
        results.put((time.perf_counter() - started) * 1e3)


def _plan(calls: int, quick: bool) -> list[tuple]:
    """The workloads, each as ``(name, *args)`` for the whole run, its count last."""
    sizes = [4 << 10, 1 << 20, 16 << 20] + ([] if quick else [128 << 20])
    plan: list[tuple] = [("latency", calls), ("echo", calls), ("remote", calls)]
    plan += [("async", w, calls * (2 if w > 1 else 1)) for w in (1, 16, 128)]
    # About 1 GiB per size: a short run is mostly the first calls' page faults and noise.
    plan += [("bandwidth", n, 3 if quick else max(8, min(2000, (1 << 30) // n))) for n in sizes]
    return plan


#: The workloads the Rust front's own benchmark (``distrpc bench``) measures alike, and the
#: tensor sizes its ``bandwidth`` runs at in the same blocks (issue 9's targets are at these).
RUST_WORKLOADS = ("latency", "remote", "bandwidth")
RUST_SIZES = (16 << 20, 128 << 20)


def _rust_block(binary: str, name: str, args: tuple) -> float:
    """The Rust front's own processes on the same workload: ``binary bench name``'s p50
    (µs), or its GB/s for the one tensor size ``args[0]`` of ``bandwidth``."""
    if name == "bandwidth":
        more, field = ["--bytes", str(args[0])], "gb_per_s"
    else:
        more, field = ["--calls", str(args[-1])], "p50_us"
    out = subprocess.run(
        [binary, "bench", name, *more],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    (line,) = (json.loads(raw) for raw in out.splitlines() if raw.startswith("{"))
    return line[field]


def run_pairs(
    impls: list[str], calls: int, quick: bool, rust: str | None = None
) -> dict[str, list[dict]]:
    """Every two-process workload on each of ``impls``: their pairs of processes are up at
    once and take the workloads in alternating blocks (A B B A ...), so that a slow minute of
    this shared machine falls on both alike; the pair not measuring is stopped. With ``rust``
    (the ``distrpc`` binary), its own ``latency``, ``remote`` and ``bandwidth`` at 16 and
    128 MiB run in the same blocks, every pair stopped: ``rust`` lines of their p50s and GB/s
    (the median over blocks)."""
    ctx = mp.get_context("spawn")
    pairs: dict = {}
    lines: dict[str, list[dict]] = {}
    for impl in impls:
        module = {"distrpc": "distrpc.rpc", "torch": "torch.distributed.rpc"}[impl]
        store = os.path.join(tempfile.mkdtemp(prefix="distrpc-bench-"), "store")
        ready, commands, results = ctx.Barrier(2), ctx.Queue(), ctx.Queue()
        procs = [
            ctx.Process(target=_pair, args=(r, module, store, ready, commands, results))
            for r in (0, 1)
        ]
        for p in procs:
            p.start()
        # (The barrier is kept too: a child unpickling it after it is collected fails.)
        pairs[impl] = (procs, commands, results, ready)
        # Up one after the other: each pair's init is timed alone.
        _only_running(pairs, impl)
        init_ms = results.get(timeout=600)
        lines.setdefault(impl, []).append({"workload": "init", "ms": round(init_ms, 1)})
    blocks = 1 if quick else 4
    for name, *args in _plan(calls, quick):
        # Each block does its share of the run's count (the last argument).
        share = (*args[:-1], max(1, args[-1] // blocks))
        got: dict[str, list] = {impl: [] for impl in impls}
        rust_blocks = []
        with_rust = rust is not None and name in RUST_WORKLOADS
        if name == "bandwidth" and args[0] not in RUST_SIZES:
            with_rust = False
        for block in range(blocks):
            for impl in impls if block % 2 == 0 else impls[::-1]:
                _only_running(pairs, impl)
                _, commands, results, _ = pairs[impl]
                commands.put((name, *share))
                got[impl].append(results.get(timeout=900))
            if with_rust:
                _only_running(pairs, "")  # every pair stopped
                rust_blocks.append(_rust_block(rust, name, share))
        for impl in impls:
            lines[impl].append(_summary(name, args, got[impl]))
        if rust_blocks:
            median = sorted(rust_blocks)[len(rust_blocks) // 2]
            line = {"workload": name, "p50_us": median}
            if name == "bandwidth":
                line = {"workload": name, "bytes": args[0], "gb_per_s": median}
            lines.setdefault("rust", []).append(line)
    _only_running(pairs, None)
    for impl, (procs, commands, results, _) in pairs.items():
        commands.put(None)
        lines[impl].append({"workload": "shutdown", "ms": round(results.get(timeout=600), 1)})
        for p in procs:
            p.join(60)
    for impl, impl_lines in lines.items():
        for line in impl_lines:
            line["impl"] = impl
    return lines


def _only_running(pairs: dict, running: str | None) -> None:
    """Stops (SIGSTOP) every pair but ``running``'s and continues that one (all, for
    ``None``): an idle torch process busy-polls a core, which would be taken from the pair
    being measured on a small machine."""
    for impl, (procs, *_) in pairs.items():
        go = running is None or impl == running
        for p in procs:
            os.kill(p.pid, signal.SIGCONT if go else signal.SIGSTOP)


def _summary(name: str, args: list, blocks: list) -> dict:
    """One JSON line of a workload, from its blocks' measurements."""
    if name in ("latency", "echo", "remote"):
        samples = [s for block in blocks for s in block]
        return {"workload": name, "calls": len(samples), **_percentiles(samples)}
    done = sum(b[0] for b in blocks)
    seconds = sum(b[1] for b in blocks)
    if name == "async":
        return {"workload": name, "window": args[0], "calls_per_s": round(done / seconds)}
    return {"workload": name, "bytes": args[0], "gb_per_s": round(done / seconds / 1e9, 3)}


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


def _against_rust(python: list[dict], rust: list[dict]) -> dict:
    """The Python front's no-op against the Rust front's, each front's ``remote`` +
    ``to_here`` against its own no-op (p50s of the same blocks), and the Python front's
    bandwidth against the Rust front's at each size both ran."""
    py = {line["workload"]: line["p50_us"] for line in python if "p50_us" in line}
    rs = {line["workload"]: line["p50_us"] for line in rust if "p50_us" in line}
    py_gbps = {line["bytes"]: line["gb_per_s"] for line in python if "gb_per_s" in line}
    rs_gbps = {line["bytes"]: line["gb_per_s"] for line in rust if "gb_per_s" in line}
    return {
        "workload": "latency",
        "field": "p50_us",
        "python_over_rust": round(py["latency"] / rs["latency"], 3),
        "remote_over_latency": {
            "python": round(py["remote"] / py["latency"], 3),
            "rust": round(rs["remote"] / rs["latency"], 3),
        },
        "bandwidth_over_rust": {
            str(n): round(py_gbps[n] / gbps, 3) for n, gbps in rs_gbps.items() if n in py_gbps
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, runs, prints one JSON line per workload (and ratios with
    ``--impl both``)."""
    parser = argparse.ArgumentParser(prog="python -m distrpc.bench", description=__doc__)
    parser.add_argument("--impl", choices=["distrpc", "torch", "both"], default="both")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument(
        "--rust",
        metavar="BINARY",
        help="the distrpc binary: its own latency and remote run in the same blocks, and the "
        "Python no-op and remote are given against them",
    )
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
    every = run_pairs(impls, calls, opts.quick, opts.rust)
    for impl in impls:
        every[impl].append(scale(impl, 2 if opts.quick else 8))
    if "distrpc" in every:
        every["distrpc"].append(rss())
    for lines in every.values():
        for line in lines:
            print(json.dumps(line), flush=True)
    if "rust" in every and "distrpc" in every:
        print(json.dumps(_against_rust(every["distrpc"], every["rust"])))
    if "torch" in every and "distrpc" in every:
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
