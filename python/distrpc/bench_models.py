"""The models :mod:`distrpc.bench_train` and :mod:`distrpc.bench_raw` train: torch's RNN
tutorial's embedding table and decoder, and the MLP's stages (one definition for every
implementation measured, so that all train the same thing).

>>> stage(256, 1)
Sequential(
  (0): Linear(in_features=256, out_features=256, bias=True)
  (1): ReLU()
)
"""

from __future__ import annotations

#: The tutorial-sized RNN: tokens, inputs, hidden, layers, batch, sequence length.
RNN_SIZES = (10, 2, 3, 4, 5, 20)
#: The MLP's width and batch.
MLP_SIZES = (256, 32)


def embedding_table(ntoken: int, ninp: int, dropout: float):
    """The tutorial's ``EmbeddingTable`` (on the parameter server): an embedding, then dropout."""
    import torch

    table = torch.nn.Sequential(torch.nn.Embedding(ntoken, ninp), torch.nn.Dropout(dropout))
    table[0].weight.data.uniform_(-0.1, 0.1)
    return table


def decoder(ntoken: int, nhid: int, dropout: float):
    """The tutorial's ``Decoder`` (on the parameter server): dropout, then a linear layer."""
    import torch

    dec = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(nhid, ntoken))
    dec[1].weight.data.uniform_(-0.1, 0.1)
    dec[1].bias.data.zero_()
    return dec


def lstm_trainer():
    """The trainer's part of the RNN: its LSTM, the loss, and the LSTM's starting state."""
    import torch

    _, ninp, nhid, nlayers, batch, _ = RNN_SIZES
    lstm = torch.nn.LSTM(ninp, nhid, nlayers, dropout=0.5)
    hidden = (torch.zeros(nlayers, batch, nhid), torch.zeros(nlayers, batch, nhid))
    return lstm, torch.nn.CrossEntropyLoss(), hidden


def rnn_batch():
    """A step's tokens (``(sequence, batch)``) and targets."""
    import torch

    ntoken, _, _, _, batch, seq = RNN_SIZES
    return torch.randint(0, ntoken, (seq, batch)), torch.randint(0, ntoken, (seq * batch,))


def stage(width: int, seed: int):
    """One stage of the MLP: ``Linear(width, width) + ReLU``, its parameters from ``seed``."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
