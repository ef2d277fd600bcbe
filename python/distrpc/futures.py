"""``torch.futures`` without torch: :class:`Future` with ``wait``, ``value``, ``done``, ``then``,
``add_done_callback``, ``set_result``, ``set_exception``, and :func:`wait_all`,
:func:`collect_all`. ``rpc_async`` returns one; so may an ``@async_execution`` function.

Example::

    from distrpc.futures import Future, wait_all

    f = Future()
    g = f.then(lambda fut: fut.value() * 2)
    f.set_result(21)
    assert g.wait() == 42 and wait_all([f, g]) == [21, 42]
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
S = TypeVar("S")

__all__ = ["Future", "collect_all", "wait_all"]

_log = logging.getLogger(__name__)


def _run_callback(callback: Callable[[Any], None], fut: Any) -> None:
    # As torch does: a callback's exception is logged, and the other callbacks (and whoever
    # completed the future — an RPC thread, perhaps) go on.
    try:
        callback(fut)
    except Exception as e:  # noqa: BLE001 - logged, like torch's pybind wrapper
        _log.error("Got the following error when running the callback: %r", e, exc_info=e)


class Future(Generic[T]):
    """A result that may not be there yet. Callbacks run on the thread that completes it (at
    once, on the calling thread, if it is complete already)."""

    def __init__(self) -> None:
        self._done = threading.Condition(threading.Lock())
        self._completed = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] = []

    def done(self) -> bool:
        """Whether the result (or exception) is set."""
        return self._completed

    def wait(self) -> T:
        """Blocks until the result is set, and returns it (or raises its exception)."""
        with self._done:
            self._done.wait_for(lambda: self._completed)
        return self.value()

    def value(self) -> T:
        """The result of a completed future (raises its exception)."""
        if not self._completed:
            raise RuntimeError("the future is not done yet")
        if self._error is not None:
            raise self._error
        return self._value

    def then(self, callback: Callable[[Future[T]], S]) -> Future[S]:
        """A future of ``callback(self)``, run once this one completes; an exception in the
        callback completes the new future with it."""
        nxt: Future[S] = Future()

        def run(fut: Future[T]) -> None:
            try:
                nxt.set_result(callback(fut))
            except BaseException as e:  # noqa: BLE001 - it becomes the future's exception
                nxt.set_exception(e)

        self.add_done_callback(run)
        return nxt

    def add_done_callback(self, callback: Callable[[Future[T]], None]) -> None:
        """Calls ``callback(self)`` once this future completes. An exception it raises is
        logged (as torch does), not raised: to see it, use :meth:`then`."""
        with self._done:
            if not self._completed:
                self._callbacks.append(callback)
                return
        _run_callback(callback, self)

    def set_result(self, result: T) -> None:
        """Completes the future with ``result``."""
        self._complete(result, None)

    def set_exception(self, error: BaseException) -> None:
        """Completes the future with ``error``, which ``wait`` and ``value`` raise."""
        self._complete(None, error)

    def _complete(self, value: Any, error: BaseException | None) -> None:
        with self._done:
            if self._completed:
                raise RuntimeError("the future is already completed")
            self._value, self._error, self._completed = value, error, True
            callbacks, self._callbacks = self._callbacks, []
            self._done.notify_all()
        for callback in callbacks:
            _run_callback(callback, self)


def collect_all(futures: list[Future]) -> Future[list[Future]]:
    """A future of the list of ``futures``, completed once all of them are."""
    result: Future[list[Future]] = Future()
    if not futures:
        result.set_result([])
        return result
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            result.set_result(list(futures))

    for f in futures:
        f.add_done_callback(one_done)
    return result


def wait_all(futures: list[Future]) -> list:
    """Waits for every future and returns their values in order; raises the first exception
    (torch's ``torch.futures.wait_all``)."""
    return [f.wait() for f in collect_all(futures).wait()]
