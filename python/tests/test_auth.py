"""A group with an auth token (``TensorPipeRpcBackendOptions(auth_token=...)``): its members
call each other; a worker without the token can neither call into the group — its pickled
call never runs — nor be called by it, and the errors say why."""

from __future__ import annotations

import multiprocessing as mp
import operator
import os
import threading
import time

import pytest

TOKEN = "the group's shared secret"


def _touch(path: str) -> None:
    """What an outsider tries to run in the group: it must never run."""
    with open(path, "w") as f:
        f.write("ran")


def _worker(rank, init_method, token, marker, barrier, results):
    import distrpc.rpc as rpc

    options = rpc.TensorPipeRpcBackendOptions(
        init_method=init_method, rpc_timeout=20, auth_token=token
    )
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=3, rpc_backend_options=options)
    out = {}

    def error(call):
        try:
            call()
        except RuntimeError as e:
            return str(e)
        return None

    barrier.wait(30)  # everyone has joined (through the file store, which has no auth)
    if rank < 2:
        out["member"] = rpc.rpc_sync(f"worker{1 - rank}", operator.add, args=(rank, 10))
    if rank == 0:
        out["to_outsider"] = error(lambda: rpc.rpc_sync("worker2", operator.add, args=(1, 2)))
    if rank == 2:
        out["from_outsider"] = error(lambda: rpc.rpc_sync("worker1", _touch, args=(marker,)))
    barrier.wait(30)  # every call is done before anyone leaves
    rpc.shutdown(graceful=False)
    results.put((rank, out))


