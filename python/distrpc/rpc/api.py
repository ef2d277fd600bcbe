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

import enum
import os
import pickle
import threading
from typing import Any, Callable

from .. import _internal

__all__ = [
    "BackendType",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "get_worker_info",
    "init_rpc",
    "is_available",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]

#: torch's default RPC timeout, in seconds.
_DEFAULT_RPC_TIMEOUT_SEC = 60.0
#: torch's default init method.
_DEFAULT_INIT_METHOD = "env://"
#: torch's default number of worker threads.
_DEFAULT_NUM_WORKER_THREADS = 16
#: ``timeout=-1``: use the default.
_UNSET_RPC_TIMEOUT = -1.0


def is_available() -> bool:
    """Whether RPC is available (always, with distrpc)."""
    return True


class BackendType(enum.Enum):
    """RPC backends; distrpc has one, under torch's name."""

    TENSORPIPE = "TENSORPIPE"


class TensorPipeRpcBackendOptions:
    """torch's backend options. CPU only: a device map to a GPU is an error."""

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
    ) -> None:
        if device_maps or devices:
            raise ValueError("distrpc runs on CPU only: device_maps and devices must be empty")
        self.num_worker_threads = num_worker_threads
        self.rpc_timeout = rpc_timeout
        self.init_method = init_method
        self.device_maps = {}
        self.devices = []


class WorkerInfo:
    """A worker of the group: its ``id`` (rank) and ``name``."""

    __slots__ = ("id", "name")

    def __init__(self, name: str, id: int) -> None:  # noqa: A002 - torch's name
        self.name = name
        self.id = id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerInfo) and (self.id, self.name) == (other.id, other.name)

    def __hash__(self) -> int:
        return hash((self.id, self.name))

    def __repr__(self) -> str:
        return f"WorkerInfo(id={self.id}, name={self.name})"

    def __reduce__(self):
        return (WorkerInfo, (self.name, self.id))


class _State:
    """This process's worker: the agent and the threads that run calls for it."""

    def __init__(self, agent: Any, num_threads: int) -> None:
        self.agent = agent
        self.me = WorkerInfo(agent.name, agent.rank)
        self.infos = [WorkerInfo(name, rank) for rank, name in agent.worker_infos()]
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._serve, name=f"distrpc-py-{i}", daemon=True)
            for i in range(num_threads)
        ]
        for t in self.threads:
            t.start()

    def _serve(self) -> None:
        # Each thread takes pickled calls from the agent (waiting with the lock released)
        # and runs them under the interpreter lock, as python_rpc_handler does.
        while not self.stopping.is_set():
            item = self.agent.next_call(0.05)
            if item is None:
                continue
            call, _function, payload, buffers, _caller = item
            call.reply(*_internal.run_udf(payload, buffers, self.me))

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()


_state: _State | None = None
_lock = threading.Lock()


def _require() -> _State:
    if _state is None:
        raise RuntimeError(
            "RPC has not been initialized. Call torch.distributed.rpc.init_rpc first."
        )
    return _state


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
    global _state
    options = rpc_backend_options or TensorPipeRpcBackendOptions()
    if rank < 0:
        rank = int(os.environ["RANK"])
    if world_size is None:
        world_size = int(os.environ["WORLD_SIZE"])
    from .._core import Agent

    with _lock:
        if _state is not None:
            raise RuntimeError("RPC is already initialized")
        agent = Agent.init(
            name,
            rank,
            world_size,
            options.init_method,
            options.num_worker_threads,
            float(options.rpc_timeout),
        )
        _state = _State(agent, options.num_worker_threads)


def get_worker_info(worker_name: str | None = None) -> WorkerInfo:
    """This worker, or the one named ``worker_name``."""
    state = _require()
    if worker_name is None:
        return state.me
    for info in state.infos:
        if info.name == worker_name:
            return info
    raise RuntimeError(f"Unknown destination worker {worker_name}")


def _to_name(to: str | int | WorkerInfo) -> str:
    if isinstance(to, WorkerInfo):
        return to.name
    if isinstance(to, int):
        return _require().infos[to].name
    return to


def _timeout(timeout: float) -> float | None:
    return None if timeout == _UNSET_RPC_TIMEOUT else float(timeout)


def _qualname(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or "?"
    return f"{module}.{getattr(func, '__qualname__', repr(func))}"


def rpc_sync(
    to: str | int | WorkerInfo,
    func: Callable[..., Any],
    args: tuple | None = None,
    kwargs: dict | None = None,
    timeout: float = _UNSET_RPC_TIMEOUT,
) -> Any:
    """Runs ``func(*args, **kwargs)`` on ``to`` and returns its result; an exception there is
    raised here as its own type."""
    state = _require()
    payload, buffers = _internal.serialize(_internal.PythonUDF(func, args or (), kwargs or {}))
    reply = state.agent.rpc_sync(_to_name(to), _qualname(func), payload, buffers, _timeout(timeout))
    return _internal._handle_exception(_internal.deserialize(*reply))


class Future:
    """The result of :func:`rpc_async`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._result: Any = None
        self._has_result = False

    def wait(self) -> Any:
        """Waits for the result (raises the remote exception)."""
        if not self._has_result:
            self._result = _internal.deserialize(*self._inner.wait())
            self._has_result = True
        return _internal._handle_exception(self._result)

    def done(self) -> bool:
        """Whether the result has arrived."""
        return self._has_result or self._inner.done()


def rpc_async(
    to: str | int | WorkerInfo,
    func: Callable[..., Any],
    args: tuple | None = None,
    kwargs: dict | None = None,
    timeout: float = _UNSET_RPC_TIMEOUT,
) -> Future:
    """Like :func:`rpc_sync`, without waiting: returns a :class:`Future`."""
    state = _require()
    payload, buffers = _internal.serialize(_internal.PythonUDF(func, args or (), kwargs or {}))
    inner = state.agent.rpc_async(
        _to_name(to), _qualname(func), payload, buffers, _timeout(timeout)
    )
    return Future(inner)


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


def shutdown(graceful: bool = True, timeout: float = 0) -> None:
    """Stops this worker: gracefully with the whole group (no call accepted before is lost),
    bounded by ``timeout`` seconds (0: none), or at once with ``graceful=False``."""
    global _state
    with _lock:
        state = _require()
        try:
            state.agent.shutdown(graceful, float(timeout))
        finally:
            state.stop()
            _state = None
