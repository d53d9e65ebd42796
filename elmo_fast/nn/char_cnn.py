"""CharCNN: the char-CNN half of AllenNLP's `_ElmoCharacterEncoder` on the fused op."""
from typing import Sequence, Tuple

import torch

from elmo_fast import functional


class CharCNN(torch.nn.Module):
    """Char embedding + one Conv1d per filter width + max over positions + activation (spec §4.2 1-3).

    filters: [(width, count), ...] as in options.json's char_cnn.filters. Parameters carry
    AllenNLP's names, `_char_embedding_weights` (num_characters, embedding_dim) and
    `char_conv_{i}.weight` (count_i, embedding_dim, width_i) / `char_conv_{i}.bias` (count_i,), so the
    char-CNN entries of an `_ElmoCharacterEncoder` state_dict load with strict=True.
    Forward: char_ids (..., C) integer in 0..num_characters-1 -> (..., sum count_i).
    """

    def __init__(self, embedding_dim: int, filters: Sequence[Tuple[int, int]], num_characters: int = 262,
                 activation: str = "relu") -> None:
        super().__init__()
        if int(embedding_dim) != embedding_dim or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if int(num_characters) != num_characters or num_characters < 1:
            raise ValueError(f"num_characters must be a positive int, got {num_characters!r}")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
        filters = [tuple(f) for f in filters]
        for i, f in enumerate(filters):
            if len(f) != 2 or any(int(v) != v or v < 1 for v in f):
                raise ValueError(f"filters[{i}] must be (width, count) with positive ints, got {f!r}")
        self._filters = [(int(w), int(m)) for w, m in filters]
        self._activation = activation
        weights = torch.randn(int(num_characters), int(embedding_dim))
        weights[0] = 0  # row 0 is the "no token" slot: zeros, as in the published tables (spec §4.2)
        self._char_embedding_weights = torch.nn.Parameter(weights)
        for i, (width, count) in enumerate(self._filters):
            self.add_module(f"char_conv_{i}", torch.nn.Conv1d(int(embedding_dim), count, width, bias=True))

    @property
    def output_dim(self) -> int:
        return sum(m for _, m in self._filters)

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(char_ids, torch.Tensor):
            raise TypeError(f"char_ids must be a torch.Tensor, got {type(char_ids).__name__}")
        if char_ids.dim() < 1:
            raise ValueError(f"char_ids must have shape (..., C), got {tuple(char_ids.shape)}")
        convs = [getattr(self, f"char_conv_{i}") for i in range(len(self._filters))]
        flat = char_ids.reshape(-1, char_ids.shape[-1])
        out = functional.char_cnn(flat, self._char_embedding_weights, [c.weight for c in convs],
                                  [c.bias for c in convs], self._activation)
        return out.reshape(*char_ids.shape[:-1], self.output_dim)