def _run_three(target, args) -> dict:
    """Runs ``target(*args(rank), barrier, results)`` in 3 fresh processes; what each put."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args(r), barrier, results)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return got


def test_only_workers_with_the_token_reach_each_other(tmp_path):
    marker = str(tmp_path / "outsider-ran")
    init_method = f"file://{tmp_path}/store"
    tokens = [TOKEN, TOKEN, None]
    got = _run_three(_worker, lambda r: (r, init_method, tokens[r], marker))
    assert got[0]["member"] == 10 and got[1]["member"] == 11
    assert "does it have the same auth token" in got[0]["to_outsider"], got[0]
    assert got[2]["from_outsider"] is not None, "the outsider's call must fail"
    assert not os.path.exists(marker), "the outsider's function ran in the group"


def test_a_short_token_is_refused(tmp_path):
    import distrpc.rpc as rpc

    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"file://{tmp_path}/store", auth_token="tiny-tok"
    )
    with pytest.raises(RuntimeError, match="at least 16 bytes"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options=options)
    assert "tiny-tok" not in repr(options)


def _tls_worker(rank, init_method, tls, barrier, results):
    import distrpc.rpc as rpc
    import numpy as np

    options = rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=20, tls=tls)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=3, rpc_backend_options=options)
    out = {}
    barrier.wait(30)
    if rank < 2:
        data = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: many TLS records
        back = rpc.rpc_sync(f"worker{1 - rank}", operator.neg, args=(data,))
        out["member"] = bool((back == -data).all())
    if rank == 2:
        try:
            rpc.rpc_sync("worker0", operator.add, args=(1, 2))
        except RuntimeError as e:
            out["outsider"] = str(e)
    barrier.wait(30)
    rpc.shutdown(graceful=False)
    results.put((rank, out))


def test_a_group_over_tls_admits_only_its_certificates(tmp_path):
    import distrpc

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    distrpc.make_certificates(str(ours), ["worker0", "worker1"])
    distrpc.make_certificates(str(theirs), ["worker2"])
    files = [
        (str(d / "ca.pem"), str(d / f"worker{r}.pem"), str(d / f"worker{r}-key.pem"))
        for r, d in enumerate([ours, ours, theirs])
    ]
    init_method = f"file://{tmp_path}/store"
    got = _run_three(_tls_worker, lambda r: (r, init_method, files[r]))
    assert got[0]["member"] and got[1]["member"]
    assert "TLS" in got[2]["outsider"], got[2]


_holding = threading.Event()
_release = threading.Event()
_held = [0]
_sent = [0]
_send_started: list = [None]


def _hold(data):
    """Runs on worker1: answers only once released (bounded)."""
    _held[0] += 1
    if _held[0] >= 2:
        _holding.set()
    _release.wait(60)
    return len(data)


def _report():
    """Runs on worker0, on a pool thread: for how long its main thread has been inside one
    send (``None``: it is not in one)."""
    started = _send_started[0]
    return None if started is None else time.monotonic() - started


def _probe():
    """Runs on worker2: asks worker0 (over a connection of their own) until worker0 answers
    while its main thread is inside a send — which it can only if that send let the
    interpreter lock go. Bounded: the send soon waits, and waits until worker1 reads."""
    import distrpc.rpc as rpc

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        inside = rpc.rpc_sync("worker0", _report, timeout=10)
        if inside is not None and inside > 0.2:  # a send takes microseconds: it waits
            return True
    return False


def _backpressure_worker(rank, init_method, barrier, results):
    import distrpc.rpc as rpc
    import numpy as np

    # worker1 takes 2 calls at once from a peer; worker0 holds at most 1 MiB for one.
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=init_method, rpc_timeout=60, max_queued_bytes=1 << 20, max_calls_in=2
    )
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=3, rpc_backend_options=options)
    out = {}
    barrier.wait(30)
    if rank == 0:
        data = np.zeros(1 << 18, dtype=np.float32)  # 1 MiB
        futures = []
        for _ in range(64):  # 64 MiB: far more than worker1 reads while it holds 2
            _send_started[0] = time.monotonic()
            futures.append(rpc.rpc_async("worker1", _hold, args=(data,)))
            _send_started[0] = None
            _sent[0] += 1
        out["answers"] = sum(f.wait() for f in futures)
    elif rank == 1:
        assert _holding.wait(60)
        # worker1 reads no more from worker0, whose main thread soon waits in a send: its
        # pool thread must still get the interpreter lock to answer worker2.
        try:
            out["answered_while_sending"] = rpc.rpc_sync("worker2", _probe, timeout=30)
        finally:
            _release.set()
    barrier.wait(60)
    rpc.shutdown()
    results.put((rank, out))


def test_a_send_waiting_for_room_lets_the_other_threads_run(tmp_path):
    init_method = f"file://{tmp_path}/store"
    got = _run_three(_backpressure_worker, lambda r: (r, init_method))
    assert got[1]["answered_while_sending"], "worker0 never answered while it was sending"
    assert got[0]["answers"] == 64 * (1 << 18)  # elements of each array


def test_the_bounds_are_options_and_bad_values_are_refused(tmp_path):
    import distrpc.rpc as rpc

    def options(store, **extra):
        return rpc.TensorPipeRpcBackendOptions(init_method=f"file://{tmp_path}/{store}", **extra)

    for store, bad, message in (
        ("a", {"send_stall": -1.0}, "send_stall -1: a positive number of seconds"),
        ("b", {"liveness": 1}, "liveness 1: whole seconds from 2 to 86400, or 0 for none"),
        ("d", {"spin_wait": -1.0}, "spin_wait -1: seconds, zero or more"),
        ("e", {"busy_poll": 0.0}, "busy_poll 0: a positive number of seconds"),
    ):
        with pytest.raises(ValueError, match=message):
            rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options=options(store, **bad))
    bounded = options(
        "c", max_builtin_elements=100, send_stall=5.0, liveness=4, spin_wait=0.0, busy_poll=1e-4
    )
    rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options=bounded)
    try:
        assert rpc.rpc_sync("w", "aten::ones", args=([10], "F32")).shape == (10,)
        with pytest.raises(RuntimeError, match="more than the limit of 100 elements"):
            rpc.rpc_sync("w", "aten::ones", args=([1000], "F32"))
    finally:
        rpc.shutdown()
