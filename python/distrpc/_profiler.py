"""RPC profiling as torch does it (seed api.py ``_enable_rpc_profiler``, internal.py
``_build_rpc_profiling_key``): under torch's **legacy** autograd profiler
(``torch.autograd.profiler_legacy.profile``, the one torch's RPC supports), every call records
an event under ``rpc_sync#func(worker0 -> worker1)`` (``rpc_async#``, ``rpc_remote#``), the
callee runs the function under the same profiler configuration and sends its events back, and
they join the caller's profile as remote events named ``<key>#remote_op: <op>`` with the
callee's rank as ``node_id`` (nested calls chain their keys).

torch adds remote events to its profiler from C++; Python has no such entry point, so distrpc
adds them where torch turns the profiler's records into ``FunctionEvent``\\ s
(``profiler_legacy._parse_legacy_records``, wrapped once, at the first profiled call), on the
thread whose profile they belong to, each placed at the start of its call's own event.

Under the default (Kineto) profiler torch records nothing for RPCs; distrpc records the
caller's key events (no remote events).

Example (worker0, with ``worker1`` in the group)::

    from torch.autograd.profiler_legacy import profile

    with profile() as prof:
        rpc.rpc_sync("worker1", torch.add, args=(t, t))
    [e.name for e in prof.function_events if e.is_remote]
    # ['rpc_sync#aten::add(worker0 -> worker1)#remote_op: aten::add', ...]
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple


class RemoteProfile(NamedTuple):
    """A call sent while the caller profiles: the callee profiles running it likewise."""

    udf: Any
    key: str
    record_shapes: bool
    profile_memory: bool


class ProfiledResult(NamedTuple):
    """A result and the callee's events: ``(name, start_us, end_us, thread, input_shapes,
    cpu_memory_usage, node_id)`` each, ``node_id`` -1 for the callee's own."""

    value: Any
    events: list


class Recording:
    """One profiled call on the caller: its key and event (``record_function``), the callee's
    rank, and where the callee's events go (the list of the thread whose profile it is;
    ``None`` under the Kineto profiler, which takes no remote events)."""

    def __init__(self, key: str, event: Any, node_id: int, sink: list | None) -> None:
        self.key = key
        self.event = event
        self.node_id = node_id
        self.sink = sink

    def wrap(self, udf: Any) -> Any:
        """The call to send: ``udf``, with the profiler configuration to run it under when the
        callee's events are wanted."""
        if self.sink is None:
            return udf
        shapes, memory = _local.config
        return RemoteProfile(udf, self.key, shapes, memory)

    def received(self, result: Any) -> Any:
        """``result`` without the callee's events, which are kept for the caller's profile."""
        if isinstance(result, ProfiledResult):
            if self.sink is not None:
                self.sink.append((self.key, self.node_id, result.events))
            return result.value
        return result

    def hidden(self) -> Any:
        """A block whose torch operators the profile leaves out: distrpc's own pickling of
        tensors (torch pickles them in C++, where its profiler does not look)."""
        if self.sink is None:
            return contextlib.nullcontext()
        return sys.modules["torch"].autograd.profiler.record_function(_HIDDEN)

    def until(self, fut: Any) -> Any:
        """A future completing with ``fut``, once this call's event has ended with it (the
        event of an ``rpc_async`` spans the call, as torch's does)."""
        return self.event._call_end_callbacks_on_future(fut)


class _Local(threading.local):
    """This thread's profiling: what the callee records (``config``) and where events of a
    hidden block go (``sink``). (Defaults on the class, read without an exception.)"""

    config = (False, False)
    sink: Any = None


_local = _Local()
#: The event of a :meth:`Recording.hidden` block, dropped with what it holds.
_HIDDEN = "distrpc#hidden"
_install_lock = threading.Lock()
_ids = itertools.count(1 << 40)


def build_key(exec_type: str, func_name: str, current: str, dst: str) -> str:
    """The key a call is profiled under, as seed internal.py builds it."""
    return f"rpc_{exec_type}#{func_name}({current} -> {dst})"


def _legacy_active(torch: Any) -> bool:
    profiler = torch._C._autograd
    return profiler._profiler_type() == torch._C._profiler.ActiveProfilerType.LEGACY


def func_name(func: Callable[..., Any] | str, torch: Any) -> str:
    """How torch names a function in a key: a builtin op's schema name (``aten::add``), a
    script function's qualified name, otherwise ``__qualname__``."""
    if isinstance(func, str):
        return func
    builtin = torch.jit._builtins._find_builtin(func)
    if builtin is not None:
        return builtin
    if isinstance(func, torch.jit.ScriptFunction):
        return torch._jit_internal._qualified_name(func)
    return getattr(func, "__qualname__", repr(func))


#: torch's ``torch.autograd._profiler_enabled``, once torch is imported (asked on every call).
_enabled: Callable[[], bool] | None = None


