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


def _unwrapped(model):
    """``model`` seen through the ``DistributedDataParallel`` wrapper a multi-process trainer
    passes to the loss (which, unlike peft and compiled models, does not forward ``config``)."""
    return getattr(model, "module", model)


def _attention_of(model) -> str:
    return getattr(_unwrapped(model).config, "_attn_implementation", "sdpa")


def model_attention_mask(allowed: torch.Tensor, model) -> torch.Tensor:
    """A boolean attention mask (True = attend) in the form ``model``'s attention takes: as is
    for SDPA, additive (0 where allowed, the dtype's minimum elsewhere) for eager attention,
    which adds the mask to the scores.

    Args:
        allowed: ``[n, 1, q, k]`` boolean.

    Returns:
        ``[n, 1, q, k]``, boolean or in the dtype of ``model``'s weights.
    """
    if _attention_of(model) != "eager":
        return allowed
    dtype = next(_unwrapped(model).parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def sliding_window(model) -> int | None:
    """The sliding window of ``model``'s attention in tokens (on some or all of its layers), or
    None when it attends to the whole sequence."""
    config = _unwrapped(model).config
    return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None


def packed_attention_mask(allowed: torch.Tensor, positions: torch.Tensor, model):
    """The attention mask of a packed row for each kind of ``model``'s layers, so that a layer
    with a sliding window keeps it: transformers applies a 4D mask as given, on every layer.

    A sliding-window layer lets a query attend to a key only when their distance is less than
    the window (``q - k < sliding_window``, as transformers' ``sliding_window_overlay``); in a
    packed row the distance is that of their positions in their own sequence.

    Args:
        allowed: ``[n, 1, s, s]`` boolean (query, key): the mask without a window.
        positions: ``[n, s]``: each token's position in its own sequence (its position id).
        model: the model the mask is for.

    Returns:
        :func:`model_attention_mask` of ``allowed`` for a model without a sliding window; of
        ``allowed`` within the window for a model whose every layer has it (Mistral); and for a
        model whose ``config.layer_types`` mix ``full_attention`` and ``sliding_attention``
        layers (Gemma 2 and 3, Qwen2 with ``max_window_layers``), a dict of the two, which those
        models take as ``attention_mask``.

    Raises:
        ModelError: a layer type other than full and sliding attention (chunked attention).
    """
    from kembed.errors import ModelError

    config, window = _unwrapped(model).config, sliding_window(model)
    types = set(getattr(config, "layer_types", None) or ["sliding_attention"]) if window else {"full_attention"}
    unknown = types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ModelError(f"packed scoring has no mask for {', '.join(sorted(unknown))} layers "
                         f"({type(config).__name__}); score with --scorer shared_prefix")
    masks = {"full_attention": lambda: model_attention_mask(allowed, model),
             "sliding_attention": lambda: model_attention_mask(
                 allowed & (positions[:, None, :, None] - positions[:, None, None, :] < window), model)}
    if len(types) == 1:
        return masks[types.pop()]()
    return {kind: make() for kind, make in masks.items()}


def padded_batch_mask(attention: torch.Tensor, model) -> torch.Tensor:
    """The attention mask to train a left-padded batch with, in which no query row is empty.

    A real token attends to the real tokens at or before it, as under the causal padding mask
    transformers builds from ``attention``. A padding token attends to itself alone, where that
    mask leaves its row empty. Nothing reads a padding position's output (no real token
    attends to it, and no loss reads it), so the loss and its gradient are those of the
    ``attention`` mask wherever that row has a finite gradient. Empty rows are an edge case of
    the fused SDPA kernels (pytorch/pytorch#103749, #109517: NaN outputs for fully masked
    rows); transformers unmasked them itself before torch 2.5 (``allow_torch_fix`` in
    ``masking_utils.sdpa_mask``).

    Args:
        attention: ``[n, s]``, 1 for a real token, 0 for padding (left-padded rows).
        model: the model the mask is for (see :func:`model_attention_mask`).

    Returns:
        ``attention`` unchanged when no row is padded, when the model's attention is neither
        SDPA nor eager (flash attention takes no 4D mask), or when it uses a sliding window
        (transformers applies a 4D mask as given, which would drop the window); else
        ``[n, 1, s, s]``.
    """
    if bool(attention.all()) or _attention_of(model) not in ("sdpa", "eager") or sliding_window(model):
        return attention
    s = attention.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention.device).tril()  # [s, s]: query, key
    eye = torch.eye(s, dtype=torch.bool, device=attention.device)
    allowed = (causal[None] & attention.bool()[:, None, :]) | eye[None]  # [n, s, s]
    return model_attention_mask(allowed[:, None], model)
