"""``RRef``: a reference to a value that lives on one worker (its owner), as torch's. Made by
:func:`distrpc.rpc.remote` or ``RRef(value)``; read with ``to_here``; used through proxies that
run its methods on the owner (``rref.rpc_sync().method(*args)``, ``rpc_async()``,
``remote()``). The value lives until no reference to it remains (distributed reference
counting, in Rust).

Example::

    counter = rpc.remote("worker1", collections.Counter, args=("hello",))
    counter.rpc_sync().update("world")          # runs on worker1
    assert counter.to_here()["l"] == 3
"""

from __future__ import annotations

import sys
from typing import Any, Generic, TypeVar

from .. import _autograd, _internal, _pool, _state
from ..autograd import _engine
from .worker import WorkerInfo

T = TypeVar("T")


def _invoke_method(obj: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """Runs on the owner: the method ``name`` of the referenced object (the creation's error,
    if it failed)."""
    if name == "__class__":  # `_get_type`: the class itself, not a new instance
        return type(_internal._handle_exception(obj))
    return getattr(_internal._handle_exception(obj), name)(*args, **kwargs)


class _Proxy:
    """``rref.rpc_sync()`` / ``rpc_async()`` / ``remote()``: attribute access gives a function
    that runs the referenced object's method of that name on its owner."""

    def __init__(self, rref: RRef, kind: str, timeout: float) -> None:
        self._rref, self._kind, self._timeout = rref, kind, timeout

    def __getattr__(self, name: str) -> Any:
        def method(*args: Any, **kwargs: Any) -> Any:
            return call_on(self._rref, self._kind, name, args, kwargs, self._timeout)

        return method


class RRef(Generic[T]):
    """A remote reference (torch's ``RRef``); ``RRef(value)`` makes one owned here. Generic in
    the type of its value, as torch's is: ``RRef[int]`` in annotations.

    >>> def total(counts: RRef[dict]) -> int:
    ...     return sum(counts.to_here().values())
    """

    def __init__(self, value: Any = None, type_hint: Any = None, *, _handle: Any = None) -> None:
        if _handle is None:
            _handle = _state.require().agent.rref(value)
        self._handle = _handle

    def owner(self) -> Any:
        """The owner, a ``WorkerInfo``."""
        rank, name = self._handle.owner()
        return WorkerInfo(name, rank)

    def owner_name(self) -> str:
        """The owner's name."""
        return self._handle.owner()[1]

    def is_owner(self) -> bool:
        """Whether this worker owns the value."""
        return self._handle.is_owner()

    def confirmed_by_owner(self) -> bool:
        """Whether the owner knows of this reference."""
        return self._handle.confirmed_by_owner()

    def local_value(self) -> T:
        """The value itself, on the owner (elsewhere an error names the owner)."""
        return _internal._handle_exception(self._handle.local_value())

    def to_here(self, timeout: float = -1) -> T:
        """A copy of the value, fetched from the owner (``timeout`` in seconds, -1: default).
        On the owner, the value itself (as torch's). Inside a distributed autograd context
        the fetch is recorded there, as torch's is: the gradient of a tensor fetched goes back
        to the owner's graph."""
        handle = self._handle
        if handle.is_owner():
            return self.local_value()
        if _autograd.current() is not None:
            udf = _internal.PythonUDF(_value, (), {})
            return call_with(self, "sync", udf, f"{self.owner_name()}.to_here", timeout)
        payload, buffers = _pool.waiting(handle.to_here, _state.timeout(timeout))
        return _internal.reply_value(payload, buffers, handle.owner_id)

    def _get_type(self, timeout: float = -1, blocking: bool = True) -> Any:
        """The type of the value, asked of the owner once and remembered (torch's private
        ``_get_type``); with ``blocking=False`` a future of it."""
        known = getattr(self, "_type", None)
        if known is None:
            if self.is_owner():
                known = type(self.local_value())
            elif blocking:
                known = call_on(self, "sync", "__class__", (), {}, timeout)
            else:
                fut = call_on(self, "async", "__class__", (), {}, timeout)
                return fut.then(lambda f: self._remember_type(f.wait()))
            self._type = known
        if blocking:
            return known
        fut = _state.future()
        fut.set_result(known)
        return fut

    def _remember_type(self, known: Any) -> Any:
        self._type = known
        return known

    def rpc_sync(self, timeout: float = -1) -> Any:
        """A proxy running the value's methods on the owner, waiting for each result."""
        return _Proxy(self, "sync", timeout)

    def rpc_async(self, timeout: float = -1) -> Any:
        """A proxy running the value's methods on the owner, each returning a future."""
        return _Proxy(self, "async", timeout)

    def remote(self, timeout: float = -1) -> Any:
        """A proxy running the value's methods on the owner, each result kept there behind a
        new ``RRef``."""
        return _Proxy(self, "remote", timeout)

    def backward(self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False) -> None:
        """Runs backward from the value (a tensor), on its owner: a local backward into
        ``.grad`` with ``dist_autograd_ctx_id`` -1, else the distributed pass of that
        context (``distrpc.autograd.backward``), which the owner must have joined.

        Example::

            with distrpc.autograd.context() as context_id:
                loss_rref = rpc.remote("worker1", compute_loss, args=(x,))
                loss_rref.backward(context_id)
        """
        if self.is_owner():
            _backward(self.local_value(), dist_autograd_ctx_id, retain_graph)
            return
        udf = _internal.PythonUDF(_backward, (dist_autograd_ctx_id, retain_graph), {})
        with _autograd.running(None):  # the request itself is no part of the context's graph
            call_with(self, "sync", udf, f"{self.owner_name()}.backward", -1)

    def __reduce__(self) -> Any:
        # Inside an RPC the pickler forks the reference instead (distrpc._internal).
        raise RuntimeError("RRef pickling is only allowed inside RPC calls.")

    def __repr__(self) -> str:
        return repr(self._handle)


def _value(obj: Any) -> Any:
    """Runs on the owner: the referenced object itself (``to_here`` in an autograd context)."""
    return _internal._handle_exception(obj)


def _backward(value: Any, context_id: int, retain_graph: bool) -> None:
    """Runs on the owner: ``RRef.backward`` from ``value``."""
    value = _internal._handle_exception(value)
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        raise RuntimeError(
            f"RRef should contain a tensor for .backward(), this one holds {type(value).__name__}"
        )
    if context_id == -1:
        value.backward(retain_graph=retain_graph)
    else:
        _engine.backward(context_id, [value], retain_graph=retain_graph)


def call_on(rref: RRef, kind: str, method: str, args: tuple, kwargs: dict, timeout: float) -> Any:
    """A proxy's call: ``method`` of the referenced object, run on its owner."""
    udf = _internal.PythonUDF(_invoke_method, (method, args, kwargs), {})
    return call_with(rref, kind, udf, f"{rref.owner_name()}.{method}", timeout)


def call_with(rref: RRef, kind: str, udf: Any, name: str, timeout: float) -> Any:
    """``udf`` run on ``rref``'s owner with the referenced object as its first argument: its
    result (``kind`` "sync"), a future of it ("async"), a reference to it ("remote"), or the
    call started, its result read when the caller waits for it ("start": :class:`_Started`)."""
    state = _state.require()
    handle = rref._handle
    owner = handle.owner_id
    payload, buffers = _internal.serialize(udf, owner)
    timeout = _state.timeout(timeout)
    if kind == "sync":
        reply = _pool.waiting(handle.rpc_sync, name, payload, buffers, timeout)
        return _internal.reply_value(*reply, owner)
    if kind == "remote":
        return RRef(_handle=handle.remote(name, payload, buffers, timeout))
    if kind == "start":
        return _Started(handle.rpc_start(name, payload, buffers, timeout), owner)
    fut = _state.future()
    state.track(
        lambda: state.agent.rref_rpc_async(handle, name, payload, buffers, timeout), fut, owner
    )
    return fut


class _Started:
    """A call :func:`call_with` started (kind "start"): sent, its reply read by the thread that
    calls :meth:`wait` — one wake-up, where a future's result is read by one thread and handed
    to the waiter by another. For a caller with work of its own to do before it waits."""

    def __init__(self, started: Any, owner: int) -> None:
        self._started, self._owner = started, owner

    def wait(self) -> Any:
        """The call's result, or the exception it raised (once)."""
        return _internal.reply_value(*_pool.waiting(self._started.wait), self._owner)


def _rebuild_from_fork(fork: bytes, sender: int) -> RRef:
    """The reference a pickle carried, made from the fork its sender made."""
    return RRef(_handle=_state.require().agent.rref_from_fork(fork, sender))


# The pickler forks references and the unpickler rebuilds them through these.
_internal.rref_type = RRef
_internal.rebuild_rref = _rebuild_from_fork
