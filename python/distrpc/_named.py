"""Functions called by name, across languages: a Python function registered with
:func:`function` is called from Rust through a typed handle (``Function::named``), or from
Python with its name in place of the function (``rpc.rpc_sync("worker1", "math.hypot",
args=(3, 4))``); a Rust ``#[distrpc::function]`` is called from Python the same way. Arguments
and results travel in MessagePack, as Rust functions encode them: ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes``, lists and tuples (which arrive as lists), dicts, and numpy arrays
and CPU torch tensors (out of band, in the frame's tensor table; they arrive as numpy arrays
over the receive buffer).

Example::

    import distrpc

    @distrpc.function(name="geometry.hypot")
    def hypot(a: float, b: float) -> float:
        return (a * a + b * b) ** 0.5

    # on another worker, Python:
    #   rpc.rpc_sync("worker1", "geometry.hypot", args=(3, 4)) == 5.0
    # or Rust:
    #   let hypot = Function::<(f64, f64), f64>::named("geometry.hypot");
    #   rpc.rpc_sync("worker1", &hypot, (3.0, 4.0))? == 5.0
"""

from __future__ import annotations

import threading
import traceback
from typing import Any, Callable, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

_functions: dict[str, Callable[..., Any]] = {}
_lock = threading.Lock()


@overload
def function(func: F, *, name: str | None = None) -> F: ...
@overload
def function(func: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
def function(func: Any = None, *, name: str | None = None) -> Any:
    """Registers ``func`` under ``name`` (by default ``module.qualname``) so that any worker,
    Python or Rust, can call it by that name. The function itself is returned unchanged.

    >>> @function(name="doc.double")
    ... def double(x):
    ...     return 2 * x
    >>> registered("doc.double") is double
    True
    """

    def register(f: F) -> F:
        key = name or f"{f.__module__}.{f.__qualname__}"
        with _lock:
            existing = _functions.get(key)
            if existing is not None and existing is not f:
                raise ValueError(f"{key!r} is already registered, for {existing!r}")
            _functions[key] = f
        return f

    return register(func) if func is not None else register


def registered(name: str) -> Callable[..., Any] | None:
    """The function registered under ``name``, if any."""
    return _functions.get(name)


def run(call: Any, name: str, args: list, worker_info: Any) -> None:
    """Runs the function registered as ``name`` with ``args`` (decoded) and answers ``call``
    with its result in MessagePack, or with the exception it raised (type and torch's
    ``On WorkerInfo(...)`` message)."""
    try:
        func = _functions.get(name)
        if func is None:
            raise LookupError(
                f"no function named {name!r} on {worker_info.name}: register it with "
                "@distrpc.function(name=...) in a module the worker imports"
            )
        result = func(*args)
        args.clear()  # the arguments (and the receive buffer under their arrays) go first
        call.reply_named(result)
    except Exception as e:  # the function's, or a result MessagePack cannot carry
        call.fail(type(e).__name__, f"On {worker_info}:\n{e!r}\n{traceback.format_exc()}")
