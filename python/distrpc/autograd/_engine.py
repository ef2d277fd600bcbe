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

A trainer that passes a stage's output on to the next stage untouched (``h = stage.rpc_sync()
.forward(h)`` in a loop) marks what it sends so (:attr:`~distrpc._autograd.Edge.via`): the
gradient of that tensor belongs to the stage before, and the trainer's graph would only pass it
on. Such a context's passes are *routed* (:func:`_drive_routed`): each stage sends what its pass
reached straight to the stage it belongs to, and only what belongs to the driver comes back,
with the share of the pass's weight each stage was given — the driver is done when the shares
add up (termination by weights, as in credit-recovery schemes)::

    driver (w0)          w3                  w2                  w1
    pass(loss) ──m3──►  pass ──────m2──────► pass ──────m1──────► pass
               ◄──────────────────────── grads for w0's message, weight 1 ┘

Four messages for three stages instead of six; a failure anywhere (an exception, a worker that
died under a pass sent to it, a timeout) goes to the driver at once, named, and raises there.

A gradient may reach the same nodes twice (two messages whose graphs meet); each pass adds its
part (gradients are linear in what flows in), and the graph is kept for the next one until the
context is released.
"""

from __future__ import annotations

import itertools
import logging
import math
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
    if ctx.routes:
        _drive_routed(ctx, reached)
        return
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


#: The inboxes of routed passes driven here, by ``(context, pass)``: what comes back to the
#: driver (:func:`_deliver`).
_inboxes: dict[tuple[int, int], Any] = {}
_inboxes_lock = threading.Lock()
_next_pass = itertools.count(1)


def _drive_routed(ctx: Any, reached: list) -> None:
    """:func:`_drive` for a context whose gradients may skip a worker (one that sent on what
    it received: a trainer passing each stage's output to the next). Each remote pass gets a
    share of the pass's weight and sends what it reaches straight to the workers it belongs
    to (:func:`_propagate_routed`), and only what belongs to this worker, or nothing, back
    here with its share (:func:`_deliver`): a chain of stages driven from here takes one
    message a stage and one back, not two a stage. The pass is done when the shares that
    came back add up to what was given out; the first failure raises at once (a worker's
    exception, or a worker it sent to that died or timed out, named), as does no word from
    any of them for the RPC timeout."""
    state = _state.require()
    me = state.me.id
    key = (ctx.id, next(_next_pass))
    inbox: Any = queue.SimpleQueue()
    with _inboxes_lock:
        _inboxes[key] = inbox
    timeout = state.agent.rpc_timeout() or None  # (0: no timeout, as torch's)
    owed = (0, 1)  # the weight given out and not back yet: (numerator, denominator)
    started: set[int] = set()
    try:
        while True:
            local = []
            for (sender, message), items in _by_message(reached).items():
                if sender == me:
                    local.append((message, items))
                    continue
                owed = (owed[0] + owed[1], owed[1])
                started.add(sender)

                def failed(e: BaseException, sender: int = sender) -> None:
                    inbox.put((_passing_failure(state, sender, e), [], (0, 1)))

                args = (ctx.id, message, items, me, key[1], (1, 1))
                _route(sender, _propagate_routed, args, failed)
            reached = []
            for message, items in local:
                reached += _local_pass(ctx, message, items)
            if reached:
                continue
            if owed[0] == 0:
                return
            try:
                error, reached, (num, den) = _pool.waiting(inbox.get, True, timeout)
            except queue.Empty:
                names = sorted(state.infos[w].name for w in started)
                raise RuntimeError(
                    f"the distributed backward pass of {ctx} had no word from {names} "
                    f"in {timeout:.0f} s (the RPC timeout)"
                ) from None
            if isinstance(error, BaseException):
                raise error
            if error is not None:
                _internal._handle_exception(error)  # a worker's failure: raised as it was
            if type(num) is not int or type(den) is not int or num < 0 or den <= 0:
                raise RuntimeError(f"a malformed weight came back in {ctx}: {num}/{den}")
            owed = _less(owed, num, den)
            if owed[0] < 0:
                raise RuntimeError(f"more weight came back in {ctx} than was given out")
    finally:
        with _inboxes_lock:
            del _inboxes[key]


def _less(owed: tuple[int, int], num: int, den: int) -> tuple[int, int]:
    """``owed - num / den``, exactly, in lowest terms."""
    top, bottom = owed[0] * den - num * owed[1], owed[1] * den
    common = math.gcd(top, bottom)
    return top // common, bottom // common


def _propagate_routed(
    context_id: int, message: int, items: list, driver: int, token: int, weight: tuple
) -> None:
    """Runs on the worker that sent ``message``, for a routed pass driven by ``driver``
    (:func:`_drive_routed`): the pass from that message's tensors, then what it reaches sent
    on — to the workers it belongs to, directly, and what belongs to the driver back to it —
    with ``weight`` (``(numerator, denominator)``) shared among them. A failure goes to the
    driver, named."""
    state = _state.require()
    me = state.me.id
    out: dict[tuple[int, int], list] = {}
    back = []
    try:
        ctx = _known_context(context_id)
        with ctx.backward_pass():
            pending = _local_pass(ctx, message, items)
            while pending:  # what this worker sent itself runs here
                local = []
                for item in pending:
                    sender = item[0]
                    if sender == driver:
                        back.append(item)
                    elif sender == me:
                        local.append(item)
                    else:
                        out.setdefault((sender, item[1]), []).append((item[2], item[3]))
                pending = []
                for (_, local_message), local_items in _by_message(local).items():
                    pending += _local_pass(ctx, local_message, local_items)
    except Exception as e:  # noqa: BLE001 - the driver raises it
        _send_back(state, driver, (context_id, token, [], (0, 1), _internal._failure(e, state.me)))
        return
    answers = bool(back) or not out  # (with nothing to send on, its share goes back alone)
    num, den = weight
    share = (num, den * (len(out) + answers))
    for (sender, sent_message), sent_items in out.items():

        def failed(e: BaseException, sender: int = sender) -> None:
            error = _internal._failure(_passing_failure(state, sender, e), state.me)
            _send_back(state, driver, (context_id, token, [], (0, 1), error))

        args = (context_id, sent_message, sent_items, driver, token, share)
        _route(sender, _propagate_routed, args, failed)
    if answers:
        _send_back(state, driver, (context_id, token, back, share, None))


def _passing_failure(state: Any, worker: int, e: BaseException) -> RuntimeError:
    """The error of a routed pass sent to ``worker`` that did not answer as expected."""
    return RuntimeError(
        f"{state.infos[worker].name} failed in a distributed backward pass "
        f"(sent from {state.me.name}): {e}"
    )


def _deliver(context_id: int, token: int, items: list, weight: tuple, error: Any) -> None:
    """Runs on the driver of a routed pass: what a worker's pass reached that belongs here,
    its share of the weight, or its failure (dropped if the pass is over)."""
    with _inboxes_lock:
        inbox = _inboxes.get((context_id, token))
    if inbox is not None:
        inbox.put((error, items, weight))


def _route(rank: int, function: Any, args: tuple, failed: Any) -> None:
    """Calls ``function(*args)`` on worker ``rank``, which answers ``None``: that answer wakes
    no thread here; ``failed`` gets any other outcome (the worker died, timed out, raised)."""
    state, to, name, payload, buffers = _pickled(rank, function, args)
    none = _internal._PICKLED_NONE
    state.expect(
        lambda: state.agent.rpc_async_expecting(to, name, payload, buffers, none), failed, rank
    )


def _send_back(state: Any, driver: int, args: tuple) -> None:
    """:func:`_deliver` on ``driver``; if that fails, the driver is gone with its pass."""

    def failed(e: BaseException) -> None:
        _log.warning("a routed backward pass could not answer %s: %s", state.infos[driver], e)

    try:
        _route(driver, _deliver, args, failed)
    except RuntimeError as e:  # RPC is shut down here
        failed(e)


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
    each: the worker the tensor came from, its message, its index there (where it came from
    before, if the sender only passed it on: :meth:`~distrpc._autograd.Edge.destination`)."""
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
    return [(*edge.destination(), grad) for edge, grad in reached]


def _local_pass(ctx: Any, message: int, items: list) -> list:
    """The pass from the tensors ``message`` sent, with the gradients ``items`` (``(index,
    grad)`` each); the gradients it reached."""
    sent = ctx.sent_tensors(message)
    outputs = [sent[i] for i, _ in items]
    return _run_pass(ctx, outputs, [grad for _, grad in items], retain=True)


def _propagate(context_id: int, message: int, items: list) -> list:
    """Runs on the worker that sent ``message``, for the worker driving the pass: the pass from
    that message's tensors; answers with the gradients it reached (see the module docs)."""
    ctx = _known_context(context_id)
    with ctx.backward_pass():
        return _local_pass(ctx, message, items)


def _known_context(context_id: int) -> Any:
    """The context ``context_id`` here, which a pass needs; an error if it is gone."""
    ctx = _autograd.context(context_id)
    if ctx is None:
        raise RuntimeError(
            f"Could not find autograd context with id: {context_id} "
            f"on {_state.require().me.name} (released before its backward pass ended?)"
        )
    return ctx


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
        _route(worker, _release_context, (context_id, _state.require().me.id), failed)
    except RuntimeError:  # RPC is shut down here: the group's contexts go with it
        return
