"""What distributed autograd records on each worker (torch's ``DistAutogradContainer`` and its
send/receive functions, FAST mode): the contexts this worker created or joined, and how a call
made inside one ties the graphs of its two ends together. The passes that carry gradients back
are in :mod:`distrpc.autograd`; this module makes no call of its own.

A call made while the thread runs in a context carries the context's id (a ``PythonUDF`` goes
as ``(func, args, kwargs, context_id)``): the callee joins the context and runs the function
in it, so that what it sends back, or on, is recorded there too. Each tensor that requires
grad in a call or result sent in a context carries ``(context, message, index)`` in its own
pickle: the message id is taken when the first such tensor is pickled, and a message without
one costs no more than outside a context::

    worker0 (context 7)                              worker1
    rpc_sync(w1, f, (x,))
      (f, (x[7, m1, 0],), {}, 7)  ──────────────►  joins 7; x' = Recv[w0, m1, 0](x)
      sends[m1] = [x]                               y = f(x')  (under context 7)
                         ◄──────────────────────  y[7, m2, 0]; sends[m2] = [y]
      y' = Recv[w1, m2, 0](y)

    backward(7, [loss(y')])
      local pass reaches Recv[w1, m2, 0] ───grad──►  pass from sends[m2] reaches Recv[w0, m1, 0]
      pass from sends[m1]: grads of x's graph ◄grad─┘
      into context 7, never into .grad      (the worker calling backward delivers every
                                             gradient: distrpc.autograd._engine)

A received tensor that requires grad becomes the output of a ``Recv`` node that remembers
``(sender, message, index)``; its backward hands the gradient to the pass running on its
thread, which delivers it to ``sender`` when the local graph is done. A sent tensor is kept
in ``sends[message]`` until the context is released.

Example (what the front does for a call, in a context made by the public ``context()``)::

    with running(ctx):
        payload, buffers = _internal.serialize(udf, to)   # its tensors recorded as sent
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import sys
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple


class _Local(threading.local):
    """What this thread is sending: the message being pickled (``sending``) and the
    outbox of a backward pass. (Defaults on the class: a missing thread-local attribute
    costs an exception on every read.)"""

    sending: Any = None
    outbox: Any = None


class _Running(threading.local):
    """``context``: the context this thread runs in (:func:`running`)."""

    context: Any = None


_local = _Local()
running_in = _Running()
_lock = threading.Lock()
_contexts: dict[int, Context] = {}
#: Ids of contexts released here lately: a late message naming one does not bring it back.
_released: collections.deque[int] = collections.deque(maxlen=4096)
_released_set: set[int] = set()
_rank = 0
_next_context = itertools.count()
_next_message = itertools.count()
#: Ids carry the worker that made them in their top 16 bits, as torch's do.
ID_BITS = 48
#: At most this many contexts live on a worker: a peer's messages naming more are refused.
MAX_CONTEXTS = 1 << 16


class Context:
    """One distributed autograd context on this worker: the workers it reached (to release it
    there too), the tensors its messages sent (where gradients coming back start), and the
    gradients accumulated for this worker's leaves."""

    def __init__(self, context_id: int, registered: bool = True) -> None:
        self.id = context_id
        self.registered = registered
        self.lock = threading.Lock()
        self.known: set[int] = set()
        self.sends: dict[int, list[Any]] = {}
        self.grads: dict[Any, Any] = {}
        self.passes = 0
        #: Whether this worker sent on, untouched, a tensor it had received in this context:
        #: the gradient of such a tensor may skip it (:attr:`Edge.via`), so its passes route.
        self.routes = False

    def sent(self, message: int, tensor: Any) -> int:
        """Records ``tensor`` as sent in ``message``: its index there."""
        with self.lock:
            tensors = self.sends.setdefault(message, [])
            tensors.append(tensor)
            return len(tensors) - 1

    def sent_tensors(self, message: int) -> list[Any]:
        """The tensors ``message`` sent (an error if this worker sent no such message)."""
        with self.lock:
            tensors = self.sends.get(message)
        if tensors is None:
            raise RuntimeError(
                f"autograd context {self.id} on worker {_rank} sent no message {message} "
                "with tensors that require grad"
            )
        return tensors

    def has_sends(self) -> bool:
        """Whether a message of this context sent tensors from here (a gradient may come
        back through them and run this worker's graph again)."""
        with self.lock:
            return bool(self.sends)

    def accumulate(self, leaves: list[Any], grads: tuple) -> None:
        """Adds ``grads`` (one per leaf, ``None`` where it had none) into the context."""
        with self.lock:
            for leaf, grad in zip(leaves, grads):
                if grad is None or leaf is _dummy_leaf:
                    continue
                held = self.grads.get(leaf)
                self.grads[leaf] = grad if held is None else held + grad

    def gradients(self) -> dict[Any, Any]:
        """The gradients accumulated here, ``{tensor: grad}``."""
        with self.lock:
            return dict(self.grads)

    def reached(self, worker: int) -> None:
        """Notes that a message of this context went to or came from ``worker``."""
        if worker != _rank and worker not in self.known:  # (read without the lock: a set)
            with self.lock:
                self.known.add(worker)

    def workers(self) -> set[int]:
        """The workers messages of this context went to or came from."""
        with self.lock:
            return set(self.known)

    @contextlib.contextmanager
    def backward_pass(self) -> Iterator[None]:
        """Counts a backward pass running here (``num_current_backward_passes``)."""
        with self.lock:
            self.passes += 1
        try:
            yield
        finally:
            with self.lock:
                self.passes -= 1

    def forget(self) -> None:
        """Drops the tensors its messages sent and its gradients (at release). The graph behind
        a tensor a worker sent on may hold this context (through a ``Recv`` node's edge): a
        cycle through torch's graph, which Python's collector does not see, so a released
        context that kept them would keep its graph and received buffers for good."""
        with self.lock:
            self.sends.clear()
            self.grads.clear()

    def __repr__(self) -> str:
        return f"autograd context {self.id}"


