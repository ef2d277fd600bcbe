"""The backward passes of distributed autograd (torch's ``DistEngine``, FAST mode) and the
release of contexts across the group.

A pass runs one worker's graph from some tensors — the roots on the worker that calls
:func:`backward`, the tensors a message sent when their gradients come back — with
``torch.autograd.grad``, asking for the gradients of every leaf it reaches: the leaves' go into
the context there, and the ``Recv`` nodes it reaches hand theirs to the pass, which returns them
(:class:`~distrpc._autograd.Edge`: the worker a tensor came from, the message, its index).

The worker that calls :func:`backward` drives the whole pass: it runs its own graph, sends each
message's gradients to the worker that sent the message (:func:`_propagate` there runs that
worker's graph and answers with the gradients *it* reached), runs those meant for itself, and so
on until no gradient is left to deliver and no pass is running. So it returns when the whole
distributed pass is done, raises the first failure (a worker's exception, a dead worker), naming
its worker, and no thread anywhere waits on another worker meanwhile::

    driver (w0)              w1                    w2
    pass(roots) ──grads m2──► pass(sends[m2])
                ◄─grads m1──┘ (for w0's message)
    pass(sends[m1]) ──grads m5────────────────────► pass(sends[m5])
                    ◄─────────────────────────────┘ (none left): done

A model driven from one worker (the trainer calls each stage in turn, as torch's tutorials do)
takes two messages per remote pass this way, against four when each worker forwards gradients
itself and answers only once everything after it is done (torch's way); gradients for a tensor
one worker sent another directly travel through the driver instead. When the only thing left
to do is one remote pass (a chain of stages: the common case), the driver waits for it as
``rpc_sync``'s caller does, reading the answer from the connection itself; otherwise the passes
run as futures, answered through the thread that completes them.

A gradient may reach the same nodes twice (two messages whose graphs meet); each pass adds its
part (gradients are linear in what flows in), and the graph is kept for the next one until the
context is released.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from .. import _autograd, _internal, _pool, _state

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
        _drive(ctx, _run_pass(ctx, roots, grads, retain))


def _drive(ctx: Any, reached: list) -> None:
    """Delivers the gradients ``reached`` (``(sender, message, index, grad)`` each) and those
    the passes they start reach in turn, until none is left; raises the first failure once no
    pass runs."""
    me = _state.require().me.id
    answers: Any = queue.SimpleQueue()
    running = 0
    failure: BaseException | None = None
    while True:
        messages = _by_message(reached)
        if running == 0 and len(messages) == 1:
            (((sender, message), items),) = messages.items()
            if sender != me:
                # A lone remote pass (a chain of stages, the common case): this thread waits
                # for it as rpc_sync does, reading the answer itself — no hand-off through the
                # thread completing futures, one wake-up instead of three.
                args = (ctx.id, message, items)
                error, reached = _outcome_of(_call_sync, sender, _propagate, args)
                if error is not None:
                    failure = failure or error
                    reached = []
                continue
        # The other workers' passes first, so that they run while this worker runs its own.
        for (sender, message), items in messages.items():
            if sender != me:
                fut = _call(sender, _propagate, (ctx.id, message, items))
                fut.add_done_callback(lambda f: answers.put(_outcome(f)))
                running += 1
        for (sender, message), items in messages.items():
            if sender == me:  # what this worker sent: its own graph, here
                try:
                    answers.put((None, _local_pass(ctx, message, items)))
                except Exception as e:  # noqa: BLE001 - raised once no pass runs
                    answers.put((e, None))
                running += 1
        if running == 0:
            break
        # (A pool thread driving an RRef's backward counts as blocked meanwhile.)
        error, reached = _pool.waiting(answers.get)
        running -= 1
        if error is not None:
            failure = failure or error
            reached = []
    if failure is not None:
        raise failure


def _call(rank: int, function: Any, args: tuple) -> Any:
    """``rpc_async(rank, function, args)`` outside any context (what the engine sends is no
    part of a graph), made here from the worker's agent: this engine sits below the RPC API,
    as torch's does (``RRef.backward`` runs it)."""
    state, to, name, payload, buffers = _pickled(rank, function, args)
    fut = _state.future()
    # (Timeout None: the default.)
    state.track(lambda: state.agent.rpc_async(to, name, payload, buffers, None), fut, rank)
    return fut


