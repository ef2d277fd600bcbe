"""``torch.distributed.rpc.api`` on distrpc: same names, signatures, defaults and units
(timeouts in seconds; ``-1`` means the default, ``0`` none), and the private helpers real
programs use (``_all_gather``, ``_barrier``, ``_wait_all_workers``).

Example (two processes, each running this with its own rank)::

    import operator
    import distrpc.rpc as rpc

    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2)
    if rank == 0:
        assert rpc.rpc_sync("worker1", operator.add, args=(2, 3)) == 5
    rpc.shutdown()
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import pickle
import threading
from collections.abc import Iterator
from typing import Any, Callable

from .. import _autograd, _internal, _named, _pool, _profiler, _state
from ..futures import Future
from .rref import RRef
from .worker import WorkerInfo

__all__ = [
    "BackendType",
    "Future",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "get_rpc_timeout",
    "RRef",
    "get_worker_info",
    "init_rpc",
    "remote",
    "is_available",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]

from .constants import DEFAULT_INIT_METHOD as _DEFAULT_INIT_METHOD
from .constants import DEFAULT_NUM_WORKER_THREADS as _DEFAULT_NUM_WORKER_THREADS
from .constants import DEFAULT_RPC_TIMEOUT_SEC as _DEFAULT_RPC_TIMEOUT_SEC
from .constants import UNSET_RPC_TIMEOUT as _UNSET_RPC_TIMEOUT

_log = logging.getLogger(__name__)


def is_available() -> bool:
    """Whether RPC is available (always, with distrpc)."""
    return True


class BackendType(enum.Enum):
    """RPC backends; distrpc has one, under torch's name."""

    TENSORPIPE = "TENSORPIPE"


