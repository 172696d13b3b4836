"""A global batch of token ids, labels and loss mask: what the data readers hand to the training step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64
    loss_mask: torch.Tensor  # [b, s] float
    positions: torch.Tensor | None = None  # [b, s] int64, packed sequences only: 0 where each sample starts

    @property
    def packed(self) -> bool:
        return self.positions is not None

    @property
    def position_ids(self) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(*(None if t is None else t[start:stop] for t in self._fields()))

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device) for t in self._fields()))

    def _fields(self):
        return self.tokens, self.labels, self.loss_mask, self.positions


def batch_from_tokens(tokens: torch.Tensor) -> Batch:
    """Next-token prediction: labels are tokens shifted left; the last position is masked."""
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0
    return Batch(tokens, labels, mask)
