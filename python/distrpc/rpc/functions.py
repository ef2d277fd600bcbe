"""``torch.distributed.rpc.functions``: :func:`async_execution`."""

from __future__ import annotations

import functools
from typing import Any, Callable


def async_execution(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Marks ``fn`` as returning a future (``distrpc.futures.Future`` or
    ``torch.futures.Future``): the callee answers when that future completes, and no thread
    waits for it meanwhile (torch's ``@rpc.functions.async_execution``).

    Example::

        @rpc.functions.async_execution
        def async_add(to, x, y):
            return rpc.rpc_async(to, operator.add, args=(x, y)).then(lambda f: f.wait() + 1)
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    wrapper._wrapped_async_rpc_function = fn  # torch's marker
    return wrapper