class TensorPipeRpcBackendOptions:
    """torch's backend options. CPU only: a device map to a GPU is an error.

    Three options are distrpc's own. ``auth_token``: the group's shared secret (at least 16
    bytes, the same on every worker): every connection — worker to worker, worker to store —
    opens only after both ends prove they know it, so no outsider can run code in the group
    (torch has no such option). Without it, ``DISTRPC_AUTH_TOKEN`` or the file
    ``DISTRPC_AUTH_TOKEN_FILE`` names give it, and ``python -m distrpc.launch`` gives its
    group a fresh one. ``tls``: ``(ca, cert, key)``, PEM files of the group's CA and of this
    worker's certificate and key (:func:`distrpc.make_certificates` or ``distrpc cert`` make
    them): every connection is mutual TLS (else ``DISTRPC_TLS_CA``, ``DISTRPC_TLS_CERT`` and
    ``DISTRPC_TLS_KEY``). ``listen_ip``: the address the worker listens on (default: its
    interface toward ``MASTER_ADDR``; loopback for a group on one host). ``max_queued_bytes``
    (256 MiB) and ``max_calls_in`` (16 384): what one connection may hold for its peer before
    calls wait for it to read, and how many of a peer's calls a worker takes at once before it
    stops reading the peer (TCP pushes back); ``send_stall`` (30 s): how long a call waiting for
    that room gives a peer that reads nothing; ``liveness`` (whole seconds, 0: off): within
    about how long a peer whose host or network vanished is declared gone and the calls
    waiting on it fail; ``max_builtin_elements`` (2^28): the largest result of a builtin.
    The latency options: ``spin_wait`` (seconds, default 2 ms, 0: off): how long a thread
    blocked on its own call (``rpc_sync``, ``to_here``) polls for the reply before it sleeps,
    and how long an idle worker thread polls for the next call on the connection the last one
    came in on — a reply or call that comes within it spares waking a sleeping thread, which on
    an idle virtual CPU costs tens of microseconds, and the work after it runs on a CPU that did
    not halt; a connection stops spinning once replies (calls) keep coming later than that. A
    spin lasts a tenth of ``spin_wait`` while the distrpc processes busy on the host (those
    that waited for a reply or a call in the last 20 ms) outnumber its CPUs, and ends once the
    host has more runnable threads than CPUs (the spinning thread would take the core the work
    it waits for needs).
    ``busy_poll`` (seconds, default off): every connection's reader and every wait poll that
    long too, trading whole cores for latency (torch's TensorPipe always polls).

    Example::

        options = rpc.TensorPipeRpcBackendOptions(
            init_method="tcp://10.0.0.1:29500", auth_token=os.environ["MY_GROUP_SECRET"]
        )
        rpc.init_rpc("worker1", rank=1, world_size=2, rpc_backend_options=options)
    """

    def __init__(
        self,
        *,
        num_worker_threads: int = _DEFAULT_NUM_WORKER_THREADS,
        rpc_timeout: float = _DEFAULT_RPC_TIMEOUT_SEC,
        init_method: str = _DEFAULT_INIT_METHOD,
        device_maps: dict | None = None,
        devices: list | None = None,
        _transports: list | None = None,
        _channels: list | None = None,
        auth_token: str | None = None,
        listen_ip: str | None = None,
        tls: tuple[str, str, str] | None = None,
        max_queued_bytes: int | None = None,
        max_calls_in: int | None = None,
        max_builtin_elements: int | None = None,
        send_stall: float | None = None,
        liveness: float | None = None,
        busy_poll: float | None = None,
        spin_wait: float | None = None,
    ) -> None:
        if device_maps or devices:
            raise ValueError("distrpc runs on CPU only: device_maps and devices must be empty")
        self.num_worker_threads = num_worker_threads
        self.rpc_timeout = rpc_timeout
        self.init_method = init_method
        self.device_maps = {}
        self.devices = []
        self.auth_token = auth_token
        self.listen_ip = listen_ip
        self.tls = None if tls is None else tuple(str(p) for p in tls)
        if self.tls is not None and len(self.tls) != 3:
            raise ValueError("tls is (ca, cert, key): three PEM files")
        self.max_queued_bytes = max_queued_bytes
        self.max_calls_in = max_calls_in
        self.max_builtin_elements = max_builtin_elements
        self.send_stall = send_stall
        self.liveness = liveness
        self.busy_poll = busy_poll
        self.spin_wait = spin_wait

    def _distrpc_options(self) -> dict:
        """distrpc's own options, as ``Agent.bind`` takes them (``None``: the default)."""
        return {
            name: getattr(self, name, None)
            for name in (
                "auth_token",
                "listen_ip",
                "tls",
                "max_queued_bytes",
                "max_calls_in",
                "max_builtin_elements",
                "send_stall",
                "liveness",
                "busy_poll",
                "spin_wait",
            )
        }

    def __repr__(self) -> str:
        # The token stays out of logs.
        token = None if self.auth_token is None else "<not shown>"
        return (
            f"TensorPipeRpcBackendOptions(num_worker_threads={self.num_worker_threads}, "
            f"rpc_timeout={self.rpc_timeout}, init_method={self.init_method!r}, "
            f"auth_token={token}, listen_ip={self.listen_ip!r}, tls={self.tls!r})"
        )


