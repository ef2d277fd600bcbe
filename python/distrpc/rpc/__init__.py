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

from . import api
from .api import (
    BackendType,
    Future,
    TensorPipeRpcBackendOptions,
    WorkerInfo,
    get_worker_info,
    init_rpc,
    is_available,
    rpc_async,
    rpc_sync,
    shutdown,
)

__all__ = [
    "BackendType",
    "Future",
    "TensorPipeRpcBackendOptions",
    "WorkerInfo",
    "api",
    "get_worker_info",
    "init_rpc",
    "is_available",
    "rpc_async",
    "rpc_sync",
    "shutdown",
]
