"""Vocabulary-parallel embedding and LM head: each rank holds ceil(V / size) rows (the last rank's
tail zero padded); lookups all-reduce, logits all-gather. A tied LM head reuses the embedding's
parameter object, so the model has (and the checkpoint carries) one tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import TensorParallel
from workers.layers.sharding import Part, ShardLayout, make_param


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        layout = ShardLayout(0, (Part(None, (vocab_size, hidden_size), tp.size),), tp.rank, tp.size)
        self.rows = layout.piece_len(layout.parts[0])
        self.start = tp.rank * self.rows
        self.weight = make_param(layout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(nn.Module):
    """hidden -> logits over the full vocabulary (on every rank)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tp: TensorParallel,
        tied_to: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight  # the same Parameter: one tensor, one checkpoint name
        else:
            layout = ShardLayout(
                0, (Part(None, (vocab_size, hidden_size), tp.size),), tp.rank, tp.size
            )
            self.weight = make_param(layout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
