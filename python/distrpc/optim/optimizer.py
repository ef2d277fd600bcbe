"""``DistributedOptimizer``: one optimizer per worker that owns parameters, stepped together
with a distributed autograd context's gradients (torch's ``torch.distributed.optim``)."""

from __future__ import annotations

import threading
import warnings
from collections import defaultdict
from typing import Any

from .. import autograd as dist_autograd
from ..rpc import api
from ..rpc.rref import RRef, call_on


def _functional(optimizer_class: Any) -> Any:
    """torch's functional form of ``optimizer_class`` (``SGD``, ``Adam``, ... : the class its
    ``DistributedOptimizer`` uses in their place), or ``None``."""
    try:
        from torch.distributed.optim.utils import functional_optim_map
    except ImportError:  # a torch without them
        return None
    return functional_optim_map.get(optimizer_class)


class _LocalOptimizer:
    """On a worker that owns parameters: ``optimizer_class`` over them — its functional form
    where torch has one, as torch's ``DistributedOptimizer`` does (the same update, stepped
    with the gradients as a list: no ``.grad`` to set, half the time per step). Steps of all
    the local optimizers of a process take one lock, as torch's do (two trainers stepping the
    same parameters at once would race in the optimizer's state)."""

    global_lock = threading.Lock()

    def __init__(self, optimizer_class: Any, local_params_rref: list, *args: Any, **kwargs: Any):
        self._params = [rref.local_value() for rref in local_params_rref]
        functional = _functional(optimizer_class)
        self.functional = functional is not None
        if functional is not None:
            # (It warns, whatever the filters, that scripting it is deprecated: it is not
            # scripted here. The warnings it shows are recorded, and dropped.)
            with warnings.catch_warnings(record=True):
                self.optim = functional(self._params, *args, **kwargs)
        else:
            self.optim = optimizer_class(self._params, *args, **kwargs)

    def step(self, autograd_ctx_id: int) -> None:
        grads = dist_autograd.get_gradients(autograd_ctx_id)
        # A parameter the pass did not reach has no gradient, and the optimizer skips it (as
        # torch's functional forms do; torch's other classes keep a stale .grad there).
        with _LocalOptimizer.global_lock:
            if self.functional:
                self.optim.step([grads.get(param) for param in self._params])
                return
            for param in self._params:
                param.grad = grads.get(param)
            self.optim.step()


def _step(optimizer: RRef, autograd_ctx_id: int) -> None:
    """Runs on the optimizer's worker: one step with the context's gradients there."""
    optimizer.local_value().step(autograd_ctx_id)


class DistributedOptimizer:
    """Steps parameters spread over workers (torch's ``DistributedOptimizer``):
    ``params_rref`` are references to them (``RRef(param)`` on their owners); each owner gets
    one ``optimizer_class(its_params, *args, **kwargs)`` — any ``torch.optim.Optimizer``; in
    torch's functional form where torch has one (``SGD``, ``Adam``, ``AdamW``, ...), with
    that form's defaults, as torch's ``DistributedOptimizer`` makes it — made with
    ``remote``. :meth:`step` steps them all at once with the gradients of a
    distributed autograd context.

    Example::

        params = [rpc.RRef(p) for p in head.parameters()] + remote_param_rrefs
        opt = DistributedOptimizer(torch.optim.SGD, params, lr=0.05)
        with dist_autograd.context() as context_id:
            loss = model(x).sum()
            dist_autograd.backward(context_id, [loss])
            opt.step(context_id)
    """

    def __init__(self, optimizer_class: Any, params_rref: list, *args: Any, **kwargs: Any):
        by_owner: dict[str, list] = defaultdict(list)
        for param in params_rref:
            by_owner[param.owner_name()].append(param)
        self.remote_optimizers = [
            api.remote(owner, _LocalOptimizer, args=(optimizer_class, params, *args), kwargs=kwargs)
            for owner, params in by_owner.items()
        ]

    def step(self, context_id: int) -> None:
        """Steps every owner's optimizer with its gradients in ``context_id``, all at once;
        raises the first failure (naming its worker) once all have answered."""
        # The others first, then this worker's own while they run (torch sends itself a call).
        # Each other owner's step is a method call on its optimizer's reference (nothing to
        # fork), whose answer this thread reads itself when it waits for it.
        local = [opt for opt in self.remote_optimizers if opt.is_owner()]
        futures = [
            call_on(optimizer, "start", "step", (context_id,), {}, -1)
            for optimizer in self.remote_optimizers
            if not optimizer.is_owner()
        ]
        errors = []
        for optimizer in local:
            try:
                _step(optimizer, context_id)
            except Exception as e:  # noqa: BLE001 - raised once every owner has answered
                errors.append(e)
        for fut in futures:
            try:
                fut.wait()
            except Exception as e:  # noqa: BLE001 - each owner's failure, the first raised
                errors.append(e)
        if errors:
            raise errors[0]
