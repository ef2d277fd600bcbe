"""The threads that run calls on this worker (torch's ``num_worker_threads``): that many, plus
one more for each that blocks waiting on a call of its own — a function calling ``rpc_sync``
or ``to_here`` inside — so that nested calls never run out of threads, however many are in
flight. A thread beyond the pool's size ends once it is idle again.

Example (a blocking wait, marked for the pool if a pool thread makes it)::

    reply = _pool.waiting(agent.rpc_sync, to, name, payload, buffers, timeout)
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable

_log = logging.getLogger(__name__)


class _Local(threading.local):
    """This thread's pool (if it is one's) and whether it took torch's thread count.
    (Defaults on the class: a missing thread-local attribute costs an exception per read.)"""

    pool: Any = None
    torch_threads = False


_local = _Local()

#: At most this many threads (blocked ones included): calls beyond wait in the queue.
LIMIT = 512
#: Seconds an idle thread waits for a call before it looks whether it is surplus (each look
#: wakes it: 16 idle threads at 50 ms were 320 wake-ups a second).
IDLE_WAIT = 1.0


class Pool:
    """``size`` threads taking calls from ``next_call`` and running them with ``run``, and
    more while some block (see the module docs)."""

    def __init__(self, size: int, next_call: Callable[[float], Any], run: Callable[[Any], None]):
        self.size = max(1, size)
        self._next_call, self._run = next_call, run
        self._lock = threading.Lock()
        self._alive = 0
        self._blocked = 0
        self._started = 0
        self.threads: list[threading.Thread] = []
        self.stopping = threading.Event()

    def start(self) -> None:
        """Starts the pool's threads."""
        for _ in range(self.size):
            self._spawn()

    def alive(self) -> int:
        """How many threads run or wait for calls now."""
        with self._lock:
            return self._alive

    def _spawn(self) -> None:
        with self._lock:
            self._alive += 1
            self._started += 1
            name = f"distrpc-py-{self._started - 1}"
            t = threading.Thread(target=self._serve, name=name, daemon=True)
            self.threads = [t for t in self.threads if t.is_alive()] + [t]
        t.start()

    def _serve(self) -> None:
        # Each thread takes calls from the agent (waiting with the interpreter lock released)
        # and runs them under it, as torch's python_rpc_handler does.
        _local.pool = self
        while not self.stopping.is_set():
            # The agent wakes waiting threads when the worker stops (`Agent.wake`): the
            # timeout is only the bound on a surplus thread's idle life.
            item = self._next_call(IDLE_WAIT)
            if item is not None:
                if not _local.torch_threads:
                    torch_threads()
                self._run(item)
            if self._alive - self._blocked > self.size:  # read again under the lock
                with self._lock:
                    if self._alive - self._blocked > self.size:
                        self._alive -= 1  # a surplus thread, idle again: it ends
                        return
        with self._lock:
            self._alive -= 1

    def _block(self) -> None:
        with self._lock:
            self._blocked += 1
            grow = self._alive - self._blocked < self.size and self._alive < LIMIT
        if grow:
            self._spawn()

    def _unblock(self) -> None:
        with self._lock:
            self._blocked -= 1


def torch_threads() -> None:
    """Gives this thread torch's intra-op thread count (``torch.set_num_threads``), once torch
    is loaded: OpenMP keeps the count per thread, and a thread Python started has OpenMP's
    default (every core) instead — its torch kernels then start a team of that many spinning
    threads, on a machine the group's other workers share (an LSTM's backward took ten times
    as long). torch does the same for the threads of its own pools."""
    if _local.torch_threads:
        return
    torch = sys.modules.get("torch")
    # None while another thread is still importing torch: tried again at the next call.
    set_threads = getattr(torch, "set_num_threads", None)
    get_threads = getattr(torch, "get_num_threads", None)
    if set_threads is None or get_threads is None:
        return
    try:
        set_threads(get_threads())
    except Exception:  # noqa: BLE001 - torch half imported: a thread must never die of it
        return
    _local.torch_threads = True


def waiting(wait: Callable[..., Any], *args: Any) -> Any:
    """``wait(*args)``, the calling thread counted as blocked meanwhile if it is a pool thread
    (another thread takes its place in the pool)."""
    pool = _local.pool
    if pool is None:
        return wait(*args)
    pool._block()
    try:
        return wait(*args)
    finally:
        pool._unblock()
