"""Trains a small torch.nn model across processes with distrpc.rpc: a parameter server
(rank 0) holds the model; trainers (the other ranks) fetch its weights, compute gradients on
their own data, and send them back; the server averages and applies them with an optimizer.
The same program runs on torch.distributed.rpc by changing the import.

    python -m distrpc.launch --nproc 3 python/examples/parameter_server.py

Each trainer prints its loss as it falls; the server prints the final loss on all the data.
"""

from __future__ import annotations

import os
import threading

import distrpc.rpc as rpc  # was: import torch.distributed.rpc as rpc
import torch
from torch import nn

STEPS = 100
BATCH = 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def target(x: torch.Tensor) -> torch.Tensor:
    """What the model learns: a fixed function of the inputs."""
    return torch.tanh(x[:, :4].sum(dim=1, keepdim=True) - 0.5 * x[:, 4:].sum(dim=1, keepdim=True))


class ParameterServer:
    """The model and its optimizer; trainers' gradients are applied as they come."""

    def __init__(self) -> None:
        self.model = make_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.02)
        self.lock = threading.Lock()

    def weights(self) -> list[torch.Tensor]:
        with self.lock:
            return [p.detach().clone() for p in self.model.parameters()]

    def apply(self, grads: list[torch.Tensor]) -> None:
        with self.lock:
            for p, g in zip(self.model.parameters(), grads):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad()


_server: ParameterServer | None = None


def get_weights() -> list[torch.Tensor]:
    assert _server is not None
    return _server.weights()


def push_gradients(grads: list[torch.Tensor]) -> None:
    assert _server is not None
    _server.apply(grads)


def train(rank: int) -> None:
    model = make_model()
    generator = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        for p, w in zip(model.parameters(), rpc.rpc_sync("ps", get_weights)):
            p.data.copy_(w)
        x = torch.randn(BATCH, 8, generator=generator)
        loss = nn.functional.mse_loss(model(x), target(x))
        model.zero_grad()
        loss.backward()
        rpc.rpc_sync("ps", push_gradients, args=([p.grad for p in model.parameters()],))
        if step % 20 == 0 or step == STEPS - 1:
            print(f"trainer {rank} step {step:3d} loss {loss.item():.4f}", flush=True)


def main() -> None:
    global _server
    rank = int(os.environ["RANK"])
    if rank == 0:
        _server = ParameterServer()
        rpc.init_rpc("ps")
    else:
        rpc.init_rpc(f"trainer{rank}")
        train(rank)
    rpc.shutdown()  # the server keeps serving until every trainer is done
    if rank == 0:
        x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(99))
        with torch.no_grad():
            loss = nn.functional.mse_loss(_server.model(x), target(x)).item()
        print(f"final loss on held-out data: {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