class _State:
    """This process's worker: the agent, the threads that run calls for it, and the thread
    that completes ``rpc_async`` futures."""

    def __init__(self, agent: Any, num_threads: int) -> None:
        self.agent = agent
        self.me = WorkerInfo(agent.name, agent.rank)
        self.infos = [WorkerInfo(name, rank) for rank, name in agent.worker_infos()]
        self.ranks = {info.name: info.id for info in self.infos}
        self.stopping = threading.Event()
        self.pending: dict[int, tuple[Any, int]] = {}
        self.pending_lock = threading.Lock()
        # An @async_execution function's future answers when it completes: no thread waits.
        self.pool = _pool.Pool(num_threads, agent.next_call, self._run)
        self.completing = threading.Thread(
            target=self._complete, name="distrpc-py-futures", daemon=True
        )

    def start(self) -> None:
        """Starts taking calls and completing futures: once this worker is ``_state.current``
        (a call that arrived first waits for it, and may need it to unpickle a reference)."""
        self.pool.start()
        self.completing.start()

    def _run(self, item: tuple) -> None:
        """Runs one call (as ``Agent.next_call`` gives it) and answers it."""
        call, function, payload, buffers, caller, this, keep = item
        try:
            if buffers is None:  # a call by name: `payload` is its decoded arguments
                args = payload if this is None else [this, *payload]  # a method: its value first
                _named.run(call, function, args, self.me)
                return
            if this is None:
                # A call received before, the common small call: run at once.
                ran = _internal.run_remembered(payload, buffers, self.me, caller)
                if ran is not None:
                    result, ctx = ran
                    if ctx is None:
                        self._reply(call, keep, caller, result)
                    else:  # its result pickled in the context it ran in
                        _autograd.call_in(ctx, self._reply, call, keep, caller, result)
                    return
            answer = functools.partial(self._reply, call, keep, caller)
            _internal.run_udf(payload, buffers, self.me, answer, this, caller)
        except Exception:  # noqa: BLE001 - the thread must go on serving
            # The answer itself failed; the call, dropped unanswered, fails on its caller.
            _log.exception("a call on %s could not be answered", self.me.name)

    def _reply(self, call: Any, keep: bool, caller: int, result: Any) -> None:
        """Sends ``result`` of ``call`` back to ``caller`` pickled, or keeps it behind a
        reference (a failed creation keeps its ``RemoteException``: every use raises it)."""
        if keep:
            call.keep(result)
        else:
            call.reply(*_internal.pickled(result, self.me, caller))

    def track(self, start: Callable[[], int], fut: Any, sender: int, recording: Any = None) -> None:
        """Starts an ``rpc_async`` (``start`` returns its token) whose result completes
        ``fut``. Registered under the lock: the completing thread cannot see the token before
        the future."""
        with self.pending_lock:
            self.pending[start()] = (fut, sender, recording)

    def expect(
        self, start: Callable[[], int], on_failure: Callable[[BaseException], None], sender: int
    ) -> None:
        """Starts a call to worker ``sender`` whose answer is known (``start`` is an
        ``Agent.rpc_async_expecting`` returning its token): that answer wakes no thread here,
        and the call is forgotten once seen answered (the next time a call is expected);
        ``on_failure`` gets any other outcome as an exception, on the thread that completes
        futures, as :meth:`track`'s futures are completed."""
        with self.pending_lock:
            self._forget_answered()
            self.pending[start()] = (_Expecting(on_failure), sender, None)

    def _forget_answered(self) -> None:
        """Forgets the expected calls answered as expected (under ``pending_lock``)."""
        for token in self.agent.answered():
            # (Always there: registered under this lock before any answer is taken.)
            self.pending.pop(token, None)

    def _complete(self) -> None:
        while True:
            # Once the worker stops, the results its shutdown waited for are still in the queue
            # (before the wake-up `stop` sends): the thread completes them, and leaves at the
            # first look that finds the queue empty.
            stopping = self.stopping.is_set()
            item = self.agent.next_completion(0.0 if stopping else _pool.IDLE_WAIT)
            if item is None:
                if stopping:
                    return
                continue
            token, error, payload, buffers = item
            _pool.torch_threads()  # the futures' callbacks run here
            with self.pending_lock:
                fut, sender, recording = self.pending.pop(token)
            try:
                self._settle(fut, sender, error, payload, buffers, recording)
            except Exception:  # noqa: BLE001 - the thread must go on completing the others
                # e.g. the program completed the future itself first.
                _log.exception("an rpc_async future could not be completed")

    @staticmethod
    def _settle(
        fut: Any, sender: int, error: Any, payload: Any, buffers: Any, recording: Any
    ) -> None:
        if error is not None:
            fut.set_exception(RuntimeError(error))
            return
        if buffers is None:  # a call by name: `payload` is its decoded result
            fut.set_result(payload)
            return
        try:
            if recording is None:
                value = _internal.reply_value(payload, buffers, sender)
            else:
                value = recording.received(_internal.deserialize(payload, buffers, sender))
                value = _internal._handle_exception(value)
        except Exception as e:  # the remote exception, as the result
            fut.set_exception(e)
            return
        fut.set_result(value)

    def stop(self) -> None:
        self.stopping.set()
        self.pool.stopping.set()
        threads = [*self.pool.threads, self.completing]
        self.agent.wake(len(threads))
        for t in threads:
            if t is not threading.current_thread():
                t.join()


