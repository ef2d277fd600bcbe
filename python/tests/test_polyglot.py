"""Python and Rust workers in one group, calling each other's functions by name with
MessagePack arguments: worker0 and worker2 are Python, worker1 is the Rust test worker
(``crates/distrpc-testkit/src/bin/distrpc-test-worker.rs``, scenario ``polyglot``), which calls
the functions below through typed handles."""

from __future__ import annotations

import operator

import distrpc
from _workers import join


@distrpc.function(name="py.mul")
def _mul(a, b):
    return a * b


@distrpc.function(name="py.double")
def _double(t):
    return t * 2  # a numpy array, its dtype kept


@distrpc.function(name="py.stats")
def _stats(values):
    return {"n": len(values), "mean": sum(values) / len(values)}


@distrpc.function(name="py.raises")
def _raises(text):
    raise ValueError(text)


def _error(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the test reports what was raised
        return f"{type(e).__name__}: {e}"
    return None


def _python_worker(rank, world_size, init_method, results):
    import distrpc.rpc as rpc
    import numpy as np

    join(rpc, rank, world_size, init_method, rpc_timeout=30)
    out = {}
    try:
        out["describe"] = rpc.rpc_sync(
            "worker1",
            "polyglot.describe",
            args=("abc", b"\x01\x02\x03", [1, 2, 3], {"a": 0.5, "b": 1.5}, None, True),
        )
        ints = np.arange(6, dtype=np.int64).reshape(2, 3)
        doubled = rpc.rpc_async("worker1", "polyglot.double", args=(ints,)).wait()
        out["double"] = (doubled.dtype.name, doubled.shape, doubled.tolist())
        out["scaled_sum"] = rpc.rpc_sync(
            "worker1", "distrpc_test_worker::scaled_sum", args=(np.array([1.0, 2.0, 3.0]), 2.0)
        )
        out["parse"] = rpc.rpc_sync("worker1", "polyglot.parse", args=("41",))
        out["parse_error"] = _error(lambda: rpc.rpc_sync("worker1", "polyglot.parse", args=("x",)))
        out["unknown"] = _error(lambda: rpc.rpc_sync("worker1", "polyglot.nope", args=(1,)))
        out["pickled"] = _error(lambda: rpc.rpc_sync("worker1", operator.add, args=(1, 2)))
        out["kwargs"] = _error(lambda: rpc.rpc_sync("worker1", "polyglot.parse", kwargs={"a": 1}))
        out["unencodable"] = _error(lambda: rpc.rpc_sync("worker1", "polyglot.parse", args=({1},)))
        # Python to Python by name too.
        other = f"worker{2 - rank}"
        out["py_mul"] = rpc.rpc_sync(other, "py.mul", args=(3, 4))
        out["py_stats"] = rpc.rpc_async(other, "py.stats", args=([2, 4],)).wait()
        out["py_raises"] = _error(lambda: rpc.rpc_sync(other, "py.raises", args=("bad",)))
        try:
            import torch
        except ImportError:
            pass
        else:
            got = rpc.rpc_sync("worker1", "polyglot.double", args=(torch.ones(3),))
            out["torch"] = (got.dtype.name, got.tolist())
    finally:
        rpc.shutdown()
    results.put((rank, out))


def test_python_and_rust_workers_call_each_other_by_name(run_group, rust_worker):
    got = run_group(_python_worker, 3, commands={1: [rust_worker, "polyglot"]})
    # The Rust worker called py.mul, py.double, py.stats, py.raises and py.missing on both.
    assert "worker1: called worker0" in got[1] and "worker1: called worker2" in got[1], got[1]
    for rank in (0, 2):
        out = got[rank]
        assert out["describe"] == ["ABC", b"\x03\x02\x01", 6, 2.0, True, False]
        assert out["double"] == ("int64", (2, 3), [[0, 2, 4], [6, 8, 10]])
        assert out["scaled_sum"] == 12.0
        assert out["parse"] == 41
        assert (
            out["parse_error"].startswith("RuntimeError") and "ParseIntError" in out["parse_error"]
        ), out["parse_error"]
        assert "polyglot.nope" in out["unknown"], out["unknown"]
        assert "Pickle" in out["pickled"] and "worker1" in out["pickled"], out["pickled"]
        assert out["kwargs"].startswith("TypeError") and "positional" in out["kwargs"]
        assert out["unencodable"].startswith("TypeError") and "set" in out["unencodable"]
        assert out["py_mul"] == 12
        assert out["py_stats"] == {"n": 2, "mean": 3.0}
        assert "ValueError" in out["py_raises"] and "bad" in out["py_raises"], out["py_raises"]
        if "torch" in out:
            assert out["torch"] == ("float32", [2.0, 2.0, 2.0])
