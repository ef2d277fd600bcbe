"""The floor of any Python front for :mod:`distrpc.bench_train`'s ``rnn`` and ``mlp`` steps:
the same models and steps over raw loopback TCP between the same four processes — tensors'
bytes behind a five-byte header, no pickling, no framework, no autograd context, each worker
blocking in ``recv`` — with the fewest messages each step needs (the MLP's gradients pass stage
to stage). What distrpc pays beyond it is what its calls, pickles, contexts and threads cost;
no design that runs torch's programs can go below it on the same machine.

The trainer (rank 0) connects to ranks 1–3; each stage connects to the one before it. Frames
are ``(kind: u8, length: u32)`` and the bytes; each step is the trainer's, as in
``bench_train``::

    mlp:  x ─► s1 ─► (trainer) ─► s2 ─► (trainer) ─► s3 ─► loss;
          grad ─► s3 ─► s2 ─► s1 ─► trainer; step ─► s1, s2, s3 ◄─ done
    rnn:  data ─► ps: embedding ◄─; lstm; ─► ps: decoder ◄─; loss;
          grad ─► ps ◄─ grad; lstm backward; grad ─► ps ◄─ done; step ─► ps ◄─ done
"""

from __future__ import annotations

import selectors
import socket
import struct

from . import bench_models
from .bench import _timed

_HEADER = struct.Struct("<BI")
(
    _STOP,
    _MLP_SETUP,
    _MLP_FORWARD,
    _MLP_BACKWARD,
    _STEP,
    _RNN_SETUP,
    _RNN_EMBED,
    _RNN_DECODE,
    _RNN_DECODER_BACKWARD,
    _RNN_EMBEDDING_BACKWARD,
) = range(10)


def _send(sock: socket.socket, kind: int, data: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(data)) + data)


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the peer closed the connection")
        got += k
    return buf


def _recv(sock: socket.socket) -> tuple[int, bytearray]:
    kind, n = _HEADER.unpack(_read(sock, _HEADER.size))
    return kind, _read(sock, n) if n else bytearray()


def _floats(data: bytearray, *shape: int):
    import torch

    return torch.frombuffer(data, dtype=torch.float32).view(*shape)


def _bytes(tensor) -> bytes:
    return tensor.detach().numpy().tobytes()


