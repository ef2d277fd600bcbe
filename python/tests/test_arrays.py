"""Arrays travel beside the pickle, never inside it: sent from their own memory, received as
views of the 64-byte aligned receive buffer."""

from __future__ import annotations

import numpy as np
from _workers import join


def _describe(arrays):
    """What the callee got: values, and whether each array is a view of the receive buffer."""
    out = []
    for a in arrays:
        base = a
        while getattr(base, "base", None) is not None:
            base = base.base
        out.append(
            {
                "dtype": str(a.dtype),
                "shape": a.shape,
                "sum": float(a.sum()),
                "aligned": a.__array_interface__["data"][0] % 64 == 0,
                "view": type(base).__name__.startswith("c_char_Array"),
            }
        )
    return out


def _double(a):
    return a * 2


def _arrays(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=20)
    out = None
    if rank == 0:
        arrays = [
            np.arange(12, dtype=np.float32).reshape(3, 4),
            np.ones((2, 3, 4), dtype=np.float64),
            np.arange(7, dtype=np.int64),
            np.zeros(0, dtype=np.uint8),
            np.arange(1 << 20, dtype=np.int32),  # 4 MiB: a body in its own buffer
        ]
        doubled = rpc.rpc_async("worker1", _double, args=(arrays[0],)).wait()
        out = {
            "described": rpc.rpc_sync("worker1", _describe, args=(arrays,)),
            "doubled": doubled.tolist(),
            "doubled_aligned": doubled.__array_interface__["data"][0] % 64 == 0,
            "nested": rpc.rpc_sync("worker1", len, args=({"a": [arrays[1]], "b": arrays[2]},)),
        }
    rpc.shutdown()
    results.put((rank, out))


def test_arrays_go_out_of_band_and_arrive_as_views(run_group):
    out = run_group(_arrays, 2)[0]
    expected = [
        ("float32", (3, 4), 66.0),
        ("float64", (2, 3, 4), 24.0),
        ("int64", (7,), 21.0),
        ("uint8", (0,), 0.0),
        ("int32", (1 << 20,), float(sum(range(1 << 20)))),
    ]
    for got, (dtype, shape, total) in zip(out["described"], expected):
        assert (got["dtype"], got["shape"], got["sum"]) == (dtype, shape, total)
        if shape != (0,):
            assert got["aligned"] and got["view"], got
    assert out["doubled"] == (np.arange(12, dtype=np.float32).reshape(3, 4) * 2).tolist()
    assert out["doubled_aligned"]
    assert out["nested"] == 2


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _grown_by(baseline: float, a) -> float:
    """On the callee: how much its RSS grew while it holds the received array."""
    assert a.nbytes == 128 << 20
    return _rss_mib() - baseline


def _big(rank, world_size, init_method, results):
    import distrpc.rpc as rpc

    join(rpc, rank, world_size, init_method, rpc_timeout=60)
    out = None
    if rank == 0:
        big = np.ones(32 << 20, dtype=np.float32)  # 128 MiB, touched
        callee_baseline = rpc.rpc_sync("worker1", _rss_mib)
        before = _rss_mib()
        callee_growth = rpc.rpc_sync("worker1", _grown_by, args=(callee_baseline, big))
        out = {"caller_growth": _rss_mib() - before, "callee_growth": callee_growth}
    rpc.shutdown()
    results.put((rank, out))


def test_a_128_mib_array_is_not_copied(run_group):
    out = run_group(_big, 2)[0]
    # The sender writes from the array itself: no second 128 MiB on its side.
    assert out["caller_growth"] < 32, out
    # The receiver holds the one receive buffer the array is a view of: 128 MiB, not 256.
    assert out["callee_growth"] < 128 + 48, out
