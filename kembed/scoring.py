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
  :func:`kembed.prompts.documents_prompt` (the RAFT / SimRAG layout) with knowledge;
- ``raft`` (the format RAFT trains in): the user turn is :func:`kembed.prompts.raft_prompt`
  (documents, question, RAFT's instruction) through the chat template; the model first writes
  its reasoning (greedy, :func:`raft_reasoning`), and each option is scored as the continuation
  of that reasoning after ``<ANSWER>:`` (:func:`kembed.prompts.answer_stem`) with a space
  before it.

For each option the option tokens are scored after the prompt and the argmax is predicted.
Three scorers come from the same forward passes:

- ``token_mean``: mean log-prob of the option tokens (the paper's scorer, the headline);
- ``sum``: summed log-prob (lm-eval ``acc``);
- ``char_norm``: summed log-prob divided by the option's length in characters (lm-eval
  ``acc_norm``).

Three implementations give the same numbers, in every format: ``packed`` (the default) runs
each prompt once with its options after it in one row under a 4D attention mask, several
questions per row without padding, one forward pass per row (:func:`logprob_sums_packed`);
``shared_prefix`` runs the prompts once, keeps their keys and values, and scores all options in a
second batched forward on top of them; both group questions by length under a token budget and
halve and retry a group that runs out of memory. ``reference`` runs one full sequence per option
and is the correctness reference in the tests and in ``make perf``.
All consume the same prompt and option token ids (:func:`encode_options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kembed.errors import ModelError
from kembed.models import Placement, inference_weights
from kembed.prompts import FORMATS, PromptFormat, answer_stem, documents_prompt, raft_prompt, truncate_knowledge
from kembed.records import QARecord
from kembed.tensors import packed_attention_mask

SCORERS = ("token_mean", "sum", "char_norm")
IMPLEMENTATIONS = ("packed", "shared_prefix", "reference")


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
                 fmt: str = "raw", tokenizer=None, reasoning: str | None = None) -> ScoringPrompt:
    """The one place that decides the option-scoring prompt per (format, mode).

    Args:
        prompts: templates and answer prefix.
        record: the question.
        knowledge: ``None`` for closed-book; otherwise the snippets (oracle-context) or the
            retrieved documents (retrieved-context), already cut to the token budget.
        fmt: ``"raw"`` (``prompts.scoring_prompt``, scored as ``text + answer_prefix + option``)
            or ``"chat"`` (the user turn of :func:`chat_user_turn` through the tokenizer's chat
            template with the generation prompt; options scored right after it).
            ``raft``: :func:`kembed.prompts.raft_prompt` through the chat template, then the
            model's ``reasoning`` up to ``<ANSWER>:``; options scored after a space.
        tokenizer: needed for ``chat`` and ``raft`` (its chat template).
        reasoning: ``raft`` only: what the model wrote for this prompt (:func:`raft_reasoning`).

    Returns:
        A :class:`ScoringPrompt`.

    Raises:
        ValueError: an unknown ``fmt``, ``chat`` or ``raft`` without a tokenizer, or ``raft``
            without ``reasoning``.
        ModelError: ``chat`` or ``raft`` with a tokenizer that has no chat template.
    """
    if check_format(fmt) == "raw":
        return ScoringPrompt(prompts.scoring_prompt(record, knowledge), prompts.answer_prefix)
    if tokenizer is None:
        raise ValueError(f"the {fmt} scoring format needs the tokenizer (its chat template)")
    require_chat_template(tokenizer)
    if fmt == "raft":
        if reasoning is None:
            raise ValueError("the raft scoring format scores after the model's reasoning: generate it first "
                             "(kembed.scoring.raft_reasoning)")
        return ScoringPrompt(chat_generation_prompt(tokenizer, raft_prompt(record.question, knowledge or ()))
                             + answer_stem(reasoning), " ")
    return ScoringPrompt(chat_generation_prompt(tokenizer, chat_user_turn(prompts, record, knowledge)), "")


def chat_generation_prompt(tokenizer, user: str) -> str:
    """``user`` as the one user turn of the tokenizer's chat template, with the generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


#: Tokens the model may write before ``<ANSWER>:`` in ``raft``-format scoring (``kembed eval --reasoning-tokens``).
DEFAULT_REASONING_TOKENS = 128


def raft_reasoning(model, tokenizer, placement: Placement, records: list[QARecord],
                   knowledge: list[tuple[str, ...] | None], max_new_tokens: int = DEFAULT_REASONING_TOKENS,
                   progress=None) -> list[str]:
    """What the model writes (greedy, :class:`kembed.generation.LocalGenerator`) for each
    record's RAFT user turn (:func:`kembed.prompts.raft_prompt` of its question and
    ``knowledge[i]``, None meaning no documents): the reasoning ``raft``-format scoring scores
    the options after. ``progress(k)`` advances as k records finish.

    Raises:
        ModelError: the tokenizer has no chat template.
    """
    from kembed.generation import LocalGenerator

    require_chat_template(tokenizer)
    generator = LocalGenerator(model, tokenizer, placement, max_new_tokens=max_new_tokens, name="raft-reasoning")
    return generator.generate([raft_prompt(r.question, k or ()) for r, k in zip(records, knowledge)], progress)


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
def logprob_sums_shared_prefix(model, questions: list[tuple[list[int], list[list[int]]]], device) -> list[list[float]]:
    """Summed option log-probs of several questions, each prompt computed once for its options.

    The B prompts run as one left-padded batch ``[B, P]`` (position ids count real tokens
    only) that keeps its keys and values; each question's cache row is then repeated once per
    option and the N options of all questions run as one right-padded batch ``[N, M]`` on top
    of it. Only the last prompt position goes through the LM head.

    Args:
        questions: ``(prefix_ids, option_ids)`` of each question (see :func:`encode_options`).

    Returns:
        Per question, one float per option: ``sum_t log p(o_t | prompt, o_<t)`` in nats, equal
        (up to float error) to :func:`logprob_sums_reference`.
    """
    n_q = len(questions)
    prompt_len = torch.tensor([len(p) for p, _ in questions], device=device)  # [B]
    P = int(prompt_len.max())
    prefix = torch.zeros(n_q, P, dtype=torch.long, device=device)  # [B, P], left-padded with 0
    prefix_attention = torch.zeros(n_q, P, dtype=torch.long, device=device)  # [B, P]
    for i, (p, _) in enumerate(questions):
        prefix[i, P - len(p):] = torch.tensor(p, device=device)
        prefix_attention[i, P - len(p):] = 1
    positions = (prefix_attention.cumsum(1) - 1).clamp(min=0)  # [B, P]
    out = model(input_ids=prefix, attention_mask=prefix_attention, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    first_logp = out.logits[:, -1].float().log_softmax(-1)  # [B, v]: distribution of each option's token 0
    options = [o for _, opts in questions for o in opts]
    owner = torch.tensor([q for q, (_, opts) in enumerate(questions) for _ in opts], device=device)  # [N]
    M = max(len(o) for o in options)
    ids = torch.zeros(len(options), M, dtype=torch.long, device=device)  # [N, M], right-padded with 0
    real = torch.zeros(len(options), M, dtype=torch.bool, device=device)  # [N, M]
    for i, o in enumerate(options):
        ids[i, : len(o)] = torch.tensor(o, device=device)
        real[i, : len(o)] = True
    token_lp = first_logp[owner, ids[:, 0]].unsqueeze(1)  # [N, 1]
    if M > 1:
        cache = out.cache
        cache.batch_select_indices(owner)  # [B, ...] -> [N, ...]: each question's row once per option
        attention = torch.cat([prefix_attention[owner], real.long()], 1)  # [N, P + M]
        option_positions = prompt_len[owner].unsqueeze(1) + torch.arange(M, device=device)  # [N, M]
        logits = model(input_ids=ids, attention_mask=attention, position_ids=option_positions,
                       cache=cache, logits_to_keep=M).logits  # [N, M, v]
        # only positions whose next token is a real option token: padding skips the fp32 softmax
        scored = real[:, 1:]  # [N, M-1]: position t predicts option token t + 1
        rows = logits[:, :-1][scored].float()  # [R, v]
        rest = torch.zeros(len(options), M - 1, device=device)  # [N, M-1]
        rest[scored] = rows.gather(-1, ids[:, 1:][scored].unsqueeze(-1)).squeeze(-1) - rows.logsumexp(-1)
        token_lp = torch.cat([token_lp, rest], 1)  # [N, M]
    sums = (token_lp * real).sum(1).tolist()  # [N]
    result, k = [], 0
    for _, opts in questions:
        result.append(sums[k:k + len(opts)])
        k += len(opts)
    return result


def packed_length(question: tuple[list[int], list[list[int]]]) -> int:
    """Tokens one question takes in a packed row (:func:`logprob_sums_packed`): its prompt, then
    each option but its last token (no position predicts from an option's last token)."""
    prefix, options = question
    return len(prefix) + sum(len(o) - 1 for o in options)


@torch.no_grad()
def logprob_sums_packed(model, questions: list[tuple[list[int], list[list[int]]]], device) -> list[list[float]]:
    """Summed option log-probs of several questions in one forward pass over one packed row.

    The row holds, for each question in turn, its prompt once and then each option's tokens but
    the last, with no padding and no copy of the prompt's keys and values. A 4D attention mask
    ``[1, 1, S, S]`` lets a prompt token attend to the earlier tokens of its own prompt, and an
    option token to its question's prompt and to the earlier tokens of its own option, within
    the sliding window of the layers that have one (:func:`kembed.tensors.packed_attention_mask`); position
    ids restart after the prompt for every option. Only the positions that predict an option
    token go through the LM head (``logits_to_keep`` as an index tensor): the prompt's last
    position (each option's first token) and every kept option token (the next one).

    Args:
        questions: ``(prefix_ids, option_ids)`` of each question (see :func:`encode_options`);
            every option has at least one token.
        device: where the row runs.

    Returns:
        Per question, one float per option: ``sum_t log p(o_t | prompt, o_<t)`` in nats, equal
        (up to float error) to :func:`logprob_sums_reference`.
    """
    ids, positions, question_of, option_of = [], [], [], []  # per row token
    predictor, target, owner = [], [], []  # per scored option token: the row position predicting it
    n_options = 0
    for q, (prefix, options) in enumerate(questions):
        last = len(ids) + len(prefix) - 1
        ids += prefix
        positions += range(len(prefix))
        question_of += [q] * len(prefix)
        option_of += [0] * len(prefix)
        for k, option in enumerate(options, 1):
            start = len(ids)
            ids += option[:-1]
            positions += range(len(prefix), len(prefix) + len(option) - 1)
            question_of += [q] * (len(option) - 1)
            option_of += [k] * (len(option) - 1)
            predictor += [last, *range(start, start + len(option) - 1)]
            target += option
            owner += [n_options] * len(option)
            n_options += 1
    question_ids = torch.tensor(question_of, device=device)  # [S]
    option_ids = torch.tensor(option_of, device=device)  # [S]
    index = torch.arange(len(ids), device=device)  # [S]
    allowed = ((question_ids[:, None] == question_ids[None, :]) & (index[None, :] <= index[:, None])
               & ((option_ids[None, :] == 0) | (option_ids[None, :] == option_ids[:, None])))  # [S, S]: query, key
    position_ids = torch.tensor([positions], device=device)  # [1, S]
    mask = packed_attention_mask(allowed[None, None], position_ids, model)  # [1, 1, S, S] (per layer type)
    keep, row_of = torch.unique(torch.tensor(predictor, device=device), return_inverse=True)  # [K], [T]
    logits = model(input_ids=torch.tensor([ids], device=device), attention_mask=mask,
                   position_ids=position_ids, use_cache=False,
                   logits_to_keep=keep).logits[0].float()  # [K, v]
    token_lp = logits[row_of, torch.tensor(target, device=device)] - logits.logsumexp(-1)[row_of]  # [T]
    sums = torch.zeros(n_options, device=device).index_add_(0, torch.tensor(owner, device=device), token_lp).tolist()
    result, k = [], 0
    for _, options in questions:
        result.append(sums[k:k + len(options)])
        k += len(options)
    return result


def packed_rows(questions: list[tuple[list[int], list[list[int]]]], row_tokens: int) -> list[list[int]]:
    """Group question indices into packed rows of at most ``row_tokens`` tokens
    (:func:`packed_length`; a longer question gets a row of its own), in order of length so that
    a row's questions are alike."""
    order = sorted(range(len(questions)), key=lambda i: packed_length(questions[i]))
    rows, current, used = [], [], 0
    for i in order:
        n = packed_length(questions[i])
        if current and used + n > row_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return rows + [current] if current else rows


def batch_cost(questions: list[tuple[list[int], list[list[int]]]]) -> int:
    """Tokens a :func:`logprob_sums_shared_prefix` batch holds: the padded prompt batch plus,
    per option, its padded option tokens and its copy of the cached prompt. Activations, the
    repeated cache and the option logits all grow with it, so it bounds the batch's memory."""
    P = max(len(p) for p, _ in questions)
    M = max(len(o) for _, opts in questions for o in opts)
    return len(questions) * P + sum(len(opts) for _, opts in questions) * (P + M)


def token_budget_batches(questions: list[tuple[list[int], list[list[int]]]], max_tokens: int) -> list[list[int]]:
    """Group question indices into batches whose :func:`batch_cost` stays within ``max_tokens``
    (a question that alone exceeds it gets a batch of its own), sorted by the question's
    prompt plus option tokens so that a batch pads its prompts and its options little."""
    order = sorted(range(len(questions)), key=lambda i: len(questions[i][0]) + sum(map(len, questions[i][1])))
    batches, current = [], []
    for i in order:
        if current and batch_cost([questions[j] for j in current + [i]]) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA out-of-memory error or a CPU allocator failure."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def run_halving(fn, items: list, on_done=None) -> list:
    """``fn(items)`` (one result per item); on out-of-memory, run each half on its own, halving
    again as needed, and concatenate the results. ``on_done(k)`` is called as each k items finish.

    Raises:
        ModelError: a single item still runs out of memory.
    """
    try:
        result = fn(items)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not is_out_of_memory(error):
            raise
        if len(items) == 1:
            raise ModelError(f"out of memory on a single item (one question or prompt): {str(error).splitlines()[0]}") from error
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        return run_halving(fn, items[:half], on_done) + run_halving(fn, items[half:], on_done)
    if on_done is not None:
        on_done(len(items))
    return result


#: Default token budget of one scoring forward pass per implementation (``kembed eval
#: --batch-tokens``): a packed row's length (:func:`packed_length`; attention in a row grows with
#: its square, and closed-book scoring measured fastest at 512 of 512 / 1024 / 2048), or a
#: shared-prefix batch's :func:`batch_cost`.
DEFAULT_BATCH_TOKENS = {"packed": 512, "shared_prefix": 4096, "reference": 1}


class OptionScorer:
    """Scores the options of QA records with a model.

    Args:
        model: a causal LM (HF or peft) on ``placement.device``; put in eval mode while scoring.
        tokenizer: its tokenizer.
        placement: device and precision (under bf16, scored on a bf16 copy of the weights:
            :func:`kembed.models.inference_weights`).
        prompts: the prompt templates and knowledge budget.
        implementation: ``"packed"`` (default: questions packed into rows, one forward each),
            ``"shared_prefix"`` (prompts, then options over their cached keys and values; both
            with bf16 weights under bf16) or ``"reference"`` (one full sequence per option, one
            question at a time, under the placement's autocast).
        fmt: ``"raw"`` (default, the paper's protocol), ``"chat"`` (the model's chat
            template) or ``"raft"`` (RAFT's instruction, options scored after the model's
            reasoning); see :func:`build_prompt`.
        batch_tokens: the token budget of one forward pass: a packed row's length
            (:func:`packed_length`) or a shared-prefix batch's :func:`batch_cost`; None: the
            implementation's :data:`DEFAULT_BATCH_TOKENS`. A batch that runs out of memory is
            halved and retried.

    Raises:
        ValueError: an unknown implementation or format, or ``batch_tokens`` < 1.
        ModelError: ``fmt`` ``chat`` or ``raft`` with a tokenizer that has no chat template.
    """

    def __init__(self, model, tokenizer, placement: Placement, prompts: PromptFormat | None = None,
                 implementation: str = "packed", fmt: str = "raw", batch_tokens: int | None = None):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown scorer implementation '{implementation}' ({', '.join(IMPLEMENTATIONS)})")
        batch_tokens = DEFAULT_BATCH_TOKENS[implementation] if batch_tokens is None else batch_tokens
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.fmt = check_format(fmt)
        if fmt != "raw":
            require_chat_template(tokenizer)
        self.model, self.tokenizer, self.placement = model, tokenizer, placement
        self.prompts = prompts or PromptFormat()
        self.implementation, self.batch_tokens = implementation, batch_tokens

    def knowledge(self, record: QARecord) -> tuple[str, ...]:
        """The record's knowledge snippets cut to the prompt format's token budget."""
        return truncate_knowledge(record.knowledge, self.tokenizer, self.prompts.knowledge_max_tokens)

    def prompt(self, record: QARecord, knowledge: tuple[str, ...] | None = None,
               reasoning: str | None = None) -> ScoringPrompt:
        """The scoring prompt of ``record`` in this scorer's format (see :func:`build_prompt`)."""
        return build_prompt(self.prompts, record, knowledge, self.fmt, self.tokenizer, reasoning)

    def encode(self, record: QARecord, knowledge: tuple[str, ...] | None,
               reasoning: str | None = None) -> tuple[list[int], list[list[int]]]:
        """``(prefix_ids, option_ids)`` of ``record`` with ``knowledge`` (see :func:`encode_options`)."""
        prompt = self.prompt(record, knowledge, reasoning)
        return encode_options(self.tokenizer, prompt.text, record.options, prompt.answer_prefix)

    def score(self, record: QARecord, knowledge: tuple[str, ...] | None = None,
              reasoning: str | None = None) -> OptionScores:
        """Score every option of ``record``; ``knowledge=None`` is closed-book, otherwise the
        given snippets or documents go in the prompt (already truncated: see ``knowledge``);
        ``reasoning``: the ``raft`` format's (see :func:`raft_reasoning`)."""
        return self.score_many([record], [knowledge], reasoning=None if reasoning is None else [reasoning])[0]

    def score_many(self, records: list[QARecord], knowledge: list[tuple[str, ...] | None],
                   progress=None, reasoning: list[str] | None = None) -> list[OptionScores]:
        """Score the options of many records (``knowledge[i]`` goes with ``records[i]``, None
        for closed-book; in ``raft`` format ``reasoning[i]`` too, see :func:`raft_reasoning`),
        in batches of questions sorted by length under the token budget; ``progress(k)`` is
        called as each k records finish. Returns one :class:`OptionScores` per record, in order."""
        encoded = [self.encode(r, k, reasoning[i] if reasoning is not None else None)
                   for i, (r, k) in enumerate(zip(records, knowledge))]
        sums: list[list[float] | None] = [None] * len(records)
        device = next(self.model.parameters()).device  # this process's device under a launch
        if self.implementation == "reference":  # the straightforward path: autocast over the weights
            batches, (model, context) = [[i] for i in range(len(records))], (self.model, self.placement.autocast())
        else:
            batches = (packed_rows(encoded, self.batch_tokens) if self.implementation == "packed"
                       else token_budget_batches(encoded, self.batch_tokens))
            model, context = inference_weights(self.model, self.placement)
        was_training = model.training
        model.eval()

        def run(indices: list[int]) -> list[list[float]]:
            if self.implementation == "reference":
                return [logprob_sums_reference(model, *encoded[i], device) for i in indices]
            scorer = logprob_sums_packed if self.implementation == "packed" else logprob_sums_shared_prefix
            return scorer(model, [encoded[i] for i in indices], device)

        try:
            with context:
                for batch in batches:
                    for i, values in zip(batch, run_halving(run, batch, progress)):
                        sums[i] = values
        finally:
            model.train(was_training)
        return [OptionScores(s, [len(o) for o in encoded[i][1]], [len(o) for o in r.options])
                for i, (s, r) in enumerate(zip(sums, records))]
