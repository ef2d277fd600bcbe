"""``python -m distrpc.bench_train --impl distrpc|torch|raw|both``: model-parallel training
steps with distributed autograd and ``DistributedOptimizer``, on distrpc or on torch, timed in
the same run (groups up at once, measuring in alternating blocks, the idle groups stopped) —
and the ``rnn`` and ``mlp`` steps over raw sockets (:mod:`distrpc.bench_raw`: the floor of any
Python front on the machine), ``both`` running all three.

Workloads (one JSON line each, step time p50/p90 in ms):

- ``rnn``: torch's RNN tutorial (``examples/distributed/rpc/rnn``) on two workers: the
  embedding table and the decoder live on the parameter server (worker1), used through
  ``rpc_sync`` of their ``forward``; the LSTM is on the trainer (worker0). Tutorial-sized
  model (10 tokens, 2 inputs, 3 hidden, 4 layers), a batch of 5 sequences of 20.
- ``mlp``: an MLP of four stages of ``Linear(256, 256) + ReLU``, one per worker (the first on
  the trainer, the others behind ``remote`` references, used through ``rpc_sync`` proxies),
  batch 32, SGD.
- ``phases``: the MLP's step cut into forward, backward and ``DistributedOptimizer.step``
  (medians in ms).
- ``rnn_local``, ``mlp_local``: the same models and steps in one process (the trainer's),
  with torch's own autograd and optimizer: the floor no split of the model can go below, as
  each step's work is a chain (every stage waits for the one before), measured in the same
  run as the distributed steps.
- ``noop``: a no-op ``rpc_sync`` outside any context, and the same inside one (what a context
  costs a call that carries no tensor; p50 in µs).
- ``cold``: how long the callee's first ``Linear(256, 256) + ReLU`` forward (batch 32) takes
  when the call comes right after the last one, 1 ms after, and 10 ms after — and its next
  three, in a row (medians in µs): what a worker idle for the rest of a step pays for its
  first kernel (a halted vCPU's caches and clocks), whatever carries the call.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback

from . import bench_models, bench_raw
from .bench import _only_running, _percentiles, _timed

IMPLS = {
    "distrpc": ("distrpc.rpc", "distrpc.autograd", "distrpc.optim"),
    "torch": ("torch.distributed.rpc", "torch.distributed.autograd", "torch.distributed.optim"),
}


def _modules(impl: str) -> list:
    return [importlib.import_module(name) for name in IMPLS[impl]]


def _noop() -> None:
    return None


def _call_method(method: str, rref, *args):
    return getattr(rref.local_value(), method)(*args)


def _remote_method(rpc, method: str, rref, *args):
    """The tutorial's ``_remote_method``: ``method`` of the referenced module, on its owner."""
    return rpc.rpc_sync(rref.owner(), _call_method, args=[method, rref, *args])


def _param_rrefs(impl: str, module_rref) -> list:
    rpc = _modules(impl)[0]
    return [rpc.RRef(p) for p in module_rref.local_value().parameters()]


def _rnn(impl: str, steps: int) -> list[float]:
    import torch

    rpc, dist_autograd, dist_optim = _modules(impl)
    ntoken, ninp, nhid, *_ = bench_models.RNN_SIZES
    torch.manual_seed(0)
    emb = rpc.remote("worker1", bench_models.embedding_table, args=(ntoken, ninp, 0.5))
    dec = rpc.remote("worker1", bench_models.decoder, args=(ntoken, nhid, 0.5))
    lstm, criterion, hidden = bench_models.lstm_trainer()
    params = (
        rpc.rpc_sync("worker1", _param_rrefs, args=(impl, emb))
        + [rpc.RRef(p) for p in lstm.parameters()]
        + rpc.rpc_sync("worker1", _param_rrefs, args=(impl, dec))
    )
    opt = dist_optim.DistributedOptimizer(torch.optim.SGD, params, lr=0.05)

    def step() -> None:
        data, target = bench_models.rnn_batch()
        with dist_autograd.context() as context_id:
            h = tuple(t.detach() for t in hidden)
            embedded = _remote_method(rpc, "forward", emb, data)
            output, _ = lstm(embedded, h)
            decoded = _remote_method(rpc, "forward", dec, output)
            loss = criterion(decoded.view(-1, ntoken), target)
            dist_autograd.backward(context_id, [loss])
            opt.step(context_id)

    return _timed(steps, step)


def _rnn_local(impl: str, steps: int) -> list[float]:
    """The ``rnn`` step in this process alone: the same model, torch's autograd."""
    import torch

    ntoken, ninp, nhid, *_ = bench_models.RNN_SIZES
    torch.manual_seed(0)
    emb, dec = (
        bench_models.embedding_table(ntoken, ninp, 0.5),
        bench_models.decoder(ntoken, nhid, 0.5),
    )
    lstm, criterion, hidden = bench_models.lstm_trainer()
    params = [*emb.parameters(), *lstm.parameters(), *dec.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)

    def step() -> None:
        data, target = bench_models.rnn_batch()
        opt.zero_grad()
        output, _ = lstm(emb(data), hidden)
        loss = criterion(dec(output).view(-1, ntoken), target)
        loss.backward()
        opt.step()

    return _timed(steps, step)


