"""The result every oracle returns (the contract in the oracles' docstrings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OracleResult:
    kept: list[torch.Tensor]  # per stage: sorted long visual indices (0..V-1) of the original tokens still present
    scores: list[torch.Tensor]  # per stage: (V,) float32 raw score of the tokens present before it; nan otherwise
    logits: torch.Tensor  # (1, N_final, vocab) logits of every position of the final sequence
    extra: dict = field(default_factory=dict)  # method specific
