"""RLAG: reinforcement learning from augmented generation (Nie et al., EMNLP 2025,
arXiv 2509.20162), as described in methods.md.

Each iteration samples, then optimises:

1. Sampling (no gradient, current weights, gold labels not used): score every option with the
   knowledge snippets Z in the prompt and without them. The chosen answer y_w is the argmax
   with Z ("augmented generation"), the rejected answer y_l the argmax without ("naive
   generation").
2. Loss (the authors' code; the figure's variants are options)::

       L = -log sigmoid(beta_D * lz + beta_A * min(lw, eps1) - beta_A * max(ll, eps2) - gamma)

   with lw, ll, lz the mean token log-probs of y_w (chat prompt with Z), y_l (chat prompt
   without Z) and of the snippets themselves (each wrapped BOS + z + EOS, concatenated).
   Dynamic beta per example: (beta_D, beta_A) = (0.5, 0.0) when y_w == y_l, else (0.2, 0.5).
3. Iterations: the training set is split into N chunks; for each chunk: sample with the
   current weights, train E epochs with a new optimiser, save; the pass repeats T times.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kembed.config import Strict
from kembed.errors import ConfigError
from kembed.methods.common import chat_answer_ids, save_examples
from kembed.records import QARecord
from kembed.scoring import gather_logprobs
from kembed.tensors import left_pad, padded_batch_mask

NAME = "rlag"
DESCRIPTION = "RLAG: preference-style training of augmented (chosen) vs naive (rejected) answers plus knowledge likelihood"
TERMS = ("knowledge", "chosen", "rejected")


class Config(Strict):
    """The ``rlag:`` recipe section. Defaults follow the authors' code (train.sh / utils.py).

    Attributes:
        chunks: N, number of chunks the training set is split into (one iteration each).
        epochs: E, epochs of training on each chunk's sampled pairs.
        passes: T, passes over all chunks.
        gamma: margin subtracted inside the sigmoid (train.sh: 0.8; config.yaml's 8 saturates).
        eps_chosen: eps1, upper clip of the chosen term (code: -0.2).
        eps_rejected: eps2, lower clip of the rejected term (code: -5.0).
        beta_D, beta_A: betas of examples whose chosen and rejected answers differ, and the
            fixed betas under ``fixed_beta``.
        beta_D_same, beta_A_same: betas of examples whose chosen and rejected answers agree.
        clip_order: ``before_beta`` clips the log-probs (code), ``after_beta`` clips the
            beta-scaled rewards (paper figure).
        knowledge_logprob: ``concat`` = one mean over all concatenated snippets (code),
            ``per_snippet`` = sum of per-snippet means, each snippet scored on its own (figure).
        answer_span: ``template`` = the answer mean includes the chat template's assistant
            header and end-of-turn tokens (code); ``answer`` = answer tokens only (figure).
        chunk_fraction: the seeded random fraction of each chunk's sampled pairs that is
            trained on (the authors' code trains a random 80%: ``int(0.8 * n)`` pairs).
        chunk_order: ``shuffled`` (a seeded shuffle of the training records, cut into N
            chunks) or ``file`` (contiguous chunks in file order, as the authors' code cuts them).
        fixed_subset: the ``chunk_fraction`` of a chunk is the same records in every pass T
            (seeded by the chunk; the authors' setting) instead of a new draw per iteration.
        grad_norm_every: every this many micro-batches, log the gradient norm that each active
            loss term contributes (``grad_norm_<term>``; 0, the default: never); costs one
            extra backward pass per active term each time (``make perf`` measures it).
        no_rejected, no_knowledge, no_gamma, no_clip, fixed_beta, pure_chosen, pure_knowledge,
        pure_rejected, chosen_is_gold: the ablation switches of the reference code
        (NoRejected, NoInformation, NoGamma, NoClip, FixBeta_AD, PureChosen, PureInformation,
        PureRejected, chosen_is_standard_answer) that the paper's Table 3 reports.
    """

    chunks: int = Field(3, ge=1)
    epochs: int = Field(2, ge=1)
    passes: int = Field(1, ge=1)
    gamma: float = Field(0.8, ge=0)
    eps_chosen: float = Field(-0.2, le=0)  # clips a mean log-prob (or beta times one): above 0 it never acts
    eps_rejected: float = Field(-5.0, le=0)
    beta_D: float = Field(0.2, ge=0)
    beta_A: float = Field(0.5, ge=0)
    beta_D_same: float = Field(0.5, ge=0)
    beta_A_same: float = Field(0.0, ge=0)
    clip_order: Literal["before_beta", "after_beta"] = "before_beta"
    knowledge_logprob: Literal["concat", "per_snippet"] = "concat"
    answer_span: Literal["template", "answer"] = "template"
    chunk_fraction: float = Field(1.0, gt=0, le=1)
    chunk_order: Literal["shuffled", "file"] = "shuffled"
    fixed_subset: bool = False
    grad_norm_every: int = Field(0, ge=0)
    no_rejected: bool = False
    no_knowledge: bool = False
    no_gamma: bool = False
    no_clip: bool = False
    fixed_beta: bool = False
    pure_chosen: bool = False
    pure_knowledge: bool = False
    pure_rejected: bool = False
    chosen_is_gold: bool = False

    @model_validator(mode="after")
    def _check(self):
        if sum([self.pure_chosen, self.pure_knowledge, self.pure_rejected]) > 1:
            raise ValueError("at most one of pure_chosen, pure_knowledge, pure_rejected")
        if not self.active_terms():
            raise ValueError("the ablation switches remove every loss term")
        return self

    def active_terms(self) -> tuple[str, ...]:
        """The loss terms in use after the ablation switches."""
        for term, pure in zip(TERMS, (self.pure_knowledge, self.pure_chosen, self.pure_rejected)):
            if pure:
                return (term,)
        dropped = {"knowledge": self.no_knowledge, "rejected": self.no_rejected}
        return tuple(t for t in TERMS if not dropped.get(t, False))

    def betas(self, same: bool) -> tuple[float, float]:
        """(beta_D, beta_A) of an example whose chosen and rejected answers agree (``same``)."""
        if same and not self.fixed_beta:
            return self.beta_D_same, self.beta_A_same
        return self.beta_D, self.beta_A


# ----------------------------------------------------------------------------- loss


def rlag_terms(lz: torch.Tensor, lw: torch.Tensor, ll: torch.Tensor, beta_D: torch.Tensor,
               beta_A: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """The active terms inside the RLAG sigmoid (authors' code, utils.py
    ``compute_rlag_batch_loss``; the paper figure's clipping by option).

    Args:
        lz: ``[b]`` knowledge log-prob (mean, or sum of per-snippet means).
        lw: ``[b]`` mean log-prob of the chosen answer given the prompt with Z.
        ll: ``[b]`` mean log-prob of the rejected answer given the prompt without Z.
        beta_D, beta_A: ``[b]`` per-example betas.
        cfg: the method config (clipping, ablation switches).

    Returns:
        term name (``knowledge``, ``chosen``, ``rejected``) -> ``[b]``, for the active terms
        only; inactive inputs may be any tensor (they are not read).
    """
    eps1, eps2 = cfg.eps_chosen, cfg.eps_rejected
    terms = {}
    active = cfg.active_terms()
    if "knowledge" in active:
        terms["knowledge"] = beta_D * lz  # r_z
    if "chosen" in active:
        if cfg.no_clip:
            terms["chosen"] = beta_A * lw
        elif cfg.clip_order == "before_beta":
            terms["chosen"] = beta_A * lw.clamp(max=eps1)  # code: beta_A * min(lw, -0.2)
        else:
            terms["chosen"] = (beta_A * lw).clamp(max=eps1)  # figure: min(beta * lw, eps1)
    if "rejected" in active:
        if cfg.no_clip:
            terms["rejected"] = -beta_A * ll
        elif cfg.clip_order == "before_beta":
            terms["rejected"] = -beta_A * ll.clamp(min=eps2)  # code: -beta_A * max(ll, -5)
        else:
            terms["rejected"] = -(beta_A * ll).clamp(min=eps2)  # figure: -max(beta * ll, eps2)
    return terms


def rlag_logits(terms: dict[str, torch.Tensor], cfg: Config) -> torch.Tensor:
    """``[b]``: the sum of the active terms minus gamma (0 under ``no_gamma``)."""
    return sum(terms.values()) - (0.0 if cfg.no_gamma else cfg.gamma)


def rlag_loss(lz: torch.Tensor, lw: torch.Tensor, ll: torch.Tensor, beta_D: torch.Tensor,
              beta_A: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Per-example RLAG loss ``[b]``: ``-log sigmoid(sum of active terms - gamma)`` (see
    :func:`rlag_terms` for the arguments)."""
    return -F.logsigmoid(rlag_logits(rlag_terms(lz, lw, ll, beta_D, beta_A, cfg), cfg))  # [b]


def term_grad_norms(model, terms: dict[str, torch.Tensor], logits: torch.Tensor) -> dict[str, float]:
    """The L2 norm of the gradient that each term contributes to the mean loss of a batch.

    ``d mean(-log sigmoid(x)) / d theta = sum over terms t of mean(-sigmoid(-x) * d t / d theta)``
    with ``x = logits`` ``[b]``, so term t's share is the gradient of
    ``mean(-sigmoid(-x).detach() * t)``; the shares add up to the full gradient. A term whose
    clip is active (or whose beta is 0) contributes 0, which shows saturation.

    Returns:
        ``{"grad_norm_<term>": norm}`` for every term in ``terms``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    weight = -torch.sigmoid(-logits.detach())  # [b]: d loss_i / d x_i
    norms = {}
    for name, term in terms.items():
        share = (weight * term).mean()
        grads = torch.autograd.grad(share, params, retain_graph=True, allow_unused=True) if share.requires_grad else []
        squares = [(g.float() ** 2).sum() for g in grads if g is not None]
        norms[f"grad_norm_{name}"] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


# ----------------------------------------------------------------------------- examples


def knowledge_rows(tokenizer, snippets: tuple[str, ...], mode: str) -> list[list[int]]:
    """Token rows for the knowledge term: each snippet wrapped BOS + z + EOS; ``concat`` gives
    one row of all snippets, ``per_snippet`` one row per snippet. No snippets -> one row with
    BOS + EOS, so every example has a knowledge term."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    wrapped = [[bos] + tokenizer(z, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for z in snippets] or [[bos, tokenizer.eos_token_id]]
    return wrapped if mode == "per_snippet" else [sum(wrapped, [])]


def pair_text(record: QARecord, pair: dict, prompts) -> dict:
    """The text one sampled pair trains on: the chosen answer after ``augmented_prompt`` (the
    chat prompt with the knowledge snippets), the rejected answer after ``prompt`` (without
    them), and the ``knowledge`` snippets."""
    knowledge = list(pair["knowledge"])
    return {"prompt": prompts.chat_prompt(record, None),
            "augmented_prompt": prompts.chat_prompt(record, tuple(knowledge) or None),
            "chosen": record.options[pair["chosen_index"]], "rejected": record.options[pair["rejected_index"]],
            "knowledge": knowledge}


def build_example(tokenizer, record: QARecord, pair: dict, prompts, cfg: Config) -> dict:
    """Tokenize one sampled pair (:func:`pair_text`) into the chosen, rejected and knowledge sequences."""
    text = pair_text(record, pair, prompts)
    chosen_ids, chosen_mask = chat_answer_ids(tokenizer, text["augmented_prompt"], text["chosen"], cfg.answer_span)
    rejected_ids, rejected_mask = chat_answer_ids(tokenizer, text["prompt"], text["rejected"], cfg.answer_span)
    return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
            "knowledge_rows": knowledge_rows(tokenizer, tuple(text["knowledge"]), cfg.knowledge_logprob),
            "beta_D": pair["beta_D"], "beta_A": pair["beta_A"]}


def make_collate(pad_id: int):
    """Collate examples into left-padded tensors (every row ends at the last column, so the
    scored answer tokens of a group sit in its last few columns).

    Batch keys: ``chosen_ids``/``chosen_attention``/``chosen_mask`` ``[b, s_c]``, the same for
    ``rejected`` ``[b, s_r]`` and ``knowledge`` ``[k, s_k]`` (k >= b rows), ``knowledge_owner``
    ``[k]`` (the example each row belongs to), ``beta_D``/``beta_A`` ``[b]``.
    """

    def collate(examples: list[dict]) -> dict:
        batch = {}
        for side in ("chosen", "rejected"):
            ids = [e[f"{side}_ids"] for e in examples]
            batch[f"{side}_ids"] = left_pad(ids, pad_id)
            batch[f"{side}_attention"] = left_pad([[1] * len(r) for r in ids], 0)
            batch[f"{side}_mask"] = left_pad([e[f"{side}_mask"] for e in examples], 0)
        rows = [(i, r) for i, e in enumerate(examples) for r in e["knowledge_rows"]]
        batch["knowledge_ids"] = left_pad([r for _, r in rows], pad_id)
        batch["knowledge_attention"] = left_pad([[1] * len(r) for _, r in rows], 0)
        batch["knowledge_mask"] = left_pad([[0] + [1] * (len(r) - 1) for _, r in rows], 0)  # all but the first
        batch["knowledge_owner"] = torch.tensor([i for i, _ in rows])
        batch["beta_D"] = torch.tensor([e["beta_D"] for e in examples], dtype=torch.float)
        batch["beta_A"] = torch.tensor([e["beta_A"] for e in examples], dtype=torch.float)
        return batch

    return collate


def mean_logprobs(model, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log-prob of the masked tokens of each left-padded row.

    Only the last columns that hold scored tokens go through the LM head (``logits_to_keep``),
    which spares the ``[n, s, vocab]`` logits of the prompt. A padded batch runs under
    :func:`kembed.tensors.padded_batch_mask` (no empty attention row).

    Args:
        ids, attention, mask: ``[n, s]``, left-padded; ``mask`` marks the scored tokens (a
            row's first token is never scored: nothing predicts it).

    Returns:
        ``[n]`` mean token log-probs (nats).
    """
    s = ids.shape[1]
    first = int(mask.float().argmax(1).min())  # earliest scored column
    keep = min(s, s - first + 1)  # the column before it predicts it
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # [n, s]: real tokens at 0, 1, ...
    logits = model(input_ids=ids, attention_mask=padded_batch_mask(attention, model), position_ids=positions,
                   logits_to_keep=keep).logits
    token_lp = gather_logprobs(logits, ids[:, s - keep:])  # [n, keep-1]: tokens s-keep+1 .. s-1
    m = mask[:, s - keep + 1:].to(token_lp.dtype)  # [n, keep-1]
    return (token_lp * m).sum(1) / m.sum(1).clamp(min=1)


def mean_logprobs_reference(model, ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`mean_logprobs` the straightforward way, logits for every position; the
    correctness and speed reference of ``make perf``. Same arguments and result."""
    positions = (attention.cumsum(1) - 1).clamp(min=0)  # [n, s]
    token_lp = gather_logprobs(model(input_ids=ids, attention_mask=attention, position_ids=positions).logits, ids)
    m = mask[:, 1:].to(token_lp.dtype)  # [n, s-1]
    return (token_lp * m).sum(1) / m.sum(1).clamp(min=1)


def make_loss_fn(cfg: Config, logprobs=mean_logprobs):
    """The trainer-backend loss: one forward per sequence group that an active term needs
    (``logprobs``: :func:`mean_logprobs`, or :func:`mean_logprobs_reference` for ``make perf``).

    Examples with beta_A = 0 (chosen == rejected under dynamic beta) skip the chosen and
    rejected forwards: their terms are constants there (0, or eps1 for ``after_beta``), so the
    loss and its gradient are exactly those of the full computation. The logged chosen and
    rejected rewards are means over the examples that were computed.
    """
    active = cfg.active_terms()
    calls = [0]  # micro-batches seen, for grad_norm_every

    def group_logprobs(model, batch, side, rows):
        ids, attention = batch[f"{side}_ids"][rows], batch[f"{side}_attention"][rows]
        width = int(attention.sum(1).max())  # drop columns that are padding in every kept row
        return logprobs(model, ids[:, -width:], attention[:, -width:], batch[f"{side}_mask"][rows, -width:])

    def loss_fn(model, batch):
        zeros = torch.zeros_like(batch["beta_A"])  # [b]
        lw, ll, lz = zeros, zeros, zeros
        metrics = {}
        answered = (batch["beta_A"] != 0).nonzero().squeeze(1)  # examples whose answer terms matter
        if "chosen" in active and len(answered):
            lw = zeros.index_put((answered,), group_logprobs(model, batch, "chosen", answered))  # [b]
            metrics["reward_chosen"] = lw[answered].mean().item()
        if "rejected" in active and len(answered):
            ll = zeros.index_put((answered,), group_logprobs(model, batch, "rejected", answered))  # [b]
            metrics["reward_rejected"] = -ll[answered].mean().item()  # the reference logs -ll
        if "knowledge" in active:
            every = torch.arange(batch["knowledge_ids"].shape[0], device=batch["knowledge_ids"].device)
            rows = group_logprobs(model, batch, "knowledge", every)  # [k]
            lz = zeros.index_add(0, batch["knowledge_owner"], rows)  # [b]: sum of each example's rows
            metrics["reward_knowledge"] = lz.mean().item()
        terms = rlag_terms(lz, lw, ll, batch["beta_D"], batch["beta_A"], cfg)  # term -> [b]
        logits = rlag_logits(terms, cfg)  # [b]
        loss = -F.logsigmoid(logits).mean()
        calls[0] += 1
        if cfg.grad_norm_every and (calls[0] - 1) % cfg.grad_norm_every == 0 and loss.requires_grad:
            metrics.update(term_grad_norms(model, terms, logits))
        return loss, metrics

    return loss_fn


# ----------------------------------------------------------------------------- sampling


def sample_pairs(scorer, records: list[QARecord], cfg: Config, progress=None) -> tuple[list[dict], dict]:
    """Sample chosen/rejected answers with the current weights (gold labels only for the
    ``chosen_is_gold`` ablation and for the logged counts).

    A record without knowledge snippets gets betas (0, 0): with nothing to augment the prompt,
    its loss is a constant.

    Returns:
        ``(pairs, counts)``: one dict per record (ids and indices of chosen/rejected, betas,
        the truncated knowledge, per-option token_mean scores) and the reference's counts
        ``chosen_correct``, ``rejected_correct``, ``chosen_failure`` (chosen wrong while
        rejected right) plus ``same``.
    """
    pairs = []
    counts = {"records": len(records), "chosen_correct": 0, "rejected_correct": 0, "chosen_failure": 0, "same": 0}
    # no snippets: the "augmented" prompt is the naive one
    knowledge = [scorer.knowledge(record) or None for record in records]
    # both prompts of every record in one call, so that the scorer batches them by length
    scores = scorer.score_many(list(records) * 2, knowledge + [None] * len(records),
                               progress=progress and (lambda k: progress(k / 2)))
    for record, context, augmented, naive in zip(records, knowledge, scores, scores[len(records):]):
        chosen = record.answer_index if cfg.chosen_is_gold else augmented.predict("token_mean")
        rejected = naive.predict("token_mean")
        same = chosen == rejected
        beta_D, beta_A = cfg.betas(same) if context else (0.0, 0.0)  # no knowledge: a constant loss
        counts["chosen_correct"] += chosen == record.answer_index
        counts["rejected_correct"] += rejected == record.answer_index
        counts["chosen_failure"] += chosen != record.answer_index and rejected == record.answer_index
        counts["same"] += same
        pairs.append({"id": record.id, "chosen_index": chosen, "rejected_index": rejected,
                      "gold_index": record.answer_index, "same": same, "beta_D": beta_D, "beta_A": beta_A,
                      "chosen": record.options[chosen], "rejected": record.options[rejected],
                      "augmented_scores": [round(v, 5) for v in augmented.scores("token_mean")],
                      "naive_scores": [round(v, 5) for v in naive.scores("token_mean")],
                      "knowledge": list(context or ())})
    return pairs, counts


def split_chunks(records: list[QARecord], n: int, seed: int, shuffle: bool = True) -> list[list[QARecord]]:
    """Shuffle (seeded; kept in the given order when ``shuffle`` is off) and cut into ``n``
    contiguous chunks whose sizes differ by at most one (the reference's ceil-sized chunks can
    leave the last one empty)."""
    order = list(records)
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i * len(order) // n:(i + 1) * len(order) // n] for i in range(n)]


def trained_subset(pairs: list[dict], fraction: float, seed: int) -> list[dict]:
    """The seeded random ``int(fraction * n)`` pairs (at least one) that a chunk trains on (the
    authors train a random 80% of each chunk's pairs); all of them when ``fraction`` is 1.
    The draw is over the pairs' record ids in sorted order, so the same seed picks the same
    records in every pass over a chunk."""
    if fraction >= 1 or not pairs:
        return list(pairs)
    ids = sorted(p["id"] for p in pairs)
    keep = set(random.Random(seed).sample(ids, max(1, int(fraction * len(ids)))))
    return [p for p in pairs if p["id"] in keep]


# ----------------------------------------------------------------------------- training


def sample_chunk(ctx, scorer, chunk: list[QARecord], cfg: Config, label: str) -> tuple[list[dict], dict]:
    """:func:`sample_pairs` over ``chunk``, spread over the processes of a multi-process launch:
    each rank samples its :func:`~kembed.distributed.shard` (every rank all of it when the
    weights are sharded, whose forward passes must run in step), and every rank gets all the
    pairs in chunk order and the counts summed over the ranks, as one process would."""
    from kembed import distributed

    split_work = distributed.splits_work(ctx.model)
    mine = distributed.shard(chunk) if split_work else chunk
    with ctx.task(label, len(mine)) as advance:
        pairs, counts = sample_pairs(scorer, mine, cfg, progress=advance)
    if split_work:
        pairs = distributed.gather(pairs, len(chunk))
        counts = {k: sum(c[k] for c in distributed.per_rank(counts)) for k in counts}
    return pairs, counts


def train(ctx) -> None:
    """Run the RLAG iterations (N chunks x T passes), resuming after the last completed one.

    Per iteration it writes ``pairs/iter-XXX.jsonl``, logs the sampling counts, the three
    reward terms and the loss to ``metrics.jsonl``, saves the model, and measures dev accuracy
    when the recipe asks for it. Under several processes the ranks share the sampling
    (:func:`sample_chunk`), train on the same pairs, and the main process writes.
    """
    from kembed import distributed
    from kembed.runs import write_jsonl
    from kembed.scoring import OptionScorer
    cfg: Config = ctx.method_config
    if len(ctx.records) < cfg.chunks:
        raise ConfigError(f"rlag.chunks = {cfg.chunks} is more than the {len(ctx.records)} training records")
    chunks = split_chunks(ctx.records, cfg.chunks, ctx.config.seed, shuffle=cfg.chunk_order == "shuffled")
    total = cfg.chunks * cfg.passes
    collate = make_collate(ctx.tokenizer.pad_token_id)
    loss_fn = make_loss_fn(cfg)
    scorer = OptionScorer(ctx.model, ctx.tokenizer, ctx.placement, ctx.config.prompts)
    by_id = {r.id: r for r in ctx.records}
    for it in range(ctx.run.state.get("iterations_done", 0), total):
        chunk = chunks[it % cfg.chunks]
        name = f"iteration {it + 1}/{total}"
        pairs, counts = sample_chunk(ctx, scorer, chunk, cfg, f"{name}: sampling")
        trained = trained_subset(pairs, cfg.chunk_fraction,
                                 ctx.config.seed + (it % cfg.chunks if cfg.fixed_subset else it))
        trained_ids = {p["id"] for p in trained}
        if distributed.is_main():
            write_jsonl(ctx.run.path / "pairs" / f"iter-{it + 1:03d}.jsonl",
                        [{**p, "trained": p["id"] in trained_ids} for p in pairs])
        ctx.run.log("sampling", iteration=it + 1, trained=len(trained), **counts)
        ctx.console.print(f"[bold]{name}[/] sampled {len(pairs)} pairs: chosen correct {counts['chosen_correct']}, "
                          f"rejected correct {counts['rejected_correct']}, chosen wrong while rejected right "
                          f"{counts['chosen_failure']}, same answer {counts['same']}; training on {len(trained)}")
        save_examples(ctx, name, [pair_text(by_id[p["id"]], p, ctx.config.prompts) for p in trained])
        examples = [build_example(ctx.tokenizer, by_id[p["id"]], p, ctx.config.prompts, cfg) for p in trained]
        ctx.fit(examples, collate, loss_fn, epochs=cfg.epochs, seed=ctx.config.seed + it, label=name)
        ctx.finish_iteration(it + 1)
