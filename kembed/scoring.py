"""Option scoring: the log-probability a model gives each answer option of a question.

Two prompt formats (``FORMATS``; :func:`build_prompt` decides the prompt per format and mode):

- ``raw`` (the default and the headline; the RLAG evaluation protocol, methods.md, "Shared
  evaluation protocol"): the scored text is ``prompt + answer_prefix + option`` (by default
  ``question + " " + option``), no chat template, no special tokens;
- ``chat``: the user turn goes through the model's chat template with the generation prompt
  (``apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)``)
  and each option is scored as the assistant's reply: the option tokens alone, right after the
  generation prompt (no answer prefix, no end-of-turn). The user turn is
  ``PromptFormat.chat_closed_book`` in closed-book and
  :func:`kembed.prompts.documents_prompt` (the RAFT / SimRAG layout) with knowledge.

For each option the option tokens are scored after the prompt and the argmax is predicted.
Three scorers come from the same forward passes:

- ``token_mean``: mean log-prob of the option tokens (the paper's scorer, the headline);
- ``sum``: summed log-prob (lm-eval ``acc``);
- ``char_norm``: summed log-prob divided by the option's length in characters (lm-eval
  ``acc_norm``).

Two implementations give the same numbers, in both formats: ``shared_prefix`` runs the prompt
once, keeps its keys and values, and scores all options in one batched forward on top of them;
``reference`` runs one full sequence per option and is the correctness reference in the tests.
Both consume the same prompt and option token ids (:func:`encode_options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kembed.errors import ModelError
from kembed.models import Placement
from kembed.prompts import FORMATS, PromptFormat, documents_prompt, truncate_knowledge
from kembed.records import QARecord

SCORERS = ("token_mean", "sum", "char_norm")
IMPLEMENTATIONS = ("shared_prefix", "reference")


@dataclass
class OptionScores:
    """Per-option log-probs of one question.

    Attributes:
        logprob_sum: summed log-prob (nats) of each option's tokens, shape ``[L]``.
        n_tokens: number of tokens of each option, ``[L]``.
        n_chars: number of characters of each option text, ``[L]``.
    """

    logprob_sum: list[float]
    n_tokens: list[int]
    n_chars: list[int]

    def scores(self, scorer: str) -> list[float]:
        """The options' scores under ``scorer`` (one of ``SCORERS``)."""
        if scorer == "token_mean":
            return [s / n for s, n in zip(self.logprob_sum, self.n_tokens)]
        if scorer == "sum":
            return list(self.logprob_sum)
        if scorer == "char_norm":
            return [s / max(c, 1) for s, c in zip(self.logprob_sum, self.n_chars)]
        raise ValueError(f"unknown scorer '{scorer}' ({', '.join(SCORERS)})")

    def predict(self, scorer: str = "token_mean") -> int:
        """Index of the best option under ``scorer`` (first one on ties)."""
        values = self.scores(scorer)
        return max(range(len(values)), key=values.__getitem__)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token.

    Args:
        logits: ``[b, s, v]`` model outputs.
        labels: ``[b, s]`` token ids of the same sequences.

    Returns:
        ``[b, s - 1]``: entry ``[i, t]`` is ``log p(labels[i, t + 1] | labels[i, :t + 1])``.
    """
    logp = logits[:, :-1].float().log_softmax(-1)  # [b, s-1, v]
    return logp.gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)  # [b, s-1]


class ScoringPrompt(NamedTuple):
    """The text every option of a question is scored after.

    Attributes:
        text: the prompt; in ``chat`` format the templated conversation up to and including
            the generation prompt (its special tokens written as text).
        answer_prefix: text put before each option (``PromptFormat.answer_prefix`` in
            ``raw``, ``""`` in ``chat``).
    """

    text: str
    answer_prefix: str


def check_format(fmt: str) -> str:
    """``fmt`` if it is one of ``FORMATS``; otherwise a ``ValueError`` naming the choices."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown scoring format '{fmt}' ({', '.join(FORMATS)})")
    return fmt