class _Expecting:
    """Stands for the future of a call whose answer is known (:meth:`_State.expect`): only
    another outcome reaches it, and goes to ``on_failure`` as an exception."""

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        self.on_failure = on_failure

    def set_result(self, value: Any) -> None:
        self.on_failure(RuntimeError(f"an unexpected answer: {value!r}"))

    def set_exception(self, error: BaseException) -> None:
        self.on_failure(error)


_lock = threading.Lock()
_require = _state.require
_rank_of = _state.rank_of
_timeout = _state.timeout


def init_rpc(
    name: str,
    backend: BackendType | None = None,
    rank: int = -1,
    world_size: int | None = None,
    rpc_backend_options: TensorPipeRpcBackendOptions | None = None,
) -> None:
    """Joins a group as worker ``name`` (torch's ``init_rpc``). ``rank`` -1 and
    ``world_size`` None read ``RANK`` and ``WORLD_SIZE``; the init method (``env://``,
    ``tcp://``, ``file://``) comes from the options."""
    options = rpc_backend_options or TensorPipeRpcBackendOptions()
    if rank < 0:
        rank = int(os.environ["RANK"])
    if world_size is None:
        world_size = int(os.environ["WORLD_SIZE"])
    from .._core import Agent

    with _lock:
        if _state.current is not None:
            raise RuntimeError("RPC is already initialized")
        threads, timeout = options.num_worker_threads, float(options.rpc_timeout)
        # torch's own options object has none of distrpc's.
        extras = getattr(options, "_distrpc_options", dict)()
        if options.init_method == "env://" and _under_torchrun():
            agent = _join_through_torchrun(name, rank, world_size, threads, timeout, extras)
        else:
            init = options.init_method
            agent = Agent.bind(name, rank, world_size, init, threads, timeout, **extras).join()
        _autograd.init(rank)
        _state.current = state = _State(agent, options.num_worker_threads)
        state.start()
    _profiler.install()


def _under_torchrun() -> bool:
    """Whether torchrun started this process with its own store on ``MASTER_PORT``."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _join_through_torchrun(
    name: str,
    rank: int,
    world_size: int,
    num_threads: int,
    timeout: float,
    extras: dict,
) -> Any:
    """env:// under torchrun, whose agent hosts a torch store on ``MASTER_PORT``: rank 0
    hosts distrpc's store on a free port and posts its address in torch's store, where the
    others read it (``torch.distributed.TCPStore``: torch is there, torchrun is part of it)."""
    from datetime import timedelta

    import torch.distributed as dist

    from .._core import Agent

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait = timedelta(seconds=timeout if timeout > 0 else 3600)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=wait)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    key = f"distrpc/store/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank == 0:
        pending = Agent.bind(
            name, rank, world_size, f"tcp://{host}:0", num_threads, timeout, **extras
        )
        store.set(key, f"{host}:{pending.store_port}")
        return pending.join()
    address = store.get(key).decode()
    init = f"tcp://{address}"
    return Agent.bind(name, rank, world_size, init, num_threads, timeout, **extras).join()


def get_worker_info(worker_name: str | None = None) -> WorkerInfo:
    """This worker, or the one named ``worker_name``."""
    state = _require()
    if worker_name is None:
        return state.me
    return state.infos[_rank_of(worker_name)]  # in rank order


def _destination(state: _State, to: str | int | WorkerInfo) -> tuple[str, int]:
    """``to``'s name and rank (a name, the common case, looked up at once)."""
    if type(to) is str:
        rank = state.ranks.get(to)
        if rank is not None:
            return to, rank
    dst = _to_name(to)
    return dst, _rank_of(dst)