def init(rank: int) -> None:
    """Makes this worker's context and message ids carry ``rank`` (``init_rpc`` calls it)."""
    global _rank
    _rank = rank


def new_context() -> Context:
    """A new context made here, registered."""
    ctx = Context((_rank << ID_BITS) | next(_next_context))
    with _lock:
        _contexts[ctx.id] = ctx
    return ctx


def context(context_id: int) -> Context | None:
    """The context ``context_id`` on this worker, if it is here."""
    with _lock:
        return _contexts.get(context_id)


def join(context_id: int, worker: int) -> Context:
    """The context ``context_id``, made here if ``worker``'s message is the first to bring it;
    a context released here lately comes back unregistered (what it records goes with it)."""
    ctx = _contexts.get(context_id)  # (a dict read needs no lock: the common case)
    if ctx is not None:
        ctx.reached(worker)
        return ctx
    with _lock:
        ctx = _contexts.get(context_id)
        if ctx is None:
            if len(_contexts) >= MAX_CONTEXTS:
                raise RuntimeError(
                    f"worker {_rank} holds {len(_contexts)} distributed autograd contexts, its "
                    f"limit: a message of context {context_id} from worker {worker} is refused"
                )
            ctx = Context(context_id, registered=context_id not in _released_set)
            if ctx.registered:
                _contexts[context_id] = ctx
    ctx.reached(worker)
    return ctx


def release(context_id: int) -> Context | None:
    """Forgets the context ``context_id`` here; the context, if it was here."""
    with _lock:
        ctx = _contexts.pop(context_id, None)
        if context_id not in _released_set:
            if len(_released) == _released.maxlen:
                _released_set.discard(_released[0])
            _released.append(context_id)
            _released_set.add(context_id)
    if ctx is not None:
        ctx.forget()
    return ctx


def debug_info() -> dict[str, int]:
    """torch's distributed autograd debug keys."""
    with _lock:
        contexts = list(_contexts.values())
    return {
        "num_autograd_contexts": len(contexts),
        "num_current_backward_passes": sum(1 for c in contexts if c.passes),
    }


def current() -> Context | None:
    """The context this thread runs in, if any."""
    return running_in.context


@contextlib.contextmanager
def _setting(local: threading.local, name: str, value: Any) -> Iterator[None]:
    """The block runs with ``local.name`` set to ``value`` (on this thread), then as before."""
    previous = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)


def call_in(ctx: Context | None, function: Any, *args: Any) -> Any:
    """``function(*args)`` run in ``ctx``: :func:`running` as one call (a callee's function and
    its answer run this way, on every call made in a context; no generator to drive)."""
    previous, running_in.context = running_in.context, ctx
    try:
        return function(*args)
    finally:
        running_in.context = previous


def running(ctx: Context | None) -> contextlib.AbstractContextManager:
    """Runs the block in ``ctx`` (none with ``None``): what it sends is recorded there."""
    return _setting(running_in, "context", ctx)


class _Sending:
    """The message being pickled on this thread, in ``ctx``: its id, taken when its first
    tensor that requires grad is pickled."""

    __slots__ = ("ctx", "message")

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.message = ctx, None


