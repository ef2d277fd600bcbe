"""What the tests' worker processes share: joining the group, and waiting on a condition that
another worker holds."""

from __future__ import annotations

import time
from typing import Any, Callable


def join(rpc: Any, rank: int, world_size: int, init_method: str, **options: Any) -> None:
    """Joins ``rpc`` (``distrpc.rpc`` or ``torch.distributed.rpc``) as ``worker{rank}``
    through ``init_method``, with these backend ``options``."""
    rpc.init_rpc(
        f"worker{rank}",
        rank=rank,
        world_size=world_size,
        rpc_backend_options=rpc.TensorPipeRpcBackendOptions(init_method=init_method, **options),
    )


def wait_until(condition: Callable[[], bool], bound: float = 10.0) -> bool:
    """Whether ``condition`` came to hold within ``bound`` seconds, checked every 10 ms. Only
    for a condition on another worker that sends no notification (the owner's count of values
    as deletes arrive, say): never in place of one that can be waited on."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
