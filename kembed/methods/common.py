"""Building blocks the methods share: chat-formatted examples, left-padded batches and the
answer-only causal-LM loss."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from kembed.tensors import left_pad, padded_batch_mask


def chat_answer_ids(tokenizer, user: str, answer: str, span: str = "answer") -> tuple[list[int], list[int]]:
    """Token ids of a chat with one user turn and the assistant's ``answer``, and the mask of
    the tokens the loss (or score) covers.

    Args:
        span: ``answer`` marks the answer tokens only; ``template`` also marks the assistant
            header and the end-of-turn tokens (the RLAG authors' code).

    Returns:
        ``(ids, mask)`` of equal length; mask is 1 on the covered tokens.
    """
    user_turn = [{"role": "user", "content": user}]
    bare = tokenizer.apply_chat_template(user_turn, tokenize=False)
    prompt = tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user_turn + [{"role": "assistant", "content": answer}], tokenize=False)
    suffix = full[len(prompt) + len(answer):] if full.startswith(prompt + answer) else ""

    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bare_ids, prompt_ids, answer_ids, suffix_ids = enc(bare), enc(prompt), enc(answer), enc(suffix)
    ids = prompt_ids + answer_ids + suffix_ids
    if span == "template" and prompt_ids[: len(bare_ids)] == bare_ids:
        start, end = len(bare_ids), len(ids)
    elif span == "template":
        start, end = len(prompt_ids), len(ids)
    else:
        start, end = len(prompt_ids), len(prompt_ids) + len(answer_ids)
    return ids, [int(start <= i < end) for i in range(len(ids))]


def make_lm_collate(pad_id: int):
    """Collate ``{"input_ids": [...], "loss_mask": [...]}`` examples into left-padded
    ``input_ids``/``attention_mask`` and ``labels`` (-100 where the loss does not look), ``[b, s]``."""

    def collate(examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        labels = [[t if m else -100 for t, m in zip(e["input_ids"], e["loss_mask"])] for e in examples]
        return {"input_ids": left_pad(ids, pad_id), "attention_mask": left_pad([[1] * len(r) for r in ids], 0),
                "labels": left_pad(labels, -100)}

    return collate


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the labelled tokens of a left-padded batch.

    Only the columns from the one before the earliest labelled token go through the LM head
    (``logits_to_keep``): left-padded rows end with their labelled tokens, so SFT-style
    batches skip the ``[b, prompt, vocab]`` logits of the prompt. A padded batch runs under
    :func:`kembed.tensors.padded_batch_mask` (no empty attention row). Equal to
    :func:`lm_loss_reference` up to float error.

    Args:
        batch: ``input_ids``/``attention_mask``/``labels`` ``[b, s]`` (see :func:`make_lm_collate`).

    Returns:
        ``(loss, {})``: the scalar mean over labelled tokens (nats).
    """
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    s = ids.shape[1]
    first = int((labels != -100).float().argmax(1).min())  # earliest labelled column
    keep = min(s, s - first + 1)  # the column before it predicts it
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # [b, s]
    logits = model(input_ids=ids, attention_mask=padded_batch_mask(attention, model), position_ids=positions,
                   logits_to_keep=keep).logits
    targets = labels[:, s - keep + 1:]  # [b, keep - 1]: the tokens columns s-keep .. s-2 predict
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    return loss, {}


def lm_loss_reference(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The straightforward LM loss that :func:`lm_loss` must equal: logits for every position,
    the model's own shifted cross-entropy (``labels=``). The correctness and speed reference
    of ``make perf``."""
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)  # [b, s]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                labels=batch["labels"])
    return out.loss, {}


def fit_lm(ctx, examples: list[dict], epochs: float, label: str) -> dict:
    """Train ``{"input_ids", "loss_mask"}`` examples with the answer-only LM loss through the
    shared backend (``TrainContext.fit``): the one training call of CPT, SFT, RAFT and SimRAG."""
    return ctx.fit(examples, make_lm_collate(ctx.tokenizer.pad_token_id), lm_loss, epochs=epochs,
                   seed=ctx.config.seed, label=label)


def save_examples(ctx, label: str, rows: list[dict]) -> None:
    """Write the text of the examples a training stage trains on to the run directory,
    ``examples/<NNN>-<label>.jsonl`` (NNN: the iteration the stage completes, so the names sort
    in training order), for ``kembed data export`` and for readers without kembed.

    Args:
        label: the stage's name (``sft``, ``stage II``, ``iteration 2/3``, ...).
        rows: one per example, by kind: ``{"prompt", "completion"}`` (one user turn and the
            assistant's reply: SFT, RAFT, SimRAG), ``{"text"}`` (a document: CPT) or
            ``{"prompt", "augmented_prompt", "chosen", "rejected", "knowledge"}`` (RLAG: the
            chosen answer is trained given ``augmented_prompt``, the rejected one given
            ``prompt``).
    """
    from kembed import distributed
    from kembed.runs import write_jsonl

    if distributed.is_main():
        stage = ctx.run.state.get("iterations_done", 0) + 1
        name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        write_jsonl(ctx.run.path / "examples" / f"{stage:03d}-{name}.jsonl", rows)
