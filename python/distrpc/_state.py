"""This process's worker, once ``init_rpc`` made it: what every module of the front reaches
it through (``api`` sets it, the rest only reads it)."""

from __future__ import annotations

import sys
from typing import Any

from .futures import Future

#: The running worker (``api._State``), or ``None`` before ``init_rpc`` and after ``shutdown``.
current: Any = None

#: ``timeout=-1``: the default.
UNSET = -1.0


def require() -> Any:
    """The running worker; raises torch's error before ``init_rpc``."""
    if current is None:
        raise RuntimeError(
            "RPC has not been initialized. Call torch.distributed.rpc.init_rpc first."
        )
    return current


def timeout(seconds: float) -> float | None:
    """A timeout argument for the agent: ``None`` for the default."""
    return None if seconds == UNSET else float(seconds)


def future() -> Any:
    """A new future for a call's result: ``torch.futures.Future`` when the program uses torch
    (so ``torch.futures.wait_all``, ``then``, ... work on it), else distrpc's own."""
    torch = sys.modules.get("torch")
    return torch.futures.Future() if torch is not None else Future()


def rank_of(name: str) -> int:
    """The rank of the worker named ``name``."""
    rank = require().ranks.get(name)
    if rank is None:
        raise RuntimeError(f"Unknown destination worker {name}")
    return rank