def _connect(port: int, rank: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(bytes([rank]))
    return sock


class _Trainer:
    """Rank 0: the connections to the stages, and the workloads the parent asks for."""

    def __init__(self, ports: list[int]) -> None:
        self.peers = {rank: _connect(port, 0) for rank, port in enumerate(ports) if rank > 0}

    def rnn(self, steps: int) -> list[float]:
        import torch

        ntoken, ninp, nhid, _, batch, seq = bench_models.RNN_SIZES
        ps = self.peers[1]
        torch.manual_seed(0)
        _send(ps, _RNN_SETUP)
        lstm, criterion, hidden = bench_models.lstm_trainer()
        opt = torch.optim.SGD(lstm.parameters(), lr=0.05)

        def step() -> None:
            data, target = bench_models.rnn_batch()
            opt.zero_grad()
            _send(ps, _RNN_EMBED, data.numpy().tobytes())
            embedded = _floats(_recv(ps)[1], seq, batch, ninp).requires_grad_()
            output, _ = lstm(embedded, hidden)
            _send(ps, _RNN_DECODE, _bytes(output))
            decoded = _floats(_recv(ps)[1], seq, batch, ntoken).requires_grad_()
            criterion(decoded.view(-1, ntoken), target).backward()
            _send(ps, _RNN_DECODER_BACKWARD, _bytes(decoded.grad))
            output.backward(_floats(_recv(ps)[1], seq, batch, nhid))
            _send(ps, _RNN_EMBEDDING_BACKWARD, _bytes(embedded.grad))
            _recv(ps)
            _send(ps, _STEP)
            opt.step()
            _recv(ps)

        return _timed(steps, step)

    def mlp(self, steps: int) -> list[float]:
        import torch

        width, batch = bench_models.MLP_SIZES
        first = bench_models.stage(width, 0)
        opt = torch.optim.SGD(first.parameters(), lr=0.01)
        stages = [self.peers[r] for r in (1, 2, 3)]
        for sock in stages:
            _send(sock, _MLP_SETUP)

        def step() -> None:
            x, y = torch.randn(batch, width), torch.randn(batch, width)
            opt.zero_grad()
            h0 = h = first(x)
            for sock in stages:
                _send(sock, _MLP_FORWARD, _bytes(h))
                h = _floats(_recv(sock)[1], batch, width).requires_grad_()
            ((h - y) ** 2).mean().backward()
            _send(stages[-1], _MLP_BACKWARD, _bytes(h.grad))
            h0.backward(_floats(_recv(stages[0])[1], batch, width))  # from stage 1, at the end
            for sock in stages:
                _send(sock, _STEP)
            opt.step()
            for sock in stages:
                _recv(sock)

        return _timed(steps, step)

    def stop(self) -> None:
        for sock in self.peers.values():
            _send(sock, _STOP)
            sock.close()


def _serve(rank: int, listener: socket.socket, ports: list[int]) -> None:
    """Ranks 1–3: an MLP stage each, and rank 1 the RNN's parameter server too."""
    import torch

    accepted = 2 if rank < len(ports) - 1 else 1  # the trainer, and the stage after this one
    conns = {}
    for _ in range(accepted):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns[_read(sock, 1)[0]] = sock
    listener.close()
    trainer = conns[0]
    before = _connect(ports[rank - 1], rank) if rank > 1 else trainer
    ready = selectors.DefaultSelector()
    for sock in conns.values():
        ready.register(sock, selectors.EVENT_READ)
    state: dict = {}
    while True:
        for key, _ in ready.select():
            kind, data = _recv(key.fileobj)
            if kind == _STOP:
                return
            _handle(rank, kind, data, state, trainer, before, torch)


def _handle(rank: int, kind: int, data: bytearray, state: dict, trainer, before, torch) -> None:
    width, batch = bench_models.MLP_SIZES
    ntoken, ninp, nhid, _, rbatch, seq = bench_models.RNN_SIZES
    if kind == _MLP_SETUP:
        state["stage"] = bench_models.stage(width, rank)
        state["opt"] = torch.optim.SGD(state["stage"].parameters(), lr=0.01)
    elif kind == _MLP_FORWARD:
        state["opt"].zero_grad()
        state["x"] = _floats(data, batch, width).requires_grad_()
        state["y"] = state["stage"](state["x"])
        _send(trainer, _MLP_FORWARD, _bytes(state["y"]))
    elif kind == _MLP_BACKWARD:
        state["y"].backward(_floats(data, batch, width))
        _send(before, _MLP_BACKWARD, _bytes(state["x"].grad))
    elif kind == _STEP:
        state["opt"].step()
        _send(trainer, _STEP)
    elif kind == _RNN_SETUP:
        torch.manual_seed(0)
        state["emb"] = bench_models.embedding_table(ntoken, ninp, 0.5)
        state["dec"] = bench_models.decoder(ntoken, nhid, 0.5)
        params = [*state["emb"].parameters(), *state["dec"].parameters()]
        state["opt"] = torch.optim.SGD(params, lr=0.05)
    elif kind == _RNN_EMBED:
        state["opt"].zero_grad()
        tokens = torch.frombuffer(data, dtype=torch.int64).view(seq, rbatch)
        state["e"] = state["emb"](tokens)
        _send(trainer, _RNN_EMBED, _bytes(state["e"]))
    elif kind == _RNN_DECODE:
        state["out"] = _floats(data, seq, rbatch, nhid).requires_grad_()
        state["d"] = state["dec"](state["out"])
        _send(trainer, _RNN_DECODE, _bytes(state["d"]))
    elif kind == _RNN_DECODER_BACKWARD:
        state["d"].backward(_floats(data, seq, rbatch, ntoken))
        _send(trainer, kind, _bytes(state["out"].grad))
    elif kind == _RNN_EMBEDDING_BACKWARD:
        state["e"].backward(_floats(data, seq, rbatch, ninp))
        _send(trainer, kind)
    else:
        raise ValueError(f"raw floor: unknown message kind {kind}")


#: The workloads the raw floor has.
WORKLOADS = ("rnn", "mlp")


def member(rank: int, listeners: list, ports: list[int], commands, results) -> None:
    """One process of the raw group (``listeners[rank]`` its listening socket, ``ports`` all
    of theirs); rank 0 runs the workloads ``commands`` names, as ``bench_train``'s do."""
    import torch

    torch.set_num_threads(1)
    if rank > 0:
        _serve(rank, listeners[rank], ports)
        return
    trainer = _Trainer(ports)
    results.put("up")
    while (command := commands.get()) is not None:
        name, count = command
        results.put(getattr(trainer, name)(count))
    trainer.stop()


def listeners(world: int) -> tuple[list, list[int]]:
    """A listening socket on 127.0.0.1 for each rank but the trainer (``None`` for it), and
    their ports: made before the processes start, so no one waits for another's address."""
    socks: list = [None]
    for _ in range(1, world):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        socks.append(sock)
    return socks, [0] + [s.getsockname()[1] for s in socks[1:]]