def _to_name(to: str | int | WorkerInfo) -> str:
    if isinstance(to, WorkerInfo):
        return to.name
    if isinstance(to, int):
        return _require().infos[to].name
    return to


def _build_rpc_profiling_key(
    exec_type: str, func_name: str, current_worker_name: str, dst_worker_name: str
) -> str:
    """The key a call is profiled under, as seed internal.py builds it."""
    return _profiler.build_key(exec_type, func_name, current_worker_name, dst_worker_name)


def _named_args(func: str, args: tuple | None, kwargs: dict | None) -> list:
    """The arguments of a call by name: positional only, as Rust functions take them."""
    if kwargs:
        raise TypeError(f"a call by name ({func!r}) takes positional arguments only")
    return list(args or ())


def rpc_sync(
    to: str | int | WorkerInfo,
    func: Callable[..., Any] | str,
    args: tuple | None = None,
    kwargs: dict | None = None,
    timeout: float = _UNSET_RPC_TIMEOUT,
) -> Any:
    """Runs ``func(*args, **kwargs)`` on ``to`` and returns its result; an exception there is
    raised here as its own type.

    ``func`` may also be a name: the function registered under it on ``to`` — a Rust
    ``#[distrpc::function]`` or a Python ``@distrpc.function(name=...)`` — called with
    ``args`` in MessagePack (see :mod:`distrpc._named`); its error is a ``RuntimeError``."""
    quick = _made_before(to, func, args, kwargs)
    if quick is not None:
        state, rank, name, payload, buffers = quick
        reply = _pool.waiting(state.agent.rpc_sync, to, name, payload, buffers, _timeout(timeout))
        return _internal.reply_value(*reply, rank)
    return _dispatch("sync", _sync, to, func, args, kwargs, timeout)


def _made_before(to: Any, func: Any, args: Any, kwargs: Any) -> tuple | None:
    """For a call of ``func`` to worker ``to`` (by name) made before, the common small call:
    ``(state, rank, name, payload, buffers)``, the bytes the general path would send found
    without its layers (:func:`distrpc._internal.remembered_call`). ``None`` for any other
    call, and while torch's profiler is on."""
    state = _state.current
    if state is None or kwargs or type(to) is not str:
        return None
    rank = state.ranks.get(to)
    if rank is None or _profiler.active():
        return None
    remembered = _internal.remembered_call(func, args, rank)
    if remembered is None:
        return None
    return state, rank, _internal.qualname(func), *remembered


def _dispatch(
    kind: str,
    call: Callable[..., Any],
    to: str | int | WorkerInfo,
    func: Callable[..., Any] | str,
    args: tuple | None,
    kwargs: dict | None,
    timeout: float,
) -> Any:
    """``call(state, dst, rank, func, args, kwargs, timeout, recording)`` for destination
    ``to``, recorded as a ``kind`` call ("sync", "async") while torch's profiler is on."""
    state = _require()
    dst, rank = _destination(state, to)
    if not _profiler.active():
        return call(state, dst, rank, func, args, kwargs, timeout, None)
    with _profiler.profiled(kind, func, state.me.name, dst, rank) as recording:
        out = call(state, dst, rank, func, args, kwargs, timeout, recording)
        # An rpc_async's event ends when its future completes, as torch's does.
        return recording.until(out) if kind == "async" and recording is not None else out


def _pickled_call(
    func: Callable[..., Any],
    args: tuple | None,
    kwargs: dict | None,
    recording: Any,
    rank: int,
) -> tuple[bytes, list]:
    """The call to worker ``rank`` as torch's ``internal.py`` sends it: a ``PythonUDF``
    pickled, with the profiler configuration when the caller profiles it (distrpc's own
    pickling left out of the profile)."""
    udf = _internal.PythonUDF(func, args or (), kwargs or {})
    if recording is None:
        return _internal.serialize(udf, rank)
    with recording.hidden():
        return _internal.serialize(recording.wrap(udf), rank)


