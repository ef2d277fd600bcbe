"""distrpc: torch.distributed.rpc on a Rust engine.

Change one import and a torch RPC program runs on distrpc::

    import distrpc.rpc as rpc          # was: import torch.distributed.rpc as rpc

    rpc.init_rpc("worker0", rank=0, world_size=2)
    rpc.rpc_sync("worker1", operator.add, args=(2, 3))
    rpc.shutdown()
"""

__version__ = "0.1.0"
