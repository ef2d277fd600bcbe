"""Against torch itself: torch tensors travel out of band, rpc_async gives torch futures, and
the same program gives the same results on torch.distributed.rpc and on distrpc.rpc."""

from __future__ import annotations

import importlib
import operator

import pytest
from _workers import join

torch = pytest.importorskip("torch")


def _scale(t, by):
    return t * by


def _describe(t):
    return (str(t.dtype), tuple(t.shape), t.requires_grad, t.data_ptr() % 64 == 0)


def _tensors(rank, world_size, init_method, results):
    import distrpc.rpc as rpc
    import torch

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        samples = [
            torch.arange(6, dtype=torch.float32).reshape(2, 3),
            torch.ones(4, dtype=torch.float64, requires_grad=True),
            torch.arange(5, dtype=torch.int64),
            torch.tensor([True, False]),
            torch.ones(3, dtype=torch.bfloat16),
            torch.tensor(7.5),
            torch.empty(0, 3),
            torch.arange(12).reshape(3, 4).t(),  # not contiguous
        ]
        fut = rpc.rpc_async("worker1", _scale, args=(samples[0], 3))
        out = {
            "described": [rpc.rpc_sync("worker1", _describe, args=(t,)) for t in samples],
            "torch_future": isinstance(fut, torch.futures.Future),
            "scaled": torch.futures.wait_all([fut])[0].tolist(),
            "transposed": rpc.rpc_sync("worker1", _scale, args=(samples[7], 1)).tolist(),
        }
    rpc.shutdown()
    results.put((rank, out))


def test_torch_tensors_travel_out_of_band(run_group):
    out = run_group(_tensors, 2)[0]
    described = out["described"]
    assert described[0] == ("torch.float32", (2, 3), False, True)
    assert described[1] == ("torch.float64", (4,), True, True)
    assert described[2][:2] == ("torch.int64", (5,))
    assert described[3][:2] == ("torch.bool", (2,))
    assert described[4][:2] == ("torch.bfloat16", (3,))
    assert described[5][:2] == ("torch.float32", ())
    assert described[6][:2] == ("torch.float32", (0, 3))
    assert out["torch_future"]
    assert out["scaled"] == [[0.0, 3.0, 6.0], [9.0, 12.0, 15.0]]
    assert out["transposed"] == torch.arange(12).reshape(3, 4).t().tolist()


def _program(rank, world_size, init_method, results, impl):
    """One torch RPC program, run as written on torch.distributed.rpc or distrpc.rpc."""
    import torch

    rpc = importlib.import_module(impl)
    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        futs = [rpc.rpc_async("worker1", operator.mul, args=(i, i)) for i in range(4)]
        out = {
            "add": rpc.rpc_sync("worker1", operator.add, args=(2, 3)),
            "tensor": rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1)).tolist(),
            "kwargs": rpc.rpc_sync("worker1", sorted, args=([3, 1, 2],), kwargs={"reverse": True}),
            "wait_all": torch.futures.wait_all(futs),
            "then": futs[2].then(lambda f: f.value() + 1).wait(),
            "info": (rpc.get_worker_info("worker1").id, rpc.get_worker_info().name),
        }
        try:
            rpc.rpc_sync("worker1", int, args=("x",))
        except ValueError as e:
            out["error"] = str(e).splitlines()[0]
    rpc.shutdown()
    results.put((rank, out))


def _on_torch(rank, world_size, init_method, results):
    _program(rank, world_size, init_method, results, "torch.distributed.rpc")


def _on_distrpc(rank, world_size, init_method, results):
    _program(rank, world_size, init_method, results, "distrpc.rpc")


def test_the_same_program_gives_the_same_results_on_torch_and_distrpc(run_group, tmp_path):
    on_torch = run_group(_on_torch, 2)[0]
    on_distrpc = run_group(_on_distrpc, 2, store="store2")[0]
    assert on_distrpc == on_torch
    assert on_torch["error"] == "ValueError: On WorkerInfo(id=1, name=worker1):"


def _profiled(rank, world_size, init_method, results, impl):
    import torch

    rpc = importlib.import_module(impl)
    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        with torch.autograd.profiler.profile() as prof:
            rpc.rpc_sync("worker1", operator.add, args=(1, 2))
            rpc.rpc_async("worker1", operator.mul, args=(3, 4)).wait()
        out = sorted({e.name for e in prof.function_events if e.name.startswith("rpc_")})
    rpc.shutdown()
    results.put((rank, out))


def _profiled_torch(rank, world_size, init_method, results):
    _profiled(rank, world_size, init_method, results, "torch.distributed.rpc")


def _profiled_distrpc(rank, world_size, init_method, results):
    _profiled(rank, world_size, init_method, results, "distrpc.rpc")


def test_calls_are_profiled_under_torchs_keys(run_group):
    # (torch 2.15 itself records no event at all for these calls under this profiler: checked
    # by hand with _profiled_torch; its keys are seed internal.py's.)
    on_distrpc = run_group(_profiled_distrpc, 2)[0]
    assert on_distrpc == [
        "rpc_async#_operator.mul(worker0 -> worker1)",
        "rpc_sync#_operator.add(worker0 -> worker1)",
    ]


@torch.jit.script
def _scripted_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _apply(module, x):
    return module(x)


def _torchscript(rank, world_size, init_method, results):
    import distrpc.rpc as rpc
    import torch

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        torch.manual_seed(0)
        module = torch.jit.script(torch.nn.Linear(3, 2))
        x = torch.ones(1, 3)
        out = {
            "function": rpc.rpc_sync(
                "worker1", _scripted_double, args=(torch.arange(3.0),)
            ).tolist(),
            "module": torch.allclose(rpc.rpc_sync("worker1", _apply, args=(module, x)), module(x)),
        }
    rpc.shutdown()
    results.put((rank, out))


def test_torchscript_functions_and_modules(run_group):
    out = run_group(_torchscript, 2)[0]
    assert out == {"function": [0.0, 2.0, 4.0], "module": True}
