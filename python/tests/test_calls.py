"""Python functions called across processes, as torch.distributed.rpc programs call them."""

from __future__ import annotations

import operator

from _workers import join


def _greet(name, punctuation="!"):
    return f"hello {name}{punctuation}"


def _calls(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    try:
        if rank == 0:
            out = {
                "add": rpc.rpc_sync("worker1", operator.add, args=(2, 3)),
                "kwargs": rpc.rpc_sync(
                    "worker1", _greet, args=("torch",), kwargs={"punctuation": "?"}
                ),
                "async": [rpc.rpc_async(1, operator.mul, args=(i, i)).wait() for i in range(4)],
                "self": rpc.rpc_sync("worker0", len, args=([1, 2, 3],)),
                "info": repr(rpc.get_worker_info("worker1")),
            }
            try:
                rpc.rpc_sync("worker1", int, args=("not a number",))
            except ValueError as e:
                out["error"] = str(e)
    finally:
        rpc.shutdown()
    results.put((rank, out))


def test_python_functions_run_on_other_workers(run_group):
    got = run_group(_calls, 2)
    out = got[0]
    assert out["add"] == 5
    assert out["kwargs"] == "hello torch?"
    assert out["async"] == [0, 1, 4, 9]
    assert out["self"] == 3
    assert out["info"] == "WorkerInfo(id=1, name=worker1)"
    # The callee's exception comes back as its own type, prefixed with where it happened.
    assert out["error"].startswith("ValueError: On WorkerInfo(id=1, name=worker1):")
    assert "invalid literal for int()" in out["error"]


_counted = []


def _count():
    _counted.append(None)
    return len(_counted)


def _same(x=None):
    return x


def _fails():
    raise KeyError("on purpose")


def _named():
    return "first"


def _rebind():
    globals()["_named"] = lambda: "rebound"


def _again(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        # Calls made again go the short way at both ends (their pickles remembered): each
        # must still run, and come back as the first did.
        values = (1, True, 1.0, -0.0, None, "s", b"b")
        out = {
            "count": [rpc.rpc_sync("worker1", _count) for _ in range(4)],
            "same": [
                repr(rpc.rpc_sync("worker1", _same, args=(v,))) for v in values for _ in "abc"
            ],
            "async": [
                repr(rpc.rpc_async("worker1", _same, args=(v,)).wait())
                for v in values
                for _ in "ab"
            ],
            "list_args": [rpc.rpc_sync("worker1", _same, args=[5]) for _ in range(3)],
            "remote": [rpc.remote("worker1", _same, args=(3,)).to_here() for _ in range(3)],
            "named": [rpc.rpc_sync("worker1", _named) for _ in range(3)],
            "errors": [],
        }
        try:
            import torch
        except ImportError:  # the numpy-only run
            torch = None
        if torch is not None:  # calls on tensors of the same shapes, tensors alone back
            ts = [torch.full((2, 3), float(i)) for i in range(4)]
            out["tensors"] = [rpc.rpc_sync("worker1", _same, args=(t,)).tolist() for t in ts]
            out["remote_tensors"] = [
                rpc.remote("worker1", _same, args=(t,)).to_here().tolist() for t in ts
            ]
        rpc.rpc_sync("worker1", _rebind)
        out["named"].append(rpc.rpc_sync("worker1", _named))  # found by its name there
        for call in (rpc.rpc_sync, rpc.rpc_sync, rpc.rpc_sync, rpc.rpc_async, rpc.rpc_async):
            try:
                got = call("worker1", _fails)
                if call is rpc.rpc_async:
                    got.wait()
            except KeyError as e:
                out["errors"].append(str(e))
    rpc.shutdown()
    results.put((rank, out))


def test_calls_made_again_run_and_answer_as_the_first_time(run_group):
    out = run_group(_again, 2)[0]
    assert out["count"] == [1, 2, 3, 4]
    assert out["same"] == [repr(v) for v in (1, True, 1.0, -0.0, None, "s", b"b") for _ in "abc"]
    assert out["list_args"] == [5, 5, 5]
    assert out["remote"] == [3, 3, 3]
    assert out["named"] == ["first", "first", "first", "rebound"]
    if "tensors" in out:
        expected = [[[float(i)] * 3] * 2 for i in range(4)]
        assert out["tensors"] == out["remote_tensors"] == expected
    assert out["async"] == [repr(v) for v in (1, True, 1.0, -0.0, None, "s", b"b") for _ in "ab"]
    assert len(out["errors"]) == 5
    for error in out["errors"]:
        assert error.startswith("'KeyError: On WorkerInfo(id=1, name=worker1):")
        assert "purpose" in error


def test_calls_before_init_rpc_raise_torchs_error():
    import distrpc.rpc as rpc
    import pytest

    with pytest.raises(RuntimeError, match="RPC has not been initialized"):
        rpc.rpc_sync("worker1", operator.add, args=(1, 2))


def _only_here():
    return "defined in the caller's __main__ only"


def _mistakes(rank, world_size, init_method, results):
    import threading

    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        out = {}
        try:  # a lock cannot be pickled: the call fails here, before anything is sent
            rpc.rpc_sync("worker1", len, args=([threading.Lock()],))
        except TypeError as e:
            out["unpicklable"] = str(e)
        # A function only the caller has (in a module both have): the seed's hint.
        import json

        _only_here.__module__, _only_here.__qualname__ = "json", "_distrpc_only_here"
        json._distrpc_only_here = _only_here
        try:
            rpc.rpc_sync("worker1", _only_here)
        except AttributeError as e:
            out["missing"] = str(e)
        out["still_serving"] = rpc.rpc_sync("worker1", operator.add, args=(1, 1))
    rpc.shutdown()
    results.put((rank, out))


def test_unpicklable_arguments_and_unknown_functions_say_so(run_group):
    out = run_group(_mistakes, 2)[0]
    assert "lock" in out["unpicklable"]
    assert "_distrpc_only_here" in out["missing"]
    assert "Ensure that UDFs are defined on both caller and callee modules" in out["missing"]
    assert out["still_serving"] == 2
