"""Futures (distrpc.futures, torch.futures' API), @async_execution, and the private helpers."""

from __future__ import annotations

import operator

import pytest
from _workers import join
from distrpc.rpc.functions import async_execution


def test_futures_without_rpc():
    from distrpc.futures import Future, collect_all, wait_all

    f: Future = Future()
    g = f.then(lambda fut: fut.value() * 2)
    seen = []
    f.add_done_callback(lambda fut: seen.append(fut.value()))
    assert not g.done()
    f.set_result(21)
    assert (g.wait(), seen, wait_all([f, g])) == (42, [21], [21, 42])
    bad: Future = Future()
    bad.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        wait_all([f, bad])
    assert collect_all([]).wait() == []
    with pytest.raises(RuntimeError):
        f.set_result(1)


def test_a_raising_callback_is_logged_and_the_others_run(caplog):
    """As torch.futures does: neither set_result nor a late add_done_callback raises."""
    from distrpc.futures import Future

    f: Future = Future()
    seen = []
    f.add_done_callback(lambda fut: 1 / 0)
    f.add_done_callback(lambda fut: seen.append(fut.value()))
    f.set_result(5)
    f.add_done_callback(lambda fut: [][1])
    assert seen == [5]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2, errors
    assert "ZeroDivisionError" in errors[0] and "IndexError" in errors[1], errors


@async_execution
def async_add(to, x, y):
    import distrpc.rpc as rpc

    # Holds no thread while the nested call runs; answers when the chain completes.
    return rpc.rpc_async(to, operator.add, args=(x, y)).then(lambda fut: fut.wait() + 1)


def _futures(rank, world_size, init_method, results):
    import distrpc.rpc as rpc
    from distrpc.futures import wait_all

    join(rpc, rank, world_size, init_method, rpc_timeout=20, num_worker_threads=1)
    out = None
    if rank == 0:
        futs = [rpc.rpc_async("worker1", operator.pow, args=(2, i)) for i in range(8)]
        chained = futs[3].then(lambda f: f.value() * 10)
        callbacks = []
        futs[0].add_done_callback(lambda f: callbacks.append(f.value()))
        # A raising callback runs on the thread that completes rpc_async futures: it is
        # logged, and that thread goes on completing the later ones (these, below).
        futs[1].add_done_callback(lambda f: 1 / 0)
        failing = rpc.rpc_async("worker1", operator.truediv, args=(1, 0))
        try:
            failing.wait()
        except ZeroDivisionError as e:
            failure = str(e)
        # One handler thread on worker1, and each async_add there makes a nested call back to
        # worker0 and to worker1 itself: only possible if waiting holds no thread.
        nested = [
            rpc.rpc_async("worker1", async_add, args=(f"worker{i % 2}", i, 1)) for i in range(6)
        ]
        out = {
            "pows": wait_all(futs),
            "chained": chained.wait(),
            "callbacks": callbacks,
            "failure": failure,
            "nested": wait_all(nested),
            "timeout": rpc.get_rpc_timeout(),
            "infos": [repr(w) for w in rpc._get_current_rpc_agent().get_worker_infos()],
            "debug": sorted(rpc._get_debug_info())[:3],
        }
    rpc.shutdown()
    results.put((rank, out))


def test_rpc_async_futures_and_async_execution(run_group):
    out = run_group(_futures, 2)[0]
    assert out["pows"] == [2**i for i in range(8)]
    assert out["chained"] == 80
    assert out["callbacks"] == [1]
    assert out["failure"].startswith("ZeroDivisionError: On WorkerInfo(id=1, name=worker1):")
    assert out["nested"] == [i + 2 for i in range(6)]
    assert out["timeout"] == 20
    assert out["infos"] == ["WorkerInfo(id=0, name=worker0)", "WorkerInfo(id=1, name=worker1)"]
    assert out["debug"] == [
        "agent.claims_taken_back",
        "agent.client_active_calls",
        "agent.frames_read_waiting",
    ]


def _nothing():
    return None


def _five():
    return 5


def _expecting(rank, world_size, init_method, results):
    import threading

    import distrpc.rpc as rpc
    from distrpc import _internal, _state

    # One thread on worker1: the calls are answered in the order they were sent.
    join(rpc, rank, world_size, init_method, rpc_timeout=20, num_worker_threads=1)
    out = None
    if rank == 0:
        state = _state.require()
        failures: list = []
        failed = threading.Event()

        def on_failure(e):
            failures.append(e)
            failed.set()

        def expect(function):
            payload, buffers = _internal.serialize(_internal.PythonUDF(function, (), {}))
            name = _internal.qualname(function)
            none = _internal.serialize(None)[0]
            state.expect(
                lambda: state.agent.rpc_async_expecting("worker1", name, payload, buffers, none),
                on_failure,
                1,
            )

        for _ in range(50):
            expect(_nothing)
        # Answered after the fifty, on the same connection and thread.
        rpc.rpc_sync("worker1", _nothing)
        with state.pending_lock:
            state._forget_answered()
            left_after_answers = len(state.pending)
        expect(_five)
        got_other = failed.wait(10)
        other = repr(failures[-1]) if failures else None
        failed.clear()
        expect(_raising)
        got_raised = failed.wait(10)
        out = {
            "left": left_after_answers,
            "failures": len(failures),
            "other": (got_other, other),
            "raised": (got_raised, type(failures[-1]).__name__ if failures else None),
        }
    rpc.shutdown()
    results.put((rank, out))


def _raising():
    raise ZeroDivisionError("released twice")


def test_an_expected_answer_wakes_no_thread_and_any_other_outcome_is_reported(run_group):
    """``_State.expect`` (a context's release): fifty calls answered as expected leave no
    pending entry and reach no handler; an answer of something else, and the callee's
    exception, reach the handler."""
    out = run_group(_expecting, 2)[0]
    assert out["left"] == 0
    assert out["other"] == (True, "RuntimeError('an unexpected answer: 5')")
    assert out["raised"] == (True, "ZeroDivisionError")
    assert out["failures"] == 2
