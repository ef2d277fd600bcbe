"""``torch.distributed.rpc`` on distrpc: ``import distrpc.rpc as rpc`` in place of
``import torch.distributed.rpc as rpc``. The API is in :mod:`distrpc.rpc.api`, as torch's is.

Example (two processes, each running this with its own rank)::

    import operator
    import distrpc.rpc as rpc

    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2)
    if rank == 0:
        assert rpc.rpc_sync("worker1", operator.add, args=(2, 3)) == 5
    rpc.shutdown()
"""

from . import api, functions
from .api import (
    BackendType,
    Future,
    RRef,
    TensorPipeRpcBackendOptions,
    WorkerInfo,
    _get_current_rpc_agent,
    _get_debug_info,
    _set_rpc_timeout,
    get_rpc_timeout,
    get_worker_info,
    init_rpc,
    is_available,
    remote,
    rpc_async,
    rpc_sync,
    shutdown,
)
from .constants import DEFAULT_INIT_METHOD, DEFAULT_NUM_WORKER_THREADS, DEFAULT_RPC_TIMEOUT_SEC

__all__ = [
    "RRef",
    "remote",
    "DEFAULT_INIT_METHOD",
    "DEFAULT_NUM_WORKER_THREADS",
    "DEFAULT_RPC_TIMEOUT_SEC",
    "BackendType",
    "Future",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "_get_current_rpc_agent",
    "_get_debug_info",
    "_set_rpc_timeout",
    "api",
    "functions",
    "get_rpc_timeout",
    "get_worker_info",
    "init_rpc",
    "is_available",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]
