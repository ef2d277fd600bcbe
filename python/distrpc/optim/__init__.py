"""``torch.distributed.optim`` on distrpc: :class:`DistributedOptimizer`.

Example::

    from distrpc.optim import DistributedOptimizer

    opt = DistributedOptimizer(torch.optim.Adam, param_rrefs, lr=1e-3)
    opt.step(context_id)
"""

from .optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer"]
