"""A group with an auth token (``TensorPipeRpcBackendOptions(auth_token=...)``): its members
call each other; a worker without the token can neither call into the group — its pickled
call never runs — nor be called by it, and the errors say why."""

from __future__ import annotations

import multiprocessing as mp
import operator
import os

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