def active() -> bool:
    """Whether torch's autograd profiler is on for this thread (never without torch)."""
    global _enabled
    enabled = _enabled
    if enabled is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        enabled = _enabled = torch.autograd._profiler_enabled
    return enabled()


@contextlib.contextmanager
def profiled(
    exec_type: str, func: Callable[..., Any] | str, current: str, dst: str, dst_rank: int
) -> Iterator[Recording | None]:
    """Records the call made inside under torch's key while torch's profiler is on (a
    :class:`Recording`), else yields ``None``. Costs one dictionary look-up when torch is not
    imported, one call when the profiler is off."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.autograd._profiler_enabled():
        yield None
        return
    key = build_key(exec_type, func_name(func, torch), current, dst)
    sink = None
    if _legacy_active(torch):
        _install(torch)
        sink = _sink()
    with torch.autograd.profiler.record_function(key) as event:
        yield Recording(key, event, dst_rank, sink)


def _sink() -> list:
    sink = _local.sink
    if sink is None:
        sink = _local.sink = []
    return sink


@contextlib.contextmanager
def run_profiled(profile: RemoteProfile, events: list) -> Iterator[None]:
    """On the callee: profiles what runs inside as the caller asked, then fills ``events``
    with what it recorded (see :class:`ProfiledResult`)."""
    torch = sys.modules.get("torch")
    if torch is None or torch.autograd._profiler_enabled():
        # Nothing to profile with, or this thread profiles already: no events.
        yield
        return
    from torch.autograd.profiler_legacy import profile as legacy_profile

    _install(torch)
    prof = legacy_profile(
        record_shapes=profile.record_shapes, profile_memory=profile.profile_memory
    )
    prof.__enter__()
    try:
        yield
    finally:  # the events go back with an exception too
        prof.__exit__(None, None, None)
        for e in prof.function_events:
            node = e.node_id if e.is_remote else -1
            span = (e.time_range.start, e.time_range.end)
            events.append((e.name, *span, e.thread, e.input_shapes, e.cpu_memory_usage, node))


def install() -> None:
    """Hooks into torch's legacy profiler if the program uses torch (``init_rpc`` calls it, so
    that profiles started before the first call are seen with their configuration)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        _install(torch)


def _install(torch: Any) -> None:
    """Wraps (once) torch's legacy profile's ``_start_trace``, to learn on each thread what the
    profile records (shapes, memory: the callee records the same), and
    ``_parse_legacy_records``, so that a finished profile takes the remote events its thread
    received."""
    legacy = torch.autograd.profiler_legacy
    if getattr(legacy._parse_legacy_records, "_distrpc", False):
        return
    with _install_lock:
        original = legacy._parse_legacy_records
        if getattr(original, "_distrpc", False):
            return
        start_trace = legacy.profile._start_trace

        def start(self: Any) -> None:
            _local.config = (bool(self.record_shapes), bool(self.profile_memory))
            start_trace(self)

        def parse(thread_records: Any) -> list:
            functions = _visible(original(thread_records))
            received, _local.sink = _sink(), []
            if received:
                functions.extend(_remote_events(functions, received, torch))
                functions.sort(key=lambda e: [e.time_range.start, -e.time_range.end])
            return functions

        parse._distrpc = True  # type: ignore[attr-defined]
        legacy.profile._start_trace = start
        legacy._parse_legacy_records = parse


def _visible(functions: list) -> list:
    """``functions`` without the hidden blocks and the events inside them."""
    hidden = [(e.thread, e.time_range) for e in functions if e.name == _HIDDEN]
    if not hidden:
        return functions

    def inside(e: Any) -> bool:
        r = e.time_range
        return any(t == e.thread and h.start <= r.start and r.end <= h.end for t, h in hidden)

    return [e for e in functions if not inside(e)]


def _remote_events(local: list, received: list, torch: Any) -> list:
    """``FunctionEvent``\\ s of the callee events ``received``, each call's placed at the start
    of the caller's event of its key (the n-th call of a key at its n-th event)."""
    from torch.autograd.profiler_util import FunctionEvent

    starts: dict[str, list[float]] = {}
    for e in local:
        starts.setdefault(e.name, []).append(e.time_range.start)
    out = []
    for key, node_id, events in received:
        if not events or not starts.get(key):
            continue  # the call's own event is not in this profile
        base = starts[key].pop(0)
        origin = min(e[1] for e in events)
        for name, start, end, thread, shapes, memory, node in events:
            remote_name = f"{key}#remote_op: {name}"
            out.append(
                FunctionEvent(
                    id=next(_ids),
                    name=remote_name,
                    trace_name=remote_name,
                    thread=thread,
                    start_us=base + (start - origin),
                    end_us=base + (end - origin),
                    input_shapes=shapes,
                    stack=[],
                    cpu_memory_usage=memory,
                    is_remote=True,
                    node_id=node if node >= 0 else node_id,
                    is_legacy=True,
                )
            )
    return out
