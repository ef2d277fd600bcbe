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


def _identity(t):
    return t


def _again_and_again(rank, world_size, init_method, results):
    import distrpc.rpc as rpc
    import torch

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        out = []
        dtypes = [
            torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
            torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
            torch.complex128,
        ]  # fmt: skip
        for dtype in dtypes:
            for shape in [(), (5,), (2, 3), (2, 1, 3), (0, 2)]:
                # Three times each: the second and third go from what the first remembered,
                # and arrive through DLPack over the receive buffer.
                for i in range(3):
                    t = (torch.arange(torch.Size(shape).numel()) + i).reshape(shape).to(dtype)
                    back = rpc.rpc_sync("worker1", _identity, args=(t,))
                    kept = rpc.remote("worker1", _identity, args=(t,)).to_here()
                    for got in (back, kept):
                        same = got.dtype == dtype and got.shape == t.shape and torch.equal(got, t)
                        out.append((str(dtype), shape, i, same and got.is_contiguous()))
    rpc.shutdown()
    results.put((rank, out))


def test_tensors_of_every_plain_dtype_and_shape_sent_again_arrive_as_sent(run_group):
    out = run_group(_again_and_again, 2)[0]
    assert len(out) == 12 * 5 * 3 * 2
    assert [case for case in out if not case[3]] == []


def _udf_with_torch_ops(a, b):
    return torch.relu(torch.add(a, b)) * 2


def _plain(x):
    return f"plain {x}"


def _nested(a, dst):
    import distrpc.rpc as drpc
    import torch.distributed.rpc as trpc

    # The callee calls on: its own call's events come back too, their keys chained.
    rpc = drpc if drpc.api._state.current is not None else trpc
    return rpc.rpc_sync(dst, torch.mul, args=(a, a))


def _profiled(rank, world_size, init_method, results, impl):
    import torch
    from torch.autograd.profiler_legacy import profile

    rpc = importlib.import_module(impl)
    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        t = torch.ones(4)
        for x in (1, 1, 2, 2):  # made before: distrpc remembers their pickles
            rpc.rpc_sync("worker1", _plain, args=(x,))
        with profile(record_shapes=True) as prof:
            rpc.rpc_sync("worker1", _udf_with_torch_ops, args=(t, t))
            rpc.rpc_async("worker1", torch.add, args=(t, t)).wait()
            rpc.rpc_sync("worker1", _plain, args=(1,))
            rpc.rpc_sync("worker1", _nested, args=(t, "worker2"))
        events = prof.function_events
        keys = [e for e in events if e.name.startswith("rpc_") and not e.is_remote]
        remote = [e for e in events if e.is_remote]
        first = {e.name: e for e in reversed(keys)}
        out = {
            "keys": sorted(e.name for e in keys),
            "remote": sorted({(e.name, e.node_id) for e in remote}),
            "add_shapes": [e.input_shapes for e in remote if e.name.endswith("aten::add")],
            # Each remote event lies after the start of its call's own event.
            "placed": all(
                e.time_range.start >= first[e.name.split("#remote_op")[0]].time_range.start
                for e in remote
            ),
        }
        with torch.autograd.profiler.profile() as kineto:
            rpc.rpc_sync("worker1", _plain, args=(2,))
        out["kineto"] = sorted(e.name for e in kineto.function_events if "rpc_" in e.name)
    rpc.shutdown()
    results.put((rank, out))


def _profiled_torch(rank, world_size, init_method, results):
    _profiled(rank, world_size, init_method, results, "torch.distributed.rpc")


def _profiled_distrpc(rank, world_size, init_method, results):
    _profiled(rank, world_size, init_method, results, "distrpc.rpc")


def test_calls_are_profiled_as_torch_profiles_them(run_group):
    on_torch = run_group(_profiled_torch, 3)[0]
    on_distrpc = run_group(_profiled_distrpc, 3, store="store2")[0]
    # Under torch's legacy profiler: the same keys, and the callee's events under them with
    # the callee's rank (the nested call's from worker2), as torch records them.
    assert on_distrpc["keys"] == on_torch["keys"]
    assert "rpc_async#aten::add(worker0 -> worker1)" in on_torch["keys"]
    assert on_distrpc["remote"] == on_torch["remote"]
    assert (
        "rpc_sync#_nested(worker0 -> worker1)#remote_op: rpc_sync#aten::mul(worker1 -> worker2)"
        "#remote_op: aten::mul",
        2,
    ) in on_torch["remote"]
    assert on_distrpc["add_shapes"] == on_torch["add_shapes"] != []
    assert on_distrpc["placed"] and on_torch["placed"]
    # Under the default (Kineto) profiler torch records nothing for RPCs; distrpc its keys.
    assert on_torch["kineto"] == []
    assert on_distrpc["kineto"] == ["rpc_sync#_plain(worker0 -> worker1)"]


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