def _sync(
    state: _State,
    dst: str,
    rank: int,
    func: Callable[..., Any] | str,
    args: tuple | None,
    kwargs: dict | None,
    timeout: float,
    recording: _profiler.Recording | None,
) -> Any:
    """:func:`rpc_sync` once its destination is known (and its profiling, if any, begun)."""
    if isinstance(func, str):
        named = _named_args(func, args, kwargs)
        return _pool.waiting(state.agent.rpc_sync_named, dst, func, named, _timeout(timeout))
    payload, buffers = _pickled_call(func, args, kwargs, recording, rank)
    agent, name = state.agent, _internal.qualname(func)
    reply = _pool.waiting(agent.rpc_sync, dst, name, payload, buffers, _timeout(timeout))
    if recording is None:
        return _internal.reply_value(*reply, rank)
    with recording.hidden():
        result = recording.received(_internal.deserialize(*reply, rank))
    return _internal._handle_exception(result)


def rpc_async(
    to: str | int | WorkerInfo,
    func: Callable[..., Any] | str,
    args: tuple | None = None,
    kwargs: dict | None = None,
    timeout: float = _UNSET_RPC_TIMEOUT,
) -> Future:
    """Like :func:`rpc_sync`, without waiting: returns a future — ``torch.futures.Future`` when
    the program uses torch, :class:`distrpc.futures.Future` otherwise (the same API). ``func``
    may be a name, as for :func:`rpc_sync`."""
    quick = _made_before(to, func, args, kwargs)
    if quick is not None:
        state, rank, name, payload, buffers = quick
        fut = _state.future()
        start = functools.partial(
            state.agent.rpc_async, to, name, payload, buffers, _timeout(timeout)
        )
        state.track(start, fut, rank)
        return fut
    return _dispatch("async", _async, to, func, args, kwargs, timeout)


def _async(
    state: _State,
    dst: str,
    rank: int,
    func: Callable[..., Any] | str,
    args: tuple | None,
    kwargs: dict | None,
    timeout: float,
    recording: _profiler.Recording | None,
) -> Any:
    """:func:`rpc_async` once its destination is known (and its profiling, if any, begun)."""
    fut = _state.future()
    if isinstance(func, str):
        named = _named_args(func, args, kwargs)

        def start() -> int:
            return state.agent.rpc_async_named(dst, func, named, _timeout(timeout))
    else:
        payload, buffers = _pickled_call(func, args, kwargs, recording, rank)
        name = _internal.qualname(func)

        def start() -> int:
            return state.agent.rpc_async(dst, name, payload, buffers, _timeout(timeout))

    state.track(start, fut, rank, recording)
    return fut


@contextlib.contextmanager
def _use_rpc_pickler(rpc_pickler: Any) -> Iterator[None]:
    """Uses ``rpc_pickler`` (an ``_InternalRPCPickler``, say with custom reducers in its
    pickler's dispatch table) instead of the default one while the block runs."""
    _internal._default_pickler = rpc_pickler
    try:
        yield
    finally:
        _internal._default_pickler = _internal._internal_rpc_pickler


def get_rpc_timeout() -> float:
    """The default timeout of calls, in seconds (torch's ``get_rpc_timeout``)."""
    return _require().agent.rpc_timeout()


def _set_rpc_timeout(rpc_timeout: float) -> None:
    """Sets the default timeout of calls, in seconds; 0 means none."""
    _require().agent.set_rpc_timeout(float(rpc_timeout))


#: Whether shutdown ignores user references still held (torch's flag; distrpc deletes them
#: either way).
_ignore_rref_leak = True


