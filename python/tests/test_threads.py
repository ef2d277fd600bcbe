"""distrpc._pool.torch_threads: every thread that runs torch code for distrpc takes torch's
intra-op thread count, and a torch still being imported by another thread never kills it."""

from __future__ import annotations

import sys
import threading
import types

from distrpc import _pool


def _in_a_thread(function):
    """What ``function()`` raised in a fresh thread (``None``), and its return."""
    out = {}

    def run():
        try:
            out["value"] = function()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return out.get("error"), out.get("value")


def test_a_half_imported_torch_is_left_for_later(monkeypatch):
    half = types.ModuleType("torch")  # what sys.modules holds while torch imports
    monkeypatch.setitem(sys.modules, "torch", half)

    def attempt():
        _pool.torch_threads()
        return getattr(_pool._local, "torch_threads", False)

    error, done = _in_a_thread(attempt)
    assert error is None and done is False


def test_the_thread_takes_torchs_count_once(monkeypatch):
    calls = []
    fake = types.ModuleType("torch")
    fake.get_num_threads = lambda: 3
    fake.set_num_threads = calls.append
    monkeypatch.setitem(sys.modules, "torch", fake)

    def twice():
        _pool.torch_threads()
        _pool.torch_threads()

    error, _ = _in_a_thread(twice)
    assert error is None and calls == [3]
