"""Timeouts, a peer that dies, and the group helpers real programs use."""

from __future__ import annotations

import os
import time

import pytest
from _workers import join


def _timeouts(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = {}
    if rank == 0:
        started = time.monotonic()
        try:
            rpc.rpc_sync("worker1", time.sleep, args=(3,), timeout=0.2)
        except RuntimeError as e:
            out["per_call"] = (str(e), time.monotonic() - started)
        out["none"] = rpc.rpc_sync("worker1", time.sleep, args=(0.3,), timeout=0) is None
    rpc.shutdown()
    results.put((rank, out))


def test_a_call_that_outlives_its_timeout_raises(run_group):
    out = run_group(_timeouts, 2)[0]
    message, took = out["per_call"]
    assert "timeout" in message and "worker1" in message, message
    assert took < 2.5, f"the timeout fired after {took:.2f} s"
    assert out["none"]


def _peer_death(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    rpc.api._barrier(["worker0", "worker1"])
    if rank == 1:
        # No timeout: only the loss of worker0 can end these calls — a waiting rpc_sync and
        # an rpc_async future (torch's when torch is installed), its chained future too.
        try:
            import torch  # with torch loaded, rpc_async returns torch's future
        except ImportError:
            torch = None
        started = time.monotonic()
        pending = rpc.rpc_async("worker0", time.sleep, args=(30,), timeout=0)
        chained = pending.then(lambda fut: fut.wait())
        out = {}
        try:
            rpc.rpc_sync("worker0", os._exit, args=(3,), timeout=0)
        except RuntimeError as e:
            out["sync"] = (str(e), time.monotonic() - started)
        for name, fut in (("async", pending), ("then", chained)):
            try:
                fut.wait()
            except RuntimeError as e:
                out[name] = (str(e), time.monotonic() - started)
        kind = "torch" if torch and isinstance(pending, torch.futures.Future) else "distrpc"
        results.put((rank, (kind, out)))
        rpc.shutdown(graceful=False)
    else:
        time.sleep(30)  # rank 1's call ends this process; bounded if it never comes


def test_a_dead_peer_fails_the_calls_waiting_on_it_at_once(run_group):
    kind, out = run_group(_peer_death, 2, exit_codes={0: 3})[1]
    try:
        import torch  # noqa: F401
    except ImportError:
        assert kind == "distrpc"
    else:
        assert kind == "torch"
    assert set(out) == {"sync", "async", "then"}, out
    for message, took in out.values():
        assert "worker0" in message and "gone" in message, message
        assert took < 5, f"the failure took {took:.2f} s"


def _gather(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method)
    gathered = rpc.api._all_gather({"rank": rank})
    some = None
    if rank != 1:
        some = rpc.api._all_gather(rank * 10, worker_names=["worker0", "worker2"], timeout=10)
    rpc.api._wait_all_workers()
    rpc.shutdown()
    results.put((rank, (gathered, some)))


def test_all_gather_and_barrier(run_group):
    got = run_group(_gather, 3)
    expected = {f"worker{r}": {"rank": r} for r in range(3)}
    for rank in range(3):
        assert got[rank][0] == expected
    assert got[0][1] == got[2][1] == {"worker0": 0, "worker2": 20}


def test_device_maps_are_refused():
    import distrpc.rpc as rpc

    with pytest.raises(ValueError, match="CPU only"):
        rpc.TensorPipeRpcBackendOptions(device_maps={"worker1": {0: 1}})


def _interrupted(rank, world_size, init_method, results):
    import signal
    import threading

    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        sent = []

        def interrupt():
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

        threading.Timer(0.5, interrupt).start()
        try:
            rpc.rpc_sync("worker1", time.sleep, args=(3,), timeout=0)
            out = "not interrupted"
        except KeyboardInterrupt:
            out = time.monotonic() - sent[0]
    rpc.shutdown()
    results.put((rank, out))


def test_ctrl_c_interrupts_a_waiting_rpc_sync(run_group):
    took = run_group(_interrupted, 2)[0]
    assert isinstance(took, float), took
    assert took < 0.5, f"Ctrl-C took {took:.3f} s to interrupt the call"
