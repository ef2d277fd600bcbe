"""distrpc: torch.distributed.rpc on a Rust engine.

Change one import and a torch RPC program runs on distrpc::

    import distrpc.rpc as rpc          # was: import torch.distributed.rpc as rpc

    rpc.init_rpc("worker0", rank=0, world_size=2)
    rpc.rpc_sync("worker1", operator.add, args=(2, 3))
    rpc.shutdown()

Python and Rust workers call each other's functions by name: :func:`function` registers a
Python one (see :mod:`distrpc._named`). :func:`make_certificates` makes a group's TLS
certificates (``TensorPipeRpcBackendOptions(tls=...)``)::

    distrpc.make_certificates("certs", ["worker0", "worker1"])
"""

from ._core import make_certificates
from ._named import function

__all__ = ["function", "make_certificates"]
__version__ = "0.1.0"
