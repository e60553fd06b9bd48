"""Pure tensor helpers shared across layers (generation, scoring, the methods): no model, no
tokenizer, only torch."""

from __future__ import annotations

import torch


def left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """``[n, longest]`` tensor of the rows, padded on the left with ``value``.

    Raises:
        ValueError: ``rows`` is empty.
    """
    longest = max(len(r) for r in rows)
    return torch.tensor([[value] * (longest - len(r)) + r for r in rows])
