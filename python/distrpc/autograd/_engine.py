"""The backward passes of distributed autograd (torch's ``DistEngine``, FAST mode) and the
release of contexts across the group.

A pass runs this worker's graph from some tensors — the roots on the worker that calls
:func:`backward`, the tensors a message sent when their gradients come back — with
``torch.autograd.grad``, asking for the gradients of every leaf it reaches: the leaves' go into
the context, and the ``Recv`` nodes it reaches hand theirs to the pass, which sends them, one call
per message, to the workers the tensors came from (:func:`_propagate` there runs the next pass).
A pass is done when its own graph is and every pass it started is: so :func:`backward` returns
when the whole distributed pass is done, or raises the first failure, naming its worker.

A gradient may reach the same nodes twice (two messages whose graphs meet); each pass adds its
part (gradients are linear in what flows in), and the graph is kept for the next one until the
context is released.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .. import _autograd
from ..rpc import api
from ..rpc.functions import async_execution

_log = logging.getLogger(__name__)

#: Releases of a context are sent this many times at most, the first retry after this many
#: seconds, each wait this much longer (torch's ``sendWithRetries`` for its cleanup message).
RELEASE_TRIES = 5
RELEASE_DELAY = 1.0
RELEASE_BACKOFF = 1.5


def backward(context_id: int, roots: list, retain_graph: bool = False) -> None:
    """Runs the distributed backward pass of ``context_id`` from ``roots`` (see
    :func:`distrpc.autograd.backward`)."""
    import torch

    ctx = _autograd.context(context_id)
    if ctx is None:
        raise RuntimeError(f"Could not find autograd context with id: {context_id}")
    roots = list(roots)
    for root in roots:
        if not isinstance(root, torch.Tensor):
            raise TypeError(f"a root must be a tensor, not {type(root).__name__}")
        if not root.requires_grad:
            raise RuntimeError("requires_grad not set on root")
        if root.numel() != 1:
            raise RuntimeError(f"{root} is not a scalar, all roots need to be scalar")
        if root.grad_fn is None:
            raise RuntimeError(f"{root} does not have a valid gradient function.")
    grads = [torch.ones_like(root) for root in roots]
    # The graph stays while a gradient may come back through what this worker sent.
    retain = retain_graph or ctx.has_sends()
    with ctx.backward_pass():
        futures = _run_pass(ctx, roots, grads, retain)
        if len(futures) > 1:
            torch.futures.collect_all(futures).wait()  # every pass ends before one raises
        for fut in futures:
            fut.wait()  # the first failure, as the worker it came from raised it


def _leaves(roots: list) -> list:
    """The leaves of the graph under ``roots`` (those that require grad), each once."""
    leaves, seen = [], set()
    stack = []
    for root in roots:
        if root.grad_fn is not None:
            stack.append(root.grad_fn)
        elif id(root) not in seen:  # a leaf sent as it is: its gradient is what comes back
            seen.add(id(root))
            leaves.append(root)
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:
                leaves.append(variable)
            else:
                stack.append(node)
    return leaves


def _run_pass(ctx: Any, outputs: list, grads: list, retain: bool) -> list:
    """Runs this worker's graph from ``outputs`` with ``grads``; the futures of the passes it
    started elsewhere."""
    import torch

    leaves = _leaves(outputs)
    outbox: list = []
    with _autograd.collecting(outbox):
        got = torch.autograd.grad(outputs, leaves, grads, retain_graph=retain, allow_unused=True)
    ctx.accumulate(leaves, got)
    messages: dict[tuple[int, int], list] = {}
    for edge, grad in outbox:
        messages.setdefault((edge.sender, edge.message), []).append((edge.index, grad))
    with _autograd.running(None):  # gradients travel outside any context
        return [
            api.rpc_async(sender, _propagate, args=(ctx.id, message, items))
            for (sender, message), items in messages.items()
        ]


@async_execution
def _propagate(context_id: int, message: int, items: list) -> Any:
    """Runs on the worker that sent ``message``: the pass from its tensors, with the gradients
    ``items`` (``(index, grad)`` each); answers when that pass and those it started are done,
    holding no worker thread meanwhile. (torch runs passes on one engine thread; here the pool
    threads run them, each with torch's thread count: an A/B of the two showed no difference
    for the LSTM, one thread hop less per pass for the rest.)"""
    import torch

    done: Any = torch.futures.Future()
    try:
        ctx = _autograd.context(context_id)
        if ctx is None:
            raise RuntimeError(
                f"Could not find autograd context with id: {context_id} "
                f"on {api.get_worker_info().name} (released before its backward pass ended?)"
            )
        sent = ctx.sent_tensors(message)
        outputs = [sent[i] for i, _ in items]
        grads = [grad for _, grad in items]
        with ctx.backward_pass():
            futures = _run_pass(ctx, outputs, grads, retain=True)
    except Exception as e:  # noqa: BLE001 - the caller raises it
        done.set_exception(e)
        return done
    if not futures:
        done.set_result(None)
        return done

    def finish(all_done: Any) -> None:
        try:
            for fut in all_done.wait():
                fut.wait()
        except Exception as e:  # noqa: BLE001 - the first failure downstream
            done.set_exception(e)
            return
        done.set_result(None)

    torch.futures.collect_all(futures).add_done_callback(finish)
    return done


def release(ctx: Any) -> None:
    """Leaves ``ctx`` (made here): forgets it here and on every worker it reached."""
    _autograd.release(ctx.id)
    _release_around(ctx, origin=None)


def _release_around(ctx: Any, origin: int | None) -> None:
    for worker in ctx.workers():
        if worker != origin:
            _send_release(worker, ctx.id, RELEASE_TRIES, RELEASE_DELAY)


def _release_context(context_id: int, origin: int) -> None:
    """Runs on a worker the context reached: forgets it, and passes the release on to the
    workers it reached from here (once: a context already gone stops it)."""
    ctx = _autograd.release(context_id)
    if ctx is not None:
        _release_around(ctx, origin)


def _send_release(worker: int, context_id: int, tries: int, delay: float) -> None:
    """Sends the release of ``context_id`` to ``worker``, again after ``delay`` seconds if it
    fails (``tries`` in all); idempotent on the receiver."""
    try:
        with _autograd.running(None):
            me = api.get_worker_info().id
            fut = api.rpc_async(worker, _release_context, args=(context_id, me))
    except RuntimeError:  # RPC is shut down here: the group's contexts go with it
        return

    def retry(done: Any) -> None:
        try:
            done.wait()
        except Exception as e:  # noqa: BLE001 - any failure: retried, then logged
            if tries > 1:
                timer = threading.Timer(
                    delay, _send_release, (worker, context_id, tries - 1, delay * RELEASE_BACKOFF)
                )
                timer.daemon = True
                timer.start()
            else:
                _log.warning(
                    "autograd context %d not released on worker %d: %s", context_id, worker, e
                )

    fut.add_done_callback(retry)