def require_chat_template(tokenizer) -> None:
    """Raise ``ModelError`` (a one-line CLI error) when ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ModelError(f"{name} has no chat template: score it with the raw format (--format raw)")


def chat_user_turn(prompts: PromptFormat, record: QARecord, knowledge: tuple[str, ...] | None) -> str:
    """The user turn of chat-format scoring: ``prompts.chat_closed_book`` with the question
    when ``knowledge`` is None (closed-book), else :func:`kembed.prompts.documents_prompt` of
    the question and the (already truncated) knowledge snippets or retrieved documents."""
    if knowledge is None:
        return prompts.chat_prompt(record, None)
    return documents_prompt(record.question, knowledge)


def build_prompt(prompts: PromptFormat, record: QARecord, knowledge: tuple[str, ...] | None,
                 fmt: str = "raw", tokenizer=None) -> ScoringPrompt:
    """The one place that decides the option-scoring prompt per (format, mode).

    Args:
        prompts: templates and answer prefix.
        record: the question.
        knowledge: ``None`` for closed-book; otherwise the snippets (oracle-context) or the
            retrieved documents (retrieved-context), already cut to the token budget.
        fmt: ``"raw"`` (``prompts.scoring_prompt``, scored as ``text + answer_prefix + option``)
            or ``"chat"`` (the user turn of :func:`chat_user_turn` through the tokenizer's chat
            template with the generation prompt; options scored right after it).
        tokenizer: needed for ``chat`` (its chat template).

    Returns:
        A :class:`ScoringPrompt`.

    Raises:
        ValueError: an unknown ``fmt``, or ``chat`` without a tokenizer.
        ModelError: ``chat`` with a tokenizer that has no chat template.
    """
    if check_format(fmt) == "raw":
        return ScoringPrompt(prompts.scoring_prompt(record, knowledge), prompts.answer_prefix)
    if tokenizer is None:
        raise ValueError("the chat scoring format needs the tokenizer (its chat template)")
    require_chat_template(tokenizer)
    user = chat_user_turn(prompts, record, knowledge)
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return ScoringPrompt(text, "")


def encode_options(tokenizer, prompt: str, options: list[str] | tuple[str, ...], answer_prefix: str = " "):
    """Token ids of the prompt and of each option's continuation.

    The prompt and each ``answer_prefix + option`` are tokenized separately with
    ``add_special_tokens=False`` (nothing is added; special tokens written in the text, such as
    a chat template's, are still parsed as such), so every option shares the same prompt
    tokens; both scorer implementations consume these ids. The chat format passes the
    templated prompt and ``answer_prefix=""``.

    Returns:
        ``(prefix_ids, option_ids)``: ``list[int]`` of length P and ``L`` lists of option ids.
    """
    prefix_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    option_ids = [tokenizer(answer_prefix + o, add_special_tokens=False)["input_ids"] for o in options]
    return prefix_ids, option_ids


@torch.no_grad()
def logprob_sums_reference(model, prefix_ids: list[int], option_ids: list[list[int]], device) -> list[float]:
    """Summed option log-probs, one full forward pass per option (the reference scorer).

    Args:
        prefix_ids: the prompt's P token ids (see :func:`encode_options`).
        option_ids: L lists of option token ids.

    Returns:
        ``L`` floats: ``sum_t log p(o_t | prompt, o_<t)`` of each option, in nats.
    """
    sums = []
    for ids in option_ids:
        seq = torch.tensor([prefix_ids + ids], device=device)  # [1, P + n]
        token_lp = gather_logprobs(model(input_ids=seq).logits, seq)  # [1, P + n - 1]
        sums.append(token_lp[0, len(prefix_ids) - 1 :].sum().item())
    return sums


@torch.no_grad()
def logprob_sums_shared_prefix(model, prefix_ids: list[int], option_ids: list[list[int]], device) -> list[float]:
    """Summed option log-probs from one prompt computation shared by all options.

    The prompt runs once (``[1, P]``) and its keys/values are repeated for the ``L`` options,
    which run together as one right-padded batch ``[L, M]`` on top of the cache.

    Returns:
        ``L`` floats in nats, equal (up to float error) to :func:`logprob_sums_reference`.
    """
    prefix = torch.tensor([prefix_ids], device=device)  # [1, P]
    out = model(input_ids=prefix, use_cache=True, logits_to_keep=1)  # only the last position is needed
    first_logp = out.logits[0, -1].float().log_softmax(-1)  # [v]: distribution of option token 0
    n_opt, longest, P = len(option_ids), max(len(o) for o in option_ids), len(prefix_ids)
    ids = torch.zeros(n_opt, longest, dtype=torch.long, device=device)  # [L, M], pad = 0
    real = torch.zeros(n_opt, longest, dtype=torch.bool, device=device)  # [L, M]
    for i, o in enumerate(option_ids):
        ids[i, : len(o)] = torch.tensor(o, device=device)
        real[i, : len(o)] = True
    token_lp = first_logp[ids[:, 0]].unsqueeze(1)  # [L, 1]
    if longest > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_opt)
        attention = torch.cat([torch.ones(n_opt, P, dtype=torch.long, device=device), real.long()], 1)  # [L, P+M]
        positions = torch.arange(P, P + longest, device=device).expand(n_opt, -1)  # [L, M]
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache).logits
        token_lp = torch.cat([token_lp, gather_logprobs(logits, ids)], 1)  # [L, M]
    return (token_lp * real).sum(1).tolist()


class OptionScorer:
    """Scores the options of QA records with a model.

    Args:
        model: a causal LM (HF or peft) on ``placement.device``; put in eval mode by ``score``.
        tokenizer: its tokenizer.
        placement: device and precision (bf16 autocast when asked).
        prompts: the prompt templates and knowledge budget.
        implementation: ``"shared_prefix"`` (default) or ``"reference"``.
        fmt: ``"raw"`` (default, the paper's protocol) or ``"chat"`` (the model's chat
            template; see :func:`build_prompt`).

    Raises:
        ValueError: an unknown implementation or format.
        ModelError: ``fmt="chat"`` with a tokenizer that has no chat template.
    """

    def __init__(self, model, tokenizer, placement: Placement, prompts: PromptFormat | None = None,
                 implementation: str = "shared_prefix", fmt: str = "raw"):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown scorer implementation '{implementation}' ({', '.join(IMPLEMENTATIONS)})")
        self.fmt = check_format(fmt)
        if fmt == "chat":
            require_chat_template(tokenizer)
        self.model, self.tokenizer, self.placement = model, tokenizer, placement
        self.prompts = prompts or PromptFormat()
        self._sums = logprob_sums_shared_prefix if implementation == "shared_prefix" else logprob_sums_reference

    def knowledge(self, record: QARecord) -> tuple[str, ...]:
        """The record's knowledge snippets cut to the prompt format's token budget."""
        return truncate_knowledge(record.knowledge, self.tokenizer, self.prompts.knowledge_max_tokens)

    def prompt(self, record: QARecord, knowledge: tuple[str, ...] | None = None) -> ScoringPrompt:
        """The scoring prompt of ``record`` in this scorer's format (see :func:`build_prompt`)."""
        return build_prompt(self.prompts, record, knowledge, self.fmt, self.tokenizer)

    def score(self, record: QARecord, knowledge: tuple[str, ...] | None = None) -> OptionScores:
        """Score every option of ``record``; ``knowledge=None`` is closed-book, otherwise the
        given snippets or documents go in the prompt (already truncated: see ``knowledge``)."""
        prompt = self.prompt(record, knowledge)
        prefix_ids, option_ids = encode_options(self.tokenizer, prompt.text, record.options, prompt.answer_prefix)
        was_training = self.model.training
        self.model.eval()
        with self.placement.autocast():
            sums = self._sums(self.model, prefix_ids, option_ids, self.placement.device)
        self.model.train(was_training)
        return OptionScores(sums, [len(o) for o in option_ids], [len(o) for o in record.options])
