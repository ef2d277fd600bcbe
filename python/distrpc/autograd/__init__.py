"""``torch.distributed.autograd`` on distrpc: ``import distrpc.autograd as dist_autograd`` in
place of ``import torch.distributed.autograd as dist_autograd``.

Inside a :class:`context`, every ``rpc_sync``, ``rpc_async``, ``remote``, RRef proxy call and
``to_here`` records its tensors that require grad on both ends; :func:`backward` then runs the
graph of the whole group from the roots, and each worker's gradients stay in the context
(:func:`get_gradients`), never in ``.grad``. Leaving the context releases it on every worker it
reached. How it works: :mod:`distrpc._autograd` and :mod:`distrpc.autograd._engine`.

Example (worker0; ``worker1`` holds a layer behind ``layer_rref``)::

    import distrpc.autograd as dist_autograd

    with dist_autograd.context() as context_id:
        hidden = layer_rref.rpc_sync().forward(x)      # runs on worker1, recorded
        loss = head(hidden).sum()
        dist_autograd.backward(context_id, [loss])     # through worker1 and back
        grads = dist_autograd.get_gradients(context_id)  # {tensor: grad} of worker0's leaves
"""

from __future__ import annotations

from typing import Any

from .. import _autograd
from . import _engine

__all__ = ["backward", "context", "get_gradients"]


class context:  # noqa: N801 - torch's name
    """A distributed autograd context (torch's ``dist_autograd.context``): ``with context() as
    context_id:``. The id carries this worker's rank in its top 16 bits. Contexts do not nest
    on a thread."""

    def __enter__(self) -> int:
        if _autograd.current() is not None:
            raise RuntimeError("Already have an autograd context id for this thread.")
        self._ctx = _autograd.new_context()
        self._running = _autograd.running(self._ctx)
        self._running.__enter__()
        return self._ctx.id

    def __exit__(self, *exc: Any) -> None:
        self._running.__exit__(*exc)
        _engine.release(self._ctx)


def backward(context_id: int, roots: list, retain_graph: bool = False) -> None:
    """Runs the backward pass of the group from ``roots`` (scalar tensors) in the context
    ``context_id``: the gradients reaching a tensor received from another worker go back to
    it and continue through its graph, across any number of workers; each worker's leaves get
    theirs in the context. Returns when the whole pass is done; raises the first failure (an
    exception in a worker's backward, a dead worker), naming the worker. ``retain_graph``
    keeps the graph for another pass, as torch's does.

    Example::

        with dist_autograd.context() as context_id:
            loss = rpc.rpc_sync("worker1", torch.mul, args=(w, 2.0)).sum()
            dist_autograd.backward(context_id, [loss])
            assert dist_autograd.get_gradients(context_id)[w].eq(2).all()
    """
    _engine.backward(context_id, roots, retain_graph)


def get_gradients(context_id: int) -> dict:
    """This worker's gradients in the context ``context_id``: ``{tensor: grad}`` for each leaf
    here that a backward pass reached.

    Example::

        grads = dist_autograd.get_gradients(context_id)
        for param in model.parameters():
            param.grad = grads.get(param)
    """
    ctx = _autograd.context(context_id)
    if ctx is None:
        raise RuntimeError(f"Could not find autograd context with id: {context_id}")
    return ctx.gradients()
