"""RRefs: values that live on their owner, used through proxies, freed when the last reference
goes."""

from __future__ import annotations

import collections
import gc
import pickle

from _workers import join, wait_until


def _owned_values():
    import distrpc.rpc as rpc

    return int(rpc._get_debug_info()["num_owner_values"])


def _rrefs(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        counter = rpc.remote("worker1", collections.Counter, args=("hello",))
        counter.rpc_sync().update("world")  # runs on worker1, on the value itself
        most = counter.rpc_async().most_common(1)
        copy = counter.remote().copy()  # a new value on worker1
        copy.to_here()  # created before the next change
        counter.rpc_sync().update("!")
        local = rpc.RRef([1, 2, 3])
        failed = rpc.remote("worker1", int, args=("x",))
        try:
            failed.to_here()
            failure = None
        except ValueError as e:  # the creation's error, as its own type
            failure = str(e)
        try:
            pickle.dumps(counter)
            pickled = "pickled"
        except RuntimeError as e:
            pickled = str(e)
        out = {
            "type": (counter._get_type(), counter._get_type(blocking=False).wait()),
            "here": dict(counter.to_here()),
            "most": most.wait(),
            "copy_has_bang": "!" in copy.to_here(),
            "owner": (repr(counter.owner()), counter.owner_name(), counter.is_owner()),
            "local": (local.is_owner(), local.local_value(), local.to_here()),
            "failure": failure,
            "pickled": pickled,
        }
        del counter, copy, local, failed, most
        gc.collect()
        # The owner frees values as the deletes arrive (it tells nobody).
        wait_until(lambda: rpc.rpc_sync("worker1", _owned_values) == 0)
        out["freed"] = rpc.rpc_sync("worker1", _owned_values)
    rpc.shutdown()
    results.put((rank, out))


def test_rrefs_live_on_their_owner(run_group):
    out = run_group(_rrefs, 2)[0]
    assert out["here"] == dict(collections.Counter("helloworld!"))
    assert out["type"] == (collections.Counter, collections.Counter)
    assert out["most"] == [("l", 3)]
    assert out["copy_has_bang"] is False
    assert out["owner"] == ("WorkerInfo(id=1, name=worker1)", "worker1", False)
    assert out["local"] == (True, [1, 2, 3], [1, 2, 3])
    assert out["failure"].startswith("ValueError: On WorkerInfo(id=1, name=worker1):")
    assert "only allowed inside RPC calls" in out["pickled"]
    assert out["freed"] == 0


def _total_via(rref):
    """On a third worker: uses a reference it received (a fork), and returns a new one."""
    import distrpc.rpc as rpc

    total = sum(rref.to_here().values()) + rref.rpc_sync().total()
    return total, rpc.remote(rref.owner(), collections.Counter, args=("abc",))


def _forks(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        counter = rpc.remote("worker1", collections.Counter, args=("hello",))
        total, made = rpc.rpc_sync("worker2", _total_via, args=(counter,))
        out = {
            "total": total,
            "made": (made.owner_name(), sorted(made.to_here())),
            "self_owned": rpc.rpc_sync("worker1", _total_via, args=(counter,))[0],
        }
        del counter, made
        gc.collect()
        # The owner frees values as the deletes arrive (it tells nobody).
        wait_until(lambda: rpc.rpc_sync("worker1", _owned_values) == 0)
        out["freed"] = rpc.rpc_sync("worker1", _owned_values)
    rpc.shutdown()
    results.put((rank, out))


def test_rrefs_fork_through_arguments_and_results(run_group):
    out = run_group(_forks, 3)[0]
    assert out["total"] == 10
    assert out["made"] == ("worker1", ["a", "b", "c"])
    assert out["self_owned"] == 10
    assert out["freed"] == 0


def _started(rank, world_size, init_method, results):
    import distrpc.rpc as rpc
    from distrpc.rpc.rref import call_on

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        counter = rpc.remote("worker1", collections.Counter, args=("hello",))
        started = call_on(counter, "start", "most_common", (1,), {}, -1)
        # Other calls to the same worker while this thread holds the connection for the reply.
        between = [rpc.rpc_sync("worker1", len, args=("abc",)), counter.rpc_sync().total()]
        out = {"between": between, "result": started.wait()}
        try:
            started.wait()
        except RuntimeError as e:
            out["again"] = str(e)
        failing = call_on(counter, "start", "no_such_method", (), {}, -1)
        try:
            failing.wait()
        except AttributeError as e:  # the owner's exception, as its own type
            out["failure"] = str(e)
        del counter
    rpc.shutdown()
    results.put((rank, out))


def test_a_started_call_is_waited_for_later_by_the_thread_that_reads_its_reply(run_group):
    out = run_group(_started, 2)[0]
    assert out["between"] == [3, 5]
    assert out["result"] == [("l", 2)]
    assert out["again"] == "this call was already waited for"
    assert out["failure"].startswith("AttributeError: On WorkerInfo(id=1, name=worker1):")
    assert "no_such_method" in out["failure"]


def test_rref_is_generic_in_its_value_type():
    import typing

    from distrpc.rpc import RRef

    def total(counts: RRef[dict]) -> int:
        return sum(counts.to_here().values())

    hint = typing.get_type_hints(total, localns={"RRef": RRef})["counts"]
    assert typing.get_origin(hint) is RRef and typing.get_args(hint) == (dict,)
