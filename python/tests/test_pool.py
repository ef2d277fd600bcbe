"""The worker threads: nested calls beyond the pool's size, and a graceful shutdown that loses
nothing of an uneven workload."""

from __future__ import annotations

import threading
import time

from _workers import join

_received: list = []
_lock = threading.Lock()


def _relay(depth: int, me: int) -> int:
    """Calls the other worker, which calls back, ``depth`` times: every level holds a thread
    while it waits."""
    import distrpc.rpc as rpc

    if depth == 0:
        return 0
    other = f"worker{1 - me}"
    return 1 + rpc.rpc_sync(other, _relay, args=(depth - 1, 1 - me))


def _nested(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=30, num_worker_threads=2)
    out = None
    if rank == 0:
        # Depth 9: five levels wait on worker1 and four on worker0, against two threads each;
        # and three chains at once.
        futs = [rpc.rpc_async("worker1", _relay, args=(9, 1)) for _ in range(3)]
        out = [f.wait() for f in futs]
    rpc.shutdown()
    results.put((rank, out))


def test_nested_calls_beyond_the_pool_size(run_group):
    assert run_group(_nested, 2)[0] == [9, 9, 9]


def _record(sender: int, i: int) -> int:
    time.sleep(0.001 * (i % 3))
    with _lock:
        _received.append((sender, i))
    return i


def _uneven(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=60)
    # Rank r sends 40 * r calls to each other worker and shuts down at once, without waiting
    # for any: graceful shutdown must still run and answer every one.
    futs = [
        rpc.rpc_async(f"worker{peer}", _record, args=(rank, i))
        for i in range(40 * rank)
        for peer in range(world_size)
        if peer != rank
    ]
    rpc.shutdown()
    answered = sum(1 for f in futs if f.done() and f.value() is not None)
    with _lock:
        got = sorted(_received)
    results.put((rank, {"sent": len(futs), "answered": answered, "received": got}))


def test_graceful_shutdown_loses_nothing_of_an_uneven_workload(run_group):
    out = run_group(_uneven, 3)
    for rank in range(3):
        assert out[rank]["answered"] == out[rank]["sent"] == 80 * rank
        expected = sorted((s, i) for s in range(3) if s != rank for i in range(40 * s))
        assert out[rank]["received"] == expected


def _square(x: int) -> int:
    return x * x


def _one_thread(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    # worker0's single thread waits for calls reading the connection the last one came in on;
    # calls from the other peer must still reach it at once (its doorbell), in any order.
    join(rpc, rank, world_size, init_method, rpc_timeout=30, num_worker_threads=1)
    out = None
    if rank > 0:
        out = [rpc.rpc_sync("worker0", _square, args=(rank * 1000 + i,)) for i in range(200)]
        out += [f.wait() for f in [rpc.rpc_async("worker0", _square, args=(i,)) for i in range(50)]]
    rpc.shutdown()
    results.put((rank, out))


def test_one_worker_thread_serves_every_peer(run_group):
    out = run_group(_one_thread, 3)
    for rank in (1, 2):
        expected = [(rank * 1000 + i) ** 2 for i in range(200)] + [i * i for i in range(50)]
        assert out[rank] == expected


_flag = threading.Event()


def _wait_for_flag() -> bool:
    return _flag.wait(30)


def _set_flag() -> None:
    _flag.set()


def _held(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=60, num_worker_threads=4)
    out = None
    if rank == 0:
        # Quick calls: worker1's waiting thread reads them and keeps the connection while it
        # runs each one (the peer's next frame waits in the socket for it).
        for i in range(50):
            rpc.rpc_sync("worker1", _square, args=(i,))
        # This one blocks until the next call on the same connection has run: the connection
        # must not stay with the thread that runs it (the watch takes it back, or an idle
        # thread does; else `_set_flag` would be read only after `_wait_for_flag` gave up).
        blocked = rpc.rpc_async("worker1", _wait_for_flag)
        rpc.rpc_sync("worker1", _set_flag)
        out = blocked.wait()
    rpc.shutdown()
    results.put((rank, out))


def test_a_call_that_blocks_does_not_keep_its_connection_from_the_next(run_group):
    assert run_group(_held, 2)[0] is True