def sending(ctx: Context) -> Any:
    """Records the tensors that require grad pickled on this thread as sent in a new message
    of ``ctx``, until :func:`sent` is given what this returned. (Two calls rather than a
    context manager: each call in a context goes through them.)"""
    previous = _local.sending
    _local.sending = _Sending(ctx)
    return previous


def sent(previous: Any) -> None:
    """The end of what :func:`sending` began."""
    _local.sending = previous


def sent_index(tensor: Any) -> tuple | None:
    """While a message of a context is pickled: ``(context, message, index)`` for ``tensor``,
    recorded as sent (its index among the message's tensors that require grad); ``None``
    when it does not require grad or no such message is pickled."""
    out = _local.sending
    if out is None or not tensor.requires_grad:
        return None
    if out.message is None:
        out.message = _new_message()
    index = out.ctx.sent(out.message, tensor)
    edge = getattr(tensor.grad_fn, "edge", None)
    if edge is not None and edge.ctx is out.ctx:
        # A received tensor sent on untouched: its gradient may go straight to where it came
        # from, past this worker (``Edge.via``).
        out.ctx.routes = True
        return (out.ctx.id, out.message, index, edge.destination())
    return (out.ctx.id, out.message, index)


def sent_alone(ctx: Context, tensor: Any) -> int:
    """Records ``tensor`` as sent alone in a new message of ``ctx`` (as its index 0): the
    message's id."""
    message = _new_message()
    ctx.sent(message, tensor)
    return message


def _new_message() -> int:
    return (_rank << ID_BITS) | next(_next_message)


class Edge(NamedTuple):
    """Where the gradient of a received tensor goes: tensor ``index`` of ``message`` from
    ``sender``, in context ``ctx``; ``via``, when the sender had received that tensor itself
    and sent it on untouched, is where it came from (``(worker, message, index)``): the
    gradient goes there directly, skipping the sender (whose graph would only pass it on)."""

    ctx: Context
    sender: int
    message: int
    index: int
    via: tuple[int, int, int] | None = None

    def destination(self) -> tuple[int, int, int]:
        """``(worker, message, index)`` the gradient goes to: ``via`` if known."""
        return self.via if self.via is not None else (self.sender, self.message, self.index)


def received(tensor: Any, grad: tuple, sender: int | None) -> Any:
    """``tensor``, received from ``sender`` as the tensor ``grad`` = ``(context, message,
    index)`` — and ``via``, if the sender passed it on (:class:`Edge`) — names: the output of
    a ``Recv`` node whose gradient goes back to the sender (the context joined first)."""
    if sender is None:
        raise RuntimeError("a tensor sent in an autograd context can be unpickled only in an RPC")
    context_id, message, index, *via = grad
    if via:
        (via,) = via
        if type(via) is not tuple or len(via) != 3 or any(type(v) is not int for v in via):
            raise ValueError(f"a malformed origin of a received tensor: {via!r}")
    edge = Edge(join(context_id, sender), sender, message, index, via or None)
    return _recv_function().apply(_dummy(), tensor, edge)


#: Every ``Recv`` node takes this empty leaf as an input: a pass asks for its gradient, so the
#: engine runs the ``Recv`` nodes it reaches (they are excluded from what accumulates).
_dummy_leaf: Any = None
_recv: Any = None


def _dummy() -> Any:
    global _dummy_leaf
    if _dummy_leaf is None:
        _dummy_leaf = sys.modules["torch"].empty(0, requires_grad=True)
    return _dummy_leaf


def collecting(outbox: list) -> contextlib.AbstractContextManager:
    """A backward pass on this thread: the gradients its ``Recv`` nodes produce go into
    ``outbox`` as ``(edge, grad)``."""
    return _setting(_local, "outbox", outbox)


def _recv_function() -> Any:
    """torch's ``RecvRpcBackward``, as a ``torch.autograd.Function`` (made once torch is
    there)."""
    global _recv
    if _recv is not None:
        return _recv
    torch = sys.modules["torch"]

    class RecvRpcBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, dummy: Any, tensor: Any, edge: Edge) -> Any:
            ctx.edge = edge
            # A new tensor over the same memory, not a view: the program may change it in
            # place, as any received tensor.
            return tensor.detach()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            outbox = _local.outbox
            if outbox is None:
                raise RuntimeError(
                    f"a tensor received in {ctx.edge.ctx} takes its gradient through "
                    "distrpc.autograd.backward(context_id, roots), not a local backward"
                )
            outbox.append((ctx.edge, grad))
            return None, None, None

    _recv = RecvRpcBackward
    return _recv