def _mlp(impl: str, steps: int, phases: dict | None = None) -> list[float]:
    """The MLP's step times; with ``phases``, each step's forward, backward and optimizer
    times appended to its lists too."""
    import torch

    rpc, dist_autograd, dist_optim = _modules(impl)
    width, batch = bench_models.MLP_SIZES
    first = bench_models.stage(width, 0)
    stages = [rpc.remote(f"worker{r}", bench_models.stage, args=(width, r)) for r in (1, 2, 3)]
    params = [rpc.RRef(p) for p in first.parameters()]
    for r, stage in zip((1, 2, 3), stages):
        params += rpc.rpc_sync(f"worker{r}", _param_rrefs, args=(impl, stage))
    opt = dist_optim.DistributedOptimizer(torch.optim.SGD, params, lr=0.01)

    def step() -> None:
        x, y = torch.randn(batch, width), torch.randn(batch, width)
        with dist_autograd.context() as context_id:
            t0 = time.perf_counter()
            h = first(x)
            for stage in stages:
                h = stage.rpc_sync().forward(h)
            loss = ((h - y) ** 2).mean()
            t1 = time.perf_counter()
            dist_autograd.backward(context_id, [loss])
            t2 = time.perf_counter()
            opt.step(context_id)
            if phases is not None:
                for name, seconds in zip(_PHASES, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                    phases[name].append(seconds)

    return _timed(steps, step)


def _mlp_local(impl: str, steps: int) -> list[float]:
    """The ``mlp`` step in this process alone: the same four stages, torch's autograd."""
    import torch

    width, batch = bench_models.MLP_SIZES
    model = torch.nn.Sequential(*(bench_models.stage(width, r) for r in range(4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        x, y = torch.randn(batch, width), torch.randn(batch, width)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    return _timed(steps, step)


_PHASES = ("forward", "backward", "optimizer")


def _mlp_phases(impl: str, steps: int) -> dict:
    """The MLP's step, phase by phase: ``{phase: [seconds, ...]}`` (warm-up steps included)."""
    phases: dict = {name: [] for name in _PHASES}
    _mlp(impl, steps, phases)
    return phases


def _noop_calls(impl: str, calls: int) -> dict:
    rpc, dist_autograd, _ = _modules(impl)
    out = {}
    out["outside_us"] = _percentiles(_timed(calls, lambda: rpc.rpc_sync("worker1", _noop)))
    with dist_autograd.context():
        inside = _timed(calls, lambda: rpc.rpc_sync("worker1", _noop))
    out["inside_us"] = _percentiles(inside)
    return out


_COLD: dict = {}


def _forward_runs() -> list[int]:
    """On the callee: four forwards of one stage in a row, each's time in µs."""
    import torch

    if not _COLD:
        _COLD["stage"], _COLD["x"] = (
            bench_models.stage(256, 1),
            torch.randn(32, 256, requires_grad=True),
        )
    runs = []
    for _ in range(4):
        started = time.perf_counter_ns()
        _COLD["stage"](_COLD["x"])
        runs.append((time.perf_counter_ns() - started) // 1000)
    return runs


_GAPS = {"none": 0.0, "1ms": 0.001, "10ms": 0.01}


def _cold_calls(impl: str, calls: int) -> dict:
    """``{gap: [[µs of each of the four runs], ...]}`` over ``calls`` calls per gap."""
    rpc = _modules(impl)[0]
    out: dict = {}
    for name, gap in _GAPS.items():
        out[name] = []
        for _ in range(calls):
            out[name].append(rpc.rpc_sync("worker1", _forward_runs))
            if gap:
                time.sleep(gap)  # the gap itself is what is measured, not a wait for anything
    return out


_WORKLOADS = {
    "rnn": _rnn,
    "mlp": _mlp,
    "rnn_local": _rnn_local,
    "mlp_local": _mlp_local,
    "phases": _mlp_phases,
    "noop": _noop_calls,
    "cold": _cold_calls,
}


def _member(rank: int, world: int, impl: str, store: str, commands, results) -> None:
    """One worker of a group; rank 0 runs the workloads ``commands`` names."""
    import torch

    # One intra-op thread per worker, as torchrun sets for several workers on a host: four
    # workers on a small machine would otherwise spin on each other's cores.
    torch.set_num_threads(1)
    rpc = _modules(impl)[0]
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"file://{store}", rpc_timeout=120)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world, rpc_backend_options=options)
    if rank == 0:
        results.put("up")
        while (command := commands.get()) is not None:
            name, count = command
            try:
                results.put(_WORKLOADS[name](impl, count))
            except Exception:  # the run stops with it, printed by the parent
                results.put(_Failed(f"{impl}, {name}:\n{traceback.format_exc()}"))
                raise
    rpc.shutdown()


class _Failed(str):
    """A workload's traceback, in place of its result."""


def _result(results, procs: list, timeout: float):
    """The next result of a group, as soon as it comes; raises if the workload failed, or if
    one of the group's processes exited before it came (its stderr says why)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = results.get(timeout=1.0)
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"a worker exited (rank, exit code): {dead}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result in {timeout:.0f} s") from None
            continue
        if isinstance(got, _Failed):
            raise RuntimeError(f"a workload failed on {got}")
        return got


def run(impls: list[str], steps: int, blocks: int) -> list[dict]:
    """Each workload on each of ``impls``, in alternating blocks; one line per workload and
    implementation."""
    ctx = mp.get_context("spawn")
    lines = []
    world = 4
    groups: dict = {}
    for impl in impls:
        commands, results = ctx.Queue(), ctx.Queue()
        if impl == "raw":
            listeners, ports = bench_raw.listeners(world)
            procs = [
                ctx.Process(target=bench_raw.member, args=(r, listeners, ports, commands, results))
                for r in range(world)
            ]
        else:
            store = os.path.join(tempfile.mkdtemp(prefix="distrpc-bench-"), "store")
            procs = [
                ctx.Process(target=_member, args=(r, world, impl, store, commands, results))
                for r in range(world)
            ]
        for p in procs:
            p.start()
        if impl == "raw":
            for sock in listeners[1:]:
                sock.close()  # (the processes have their own)
        groups[impl] = (procs, commands, results)
        _only_running(groups, impl)
        _result(results, procs, 600)
    for name in _WORKLOADS:
        # (The raw floor has the training steps alone.)
        running = [i for i in impls if i != "raw" or name in bench_raw.WORKLOADS]
        got: dict[str, list] = {impl: [] for impl in running}
        for block in range(blocks):
            for impl in running if block % 2 == 0 else running[::-1]:
                _only_running(groups, impl)
                procs, commands, results = groups[impl]
                commands.put((name, max(1, steps // blocks)))
                got[impl].append(_result(results, procs, 1800))
        for impl in running:
            if name == "noop":
                merged = {key: [b[key] for b in got[impl]] for key in ("outside_us", "inside_us")}
                lines.append({"workload": name, "impl": impl, **_middle(merged)})
            elif name == "cold":
                runs = {
                    gap: [
                        round(statistics.median(r[i] for b in got[impl] for r in b[gap]))
                        for i in range(4)
                    ]
                    for gap in _GAPS
                }
                lines.append({"workload": name, "impl": impl, "runs_us": runs})
            elif name == "phases":
                medians = {
                    f"{phase}_p50_ms": round(
                        statistics.median(s for b in got[impl] for s in b[phase]) * 1e3, 3
                    )
                    for phase in _PHASES
                }
                lines.append({"workload": "mlp_phases", "impl": impl, **medians})
            else:
                samples = [s for b in got[impl] for s in b]
                ms = {k.replace("_us", "_ms"): v / 1e3 for k, v in _percentiles(samples).items()}
                lines.append({"workload": name, "impl": impl, "steps": len(samples), **ms})
    _only_running(groups, None)
    for procs, commands, _ in groups.values():
        commands.put(None)
        for p in procs:
            p.join(120)
    return lines


def _middle(merged: dict) -> dict:
    """The median over blocks of each block's p50."""
    out = {}
    for key, blocks in merged.items():
        p50s = sorted(b["p50_us"] for b in blocks)
        out[f"{key.removesuffix('_us')}_p50_us"] = p50s[len(p50s) // 2]
    return out


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, runs, prints the JSON lines and distrpc/torch ratios."""
    parser = argparse.ArgumentParser(prog="python -m distrpc.bench_train", description=__doc__)
    parser.add_argument(
        "--impl",
        choices=["distrpc", "torch", "raw", "both"],
        default="both",
        help="both: distrpc and torch, and the raw floor (distrpc.bench_raw) for rnn and mlp",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    opts = parser.parse_args(argv)
    impls = ["distrpc", "torch", "raw"] if opts.impl == "both" else [opts.impl]
    lines = run(impls, 8 if opts.quick else opts.steps, 1 if opts.quick else 4)
    for line in lines:
        print(json.dumps(line), flush=True)
    if opts.impl == "both":
        by = {(line["workload"], line["impl"]): line for line in lines}
        for name in ("rnn", "mlp"):
            torch_ms, raw_ms = by[(name, "torch")]["p50_ms"], by[(name, "raw")]["p50_ms"]
            # The one-process floor, as both groups' trainers measured it.
            local = statistics.median(
                by[(f"{name}_local", i)]["p50_ms"] for i in ("distrpc", "torch")
            )
            ratios = {
                "distrpc_over_torch": round(by[(name, "distrpc")]["p50_ms"] / torch_ms, 3),
                "raw_over_torch": round(raw_ms / torch_ms, 3),
                "distrpc_over_raw": round(by[(name, "distrpc")]["p50_ms"] / raw_ms, 3),
                "one_process_over_torch": round(local / torch_ms, 3),
            }
            print(json.dumps({"workload": name, "field": "p50_ms", **ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