def _call_sync(rank: int, function: Any, args: tuple) -> Any:
    """:func:`_call`, waited for: the calling thread reads the answer itself (as
    ``rpc_sync``)."""
    state, to, name, payload, buffers = _pickled(rank, function, args)
    reply = _pool.waiting(state.agent.rpc_sync, to, name, payload, buffers, None)
    return _internal.reply_value(*reply, rank)


def _pickled(rank: int, function: Any, args: tuple) -> tuple:
    """``(state, destination name, function name, payload, buffers)`` of the call of
    ``function`` on ``args`` to worker ``rank``, pickled outside any context."""
    state = _state.require()
    udf = _internal.PythonUDF(function, args, {})
    payload, buffers = _autograd.call_in(None, _internal.serialize, udf, rank)
    return state, state.infos[rank].name, _internal.qualname(function), payload, buffers


def _outcome(fut: Any) -> tuple:
    return _outcome_of(fut.wait)


def _outcome_of(wait: Any, *args: Any) -> tuple:
    """``(None, wait(*args))``, or ``(the exception it raised, None)``."""
    try:
        return None, wait(*args)
    except Exception as e:  # noqa: BLE001 - the worker's failure, raised by _drive
        return e, None


def _by_message(reached: list) -> dict:
    """Gradients ``(sender, message, index, grad)`` grouped by the message their tensors came
    in: ``{(sender, message): [(index, grad), ...]}``."""
    messages: dict[tuple[int, int], list] = {}
    for sender, message, index, grad in reached:
        messages.setdefault((sender, message), []).append((index, grad))
    return messages


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
    """Runs this worker's graph from ``outputs`` with ``grads``: its leaves' gradients go into
    ``ctx``; returns those that reached received tensors, ``(sender, message, index, grad)``
    each: the worker the tensor came from, its message, its index there."""
    import torch

    reached: list = []
    # A tensor sent on as it was received (a trainer passing one stage's output to the next)
    # is a receive node itself: its gradient goes straight back, without the engine.
    through = [getattr(out.grad_fn, "edge", None) for out in outputs]
    if any(through):
        reached = [(edge, grad) for edge, grad in zip(through, grads) if edge is not None]
        outputs = [out for out, edge in zip(outputs, through) if edge is None]
        grads = [grad for grad, edge in zip(grads, through) if edge is None]
    if outputs:
        leaves = _leaves(outputs)
        with _autograd.collecting(reached):
            got = torch.autograd.grad(
                outputs, leaves, grads, retain_graph=retain, allow_unused=True
            )
        ctx.accumulate(leaves, got)
    return [(edge.sender, edge.message, edge.index, grad) for edge, grad in reached]


def _local_pass(ctx: Any, message: int, items: list) -> list:
    """The pass from the tensors ``message`` sent, with the gradients ``items`` (``(index,
    grad)`` each); the gradients it reached."""
    sent = ctx.sent_tensors(message)
    outputs = [sent[i] for i, _ in items]
    return _run_pass(ctx, outputs, [grad for _, grad in items], retain=True)


def _propagate(context_id: int, message: int, items: list) -> list:
    """Runs on the worker that sent ``message``, for the worker driving the pass: the pass from
    that message's tensors; answers with the gradients it reached (see the module docs)."""
    ctx = _autograd.context(context_id)
    if ctx is None:
        raise RuntimeError(
            f"Could not find autograd context with id: {context_id} "
            f"on {_state.require().me.name} (released before its backward pass ended?)"
        )
    with ctx.backward_pass():
        return _local_pass(ctx, message, items)


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
    fails (``tries`` in all); idempotent on the receiver. Its answer (``None``) wakes no
    thread here: only a failure comes back, to be retried."""

    def failed(e: BaseException) -> None:
        if tries > 1:
            timer = threading.Timer(
                delay, _send_release, (worker, context_id, tries - 1, delay * RELEASE_BACKOFF)
            )
            timer.daemon = True
            timer.start()
        else:
            _log.warning("autograd context %d not released on worker %d: %s", context_id, worker, e)

    try:
        state, to, name, payload, buffers = _pickled(
            worker, _release_context, (context_id, _state.require().me.id)
        )
        none = _internal._PICKLED_NONE  # what `_release_context` answers
        state.expect(
            lambda: state.agent.rpc_async_expecting(to, name, payload, buffers, none),
            failed,
            worker,
        )
    except RuntimeError:  # RPC is shut down here: the group's contexts go with it
        return
