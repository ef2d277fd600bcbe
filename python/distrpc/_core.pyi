"""Types of ``distrpc._core``, the Rust binding (``crates/distrpc-py``). The package's own
modules use it; programs use :mod:`distrpc.rpc`."""

from typing import Any

#: A buffer lent to Rust or held from it: ``(address, length, owner)``.
_Buffer = tuple[int, int, Any]
#: A pickle and its out-of-band buffers.
_Pickled = tuple[bytes, list[_Buffer]]

#: Whether the extension was built without optimisation (the benchmark warns).
DEBUG_BUILD: bool

def launch(
    nproc: int, command: list[str], master_addr: str = "127.0.0.1", master_port: int = 0
) -> int:
    """Starts ``nproc`` ranks of ``command`` as ``distrpc launch`` does; their exit code."""

def msgpack_dumps(obj: Any) -> bytes:
    """``obj`` in MessagePack, as a call by name sends it (no arrays)."""

def msgpack_loads(data: bytes) -> Any:
    """What MessagePack ``data`` encodes (malformed data: ``ValueError``)."""

class Held:
    """Keeps a received tensor's memory alive while Python views it."""

    def dlpack(self, index: int, shape: tuple[int, ...]) -> Any:
        """The memory as a DLPack capsule of a C-contiguous CPU tensor of the plain dtype
        ``index`` and ``shape`` (``torch.from_dlpack`` takes it, without a copy)."""

class Call:
    """A call a Python worker thread runs, answered once."""

    def reply(self, payload: bytes, buffers: list[_Buffer]) -> None: ...
    def reply_named(self, result: Any) -> None: ...
    def keep(self, obj: Any) -> None: ...
    def fail(self, type_name: str, message: str) -> None: ...

class PyRRef:
    """A remote reference (``distrpc.rpc.RRef`` wraps it)."""

    def owner(self) -> tuple[int, str]: ...
    @property
    def owner_id(self) -> int: ...
    def is_owner(self) -> bool: ...
    def confirmed_by_owner(self) -> bool: ...
    def to_here(self, timeout: float | None = None) -> _Pickled: ...
    def local_value(self) -> Any: ...
    def rpc_sync(
        self, function: str, payload: bytes, buffers: list[_Buffer], timeout: float | None = None
    ) -> _Pickled: ...
    def rpc_start(
        self, function: str, payload: bytes, buffers: list[_Buffer], timeout: float | None = None
    ) -> Started: ...
    def remote(
        self, function: str, payload: bytes, buffers: list[_Buffer], timeout: float | None = None
    ) -> PyRRef: ...
    def fork(self, to: int | None = None) -> bytes: ...
    def wait_confirmed(self, timeout: float) -> bool: ...

class Started:
    """A call sent by ``PyRRef.rpc_start``, waited for later by a thread that reads its reply
    itself (the connection claimed when the wait begins)."""

    def wait(self) -> _Pickled: ...

class Agent:
    """One worker of a group."""

    @staticmethod
    def bind(
        name: str,
        rank: int,
        world_size: int,
        init_method: str,
        num_worker_threads: int,
        rpc_timeout: float,
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
    ) -> PendingAgent: ...
    @property
    def name(self) -> str: ...
    @property
    def rank(self) -> int: ...
    def worker_infos(self) -> list[tuple[int, str]]: ...
    def rpc_timeout(self) -> float: ...
    def set_rpc_timeout(self, timeout: float) -> None: ...
    def metrics(self) -> dict[str, int]: ...
    def next_call(
        self, timeout: float
    ) -> tuple[Call, str, Any, list[_Buffer] | None, int, Any, bool] | None: ...
    def rpc_sync(
        self,
        to: str,
        function: str,
        payload: bytes,
        buffers: list[_Buffer],
        timeout: float | None = None,
    ) -> _Pickled: ...
    def rpc_sync_named(
        self, to: str, function: str, args: list, timeout: float | None = None
    ) -> Any: ...
    def rpc_async(
        self,
        to: str,
        function: str,
        payload: bytes,
        buffers: list[_Buffer],
        timeout: float | None = None,
    ) -> int: ...
    def rpc_async_expecting(
        self,
        to: str,
        function: str,
        payload: bytes,
        buffers: list[_Buffer],
        expected: bytes,
        timeout: float | None = None,
    ) -> int: ...
    def answered(self) -> list[int]: ...
    def rpc_async_named(
        self, to: str, function: str, args: list, timeout: float | None = None
    ) -> int: ...
    def next_completion(
        self, timeout: float
    ) -> tuple[int, str | None, Any, list[_Buffer] | None] | None: ...
    def remote(
        self,
        to: str,
        function: str,
        payload: bytes,
        buffers: list[_Buffer],
        timeout: float | None = None,
    ) -> PyRRef: ...
    def rref_from_fork(self, fork: bytes, sender: int) -> PyRRef: ...
    def rref(self, obj: Any) -> PyRRef: ...
    def rref_rpc_async(
        self,
        rref: PyRRef,
        function: str,
        payload: bytes,
        buffers: list[_Buffer],
        timeout: float | None = None,
    ) -> int: ...
    def wake(self, threads: int) -> None: ...
    def all_gather(
        self, payload: bytes, names: list[str] | None = None, timeout: float | None = None
    ) -> dict[str, bytes]: ...
    def barrier(self, names: list[str]) -> None: ...
    def shutdown(self, graceful: bool = True, timeout: float = 0.0) -> None: ...

class PendingAgent:
    """A worker bound but not yet in its group."""

    @property
    def store_port(self) -> int | None: ...
    def join(self) -> Agent: ...

def make_certificates(dir: str, names: list[str]) -> None: ...