class _Agent:
    """What torch's ``_get_current_rpc_agent()`` returns, as far as programs use it."""

    def __init__(self, state: _State) -> None:
        self._state = state

    def get_worker_infos(self) -> list[WorkerInfo]:
        """Every worker of the group, in rank order."""
        return list(self._state.infos)

    def get_worker_info(self, worker_name: str | None = None) -> WorkerInfo:
        """This worker, or the one named ``worker_name``."""
        return get_worker_info(worker_name)

    def get_metrics(self) -> dict:
        """The agent's metrics (``agent.*`` keys), as strings like torch's."""
        return {k: str(v) for k, v in self._state.agent.metrics().items() if k.startswith("agent.")}

    def get_debug_info(self) -> dict:
        """Metrics, reference counts and distributed autograd's counts, as strings like
        torch's."""
        info = {**self._state.agent.metrics(), **_autograd.debug_info()}
        return {k: str(v) for k, v in info.items()}


def _get_current_rpc_agent() -> _Agent:
    """This process's agent (torch's private accessor)."""
    return _Agent(_require())


def _get_debug_info() -> dict:
    """The agent's debug info: metrics and reference counts (torch's ``_get_debug_info``)."""
    return _get_current_rpc_agent().get_debug_info()


def _all_gather(obj: Any, worker_names: list[str] | None = None, timeout: float = -1) -> dict:
    """Gathers ``obj`` from every worker (or those in ``worker_names``): each gets
    ``{name: obj}`` (torch's ``_all_gather``)."""
    state = _require()
    # Gathered objects are pickled whole (arrays in band): gathers carry small things.
    data = pickle.dumps(obj, protocol=5)
    names = list(worker_names) if worker_names else None
    gathered = state.agent.all_gather(data, names, _timeout(timeout))
    return {name: pickle.loads(data) for name, data in gathered.items()}


def _barrier(worker_names: list[str]) -> None:
    """Waits until every worker in ``worker_names`` has called it (torch's ``_barrier``)."""
    _require().agent.barrier(list(worker_names))


def _wait_all_workers(timeout: float = _DEFAULT_RPC_TIMEOUT_SEC) -> None:
    """Waits until every worker has called it (the first step of torch's graceful shutdown)."""
    _all_gather(None, timeout=timeout)


def remote(
    to: str | int | WorkerInfo,
    func: Callable[..., Any],
    args: tuple | None = None,
    kwargs: dict | None = None,
    timeout: float = _UNSET_RPC_TIMEOUT,
) -> RRef:
    """Runs ``func(*args, **kwargs)`` on ``to`` and keeps the result there, behind the returned
    :class:`RRef` (torch's ``remote``). Returns at once; a failure surfaces when the reference
    is used."""
    quick = _made_before(to, func, args, kwargs)
    if quick is not None:
        state, _, name, payload, buffers = quick
        return RRef(_handle=state.agent.remote(to, name, payload, buffers, _timeout(timeout)))
    state = _require()
    if isinstance(func, str):
        raise TypeError(
            f"remote() runs a Python function; {func!r} is a name (call functions by name "
            "with rpc_sync or rpc_async)"
        )
    name = _internal.qualname(func)
    dst, rank = _destination(state, to)
    udf = _internal.PythonUDF(func, args or (), kwargs or {})
    if not _profiler.active():
        payload, buffers = _internal.serialize(udf, rank)
        return RRef(_handle=state.agent.remote(dst, name, payload, buffers, _timeout(timeout)))
    # The value stays on the callee: the key is recorded, the callee's events are not asked for.
    with _profiler.profiled("remote", func, state.me.name, dst, rank):
        payload, buffers = _internal.serialize(udf, rank)
        handle = state.agent.remote(dst, name, payload, buffers, _timeout(timeout))
    return RRef(_handle=handle)


def shutdown(graceful: bool = True, timeout: float = 0) -> None:
    """Stops this worker: gracefully with the whole group (no call accepted before is lost),
    bounded by ``timeout`` seconds (0: none), or at once with ``graceful=False``."""
    with _lock:
        state = _require()
        try:
            state.agent.shutdown(graceful, float(timeout))
        finally:
            state.stop()
            _state.current = None
