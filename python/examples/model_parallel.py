"""Trains a torch.nn model split over three processes with distributed autograd: the first
layer lives on worker1, the second on worker2 (each behind an RRef, made with ``remote``), the
head on the trainer (worker0). Each step runs forward through the three, backward through the
three with ``distrpc.autograd``, and steps every worker's parameters at once with
``DistributedOptimizer``. The same program runs on torch by changing the three imports.

    python -m distrpc.launch --nproc 3 python/examples/model_parallel.py

The trainer prints its loss as it falls, and the final loss on held-out data.
"""

from __future__ import annotations

import os

import distrpc.autograd as dist_autograd  # was: import torch.distributed.autograd as ...
import distrpc.rpc as rpc  # was: import torch.distributed.rpc as rpc
import torch
from distrpc.optim import DistributedOptimizer  # was: from torch.distributed.optim import ...
from torch import nn

STEPS = 200
BATCH = 64


def target(x: torch.Tensor) -> torch.Tensor:
    """What the model learns: a fixed function of the inputs."""
    return torch.sin(x[:, :4].sum(dim=1, keepdim=True)) * 0.5 + x[:, 4:].mean(dim=1, keepdim=True)


def make_layer(inputs: int, outputs: int, seed: int) -> nn.Module:
    """Runs on the worker that keeps the layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, outputs), nn.Tanh())


def parameter_rrefs(layer: rpc.RRef) -> list[rpc.RRef]:
    """Runs on the layer's owner: a reference to each of its parameters."""
    return [rpc.RRef(p) for p in layer.local_value().parameters()]


class SplitModel(nn.Module):
    """The trainer's view of the model: two remote layers and a local head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = rpc.remote("worker1", make_layer, args=(8, 32, 1))
        self.second = rpc.remote("worker2", make_layer, args=(32, 32, 2))
        torch.manual_seed(0)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first.rpc_sync().forward(x)  # on worker1
        h = self.second.rpc_sync().forward(h)  # on worker2
        return self.head(h)

    def parameter_rrefs(self) -> list[rpc.RRef]:
        return (
            rpc.rpc_sync("worker1", parameter_rrefs, args=(self.first,))
            + rpc.rpc_sync("worker2", parameter_rrefs, args=(self.second,))
            + [rpc.RRef(p) for p in self.head.parameters()]
        )


def train() -> None:
    model = SplitModel()
    optimizer = DistributedOptimizer(torch.optim.Adam, model.parameter_rrefs(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        x = torch.randn(BATCH, 8, generator=generator)
        with dist_autograd.context() as context_id:
            loss = nn.functional.mse_loss(model(x), target(x))
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:3d} loss {loss.item():.4f}", flush=True)
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(x), target(x)).item()
    print(f"final loss on held-out data: {loss:.4f}", flush=True)


def main() -> None:
    rank = int(os.environ["RANK"])
    rpc.init_rpc(f"worker{rank}")
    if rank == 0:
        train()
    rpc.shutdown()  # the layers' workers serve until the trainer is done


if __name__ == "__main__":
    main()
