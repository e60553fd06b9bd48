"""SimRAG (Xu et al., NAACL 2025, arXiv 2410.17952), as methods.md describes it.

Stage I: fine-tune the model on the retrieval-oriented skills Stage II uses, answer-only loss.
The paper's general instruction / QA data is not available offline, so kembed builds Stage I
from the run's own training records (``stage1_records``; each snippet cut to ``max_doc_tokens``):

- context-grounded QA: ``documents_prompt(question, snippets)`` -> the gold answer text
  (records with snippets only);
- answer extraction: ``extraction_prompt(snippet, answers_per_document)`` -> the gold answer as
  it occurs in the snippet (case-insensitive whole-word match, the snippet's casing), for every
  snippet that contains it;
- question generation: ``question_prompt(snippet, answer, "short_answer")`` -> the record's
  question, for the same snippets.

The prompts are the very ones Stage II generates and trains with. Rows of user JSONL files
(``stage1_files``: ``prompt``/``instruction`` [+ ``input``] -> ``response``/``output``) are
added. With neither, Stage I is skipped with a notice.

Stage II (self-training, one round), with the Stage-I model:

1. answer extraction: for each unlabeled domain document, the model lists candidate answers;
   candidates that do not occur in the document are discarded;
2. question generation: for each (document, answer) the model writes a question of each type:
   short answer, multiple choice (the answer plus candidates of other documents as options),
   claim verification (a true claim, and a false one made by swapping in another candidate);
3. round-trip filter: retrieve the top-k documents for the generated question from the domain
   index and keep the pair only if the answer appears in one of them;
4. fine-tune on (generated question, retrieved documents, answer): the user turn is
   ``documents_prompt(question, the top-k retrieved documents, each cut to max_doc_tokens, in
   retrieval order)``, mixed with the Stage-I data, answer-only loss. A run that keeps fewer
   than ``min_kept_pairs`` pairs says so on the console and in metrics.jsonl.

``iterations_done`` is 1 after Stage I and 2 after Stage II.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from kembed.config import Strict
from kembed.errors import DataError
from kembed.methods.common import chat_answer_ids, fit_lm, save_examples
from kembed.prompts import cut_tokens, documents_prompt
from kembed.records import QARecord

NAME = "simrag"
DESCRIPTION = "SimRAG: self-generated QA pairs from domain documents, round-trip retrieval filter, then SFT"
QUESTION_TYPES = ("short_answer", "multiple_choice", "claim_verification")
STAGE1_TASKS = ("context_qa", "answer_extraction", "question_generation")


class Config(Strict):
    """The ``simrag:`` recipe section.

    Attributes:
        stage1_records: build Stage I from the run's training records (context QA, answer
            extraction, question generation).
        stage1_max_examples: a seeded sample of at most this many record-built Stage-I
            examples (null: all).
        stage1_files: JSONL files of general instruction / context-QA data, added to Stage I.
        documents: unlabeled domain documents used in Stage II (a seeded sample; null: all).
        answers_per_document: candidate answers kept per document.
        question_types: which of short_answer, multiple_choice, claim_verification to write.
        filter_top_k: k of the round-trip filter, and the documents in a Stage-II training
            prompt (not public in the paper; recorded).
        index: the domain index kind the filter retrieves with.
        max_doc_tokens: each document or snippet is cut to this many tokens in every prompt.
        min_kept_pairs: fewer kept Stage-II pairs than this is reported as a warning.
        max_new_tokens, generation_batch_size: generation settings.
        epochs: passes over the fine-tuning data per stage (paper: 1).
        stage2_learning_rate: Stage II's learning rate (null: ``train.learning_rate``, as
            Stage I); the paper trains Stage I at 5e-7 and Stage II at 2e-7 (8B models).
    """

    stage1_records: bool = True
    stage1_max_examples: int | None = Field(None, ge=1)
    stage1_files: list[str] = []
    documents: int | None = Field(60, ge=1)
    answers_per_document: int = Field(2, ge=1)
    question_types: list[Literal["short_answer", "multiple_choice", "claim_verification"]] = list(QUESTION_TYPES)
    filter_top_k: int = Field(3, ge=1)
    index: Literal["bm25", "dense", "hybrid"] = "bm25"
    max_doc_tokens: int = Field(160, ge=0)  # 0: no cut
    min_kept_pairs: int = Field(50, ge=0)
    max_new_tokens: int = Field(40, ge=1)
    generation_batch_size: int = Field(8, ge=1)
    epochs: float = Field(1, gt=0)
    stage2_learning_rate: float | None = Field(None, gt=0)


def extraction_prompt(document: str, n: int) -> str:
    """The answer-extraction request (Stage II step 1, and its Stage-I training prompt)."""
    return (f"Document: {document}\n\nList {n} short answers (names, dates, numbers or terms) found in the "
            f"document, one per line.")


def question_prompt(document: str, answer: str, qtype: str) -> str:
    """The question-generation request of type ``qtype`` (Stage II step 2; Stage I trains the
    ``short_answer`` one)."""
    if qtype == "claim_verification":
        return f"Document: {document}\n\nWrite one true sentence about \"{answer}\" stated in the document."
    kind = "multiple-choice question" if qtype == "multiple_choice" else "question"
    return f"Document: {document}\n\nWrite one {kind} whose answer is \"{answer}\". Reply with the question only."


def find_span(text: str, phrase: str) -> str | None:
    """``phrase`` as it occurs in ``text`` (case-insensitive, whole words), in ``text``'s
    casing; None when it does not occur."""
    match = re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE) if phrase else None
    return match.group(0) if match else None


def parse_candidates(reply: str, document: str, n: int) -> list[str]:
    """Candidate answers from the model's reply: one per line (bullets and numbering removed),
    1-60 characters, occurring in the document as whole words (case-insensitive), first ``n``
    distinct."""
    found, seen = [], set()
    for line in re.split(r"[\n;]", reply):
        cand = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().strip(".,:\"'")
        key = cand.lower()
        if 0 < len(cand) <= 60 and key not in seen and find_span(document, cand):
            found.append(cand)
            seen.add(key)
        if len(found) == n:
            break
    return found


def stage1_examples(records: list[QARecord], cfg: Config, truncate=lambda d: d) -> list[dict]:
    """Stage-I examples built from training records (see the module docstring).

    Args:
        truncate: cuts a snippet (``cut_tokens`` to ``max_doc_tokens`` in a run); the answer
            is looked for in the cut snippet.

    Returns:
        Dicts ``{"task", "id", "prompt", "target"}``, record by record: one ``context_qa``
        per record with snippets, then ``answer_extraction`` and ``question_generation`` per
        snippet that contains the gold answer.
    """
    examples = []
    for record in records:
        snippets = [truncate(s) for s in record.knowledge]
        if snippets:
            examples.append({"task": "context_qa", "id": record.id,
                             "prompt": documents_prompt(record.question, snippets), "target": record.answer})
        for snippet in snippets:
            span = find_span(snippet, record.answer)
            if span is None:
                continue
            examples.append({"task": "answer_extraction", "id": record.id,
                             "prompt": extraction_prompt(snippet, cfg.answers_per_document), "target": span})
            examples.append({"task": "question_generation", "id": record.id,
                             "prompt": question_prompt(snippet, span, "short_answer"), "target": record.question})
    return examples


def training_pair(qtype: str, generated: str, answer: str, other: list[str], rng: random.Random) -> list[dict]:
    """The (question prompt, target) pairs a generated question gives: one for short answer and
    multiple choice, a true and (when the answer can be swapped out) a false one for claims."""
    if qtype == "short_answer":
        return [{"prompt": generated, "target": answer}]
    if qtype == "multiple_choice":
        options = [answer] + rng.sample(other, min(3, len(other)))
        rng.shuffle(options)
        listing = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
        return [{"prompt": f"{generated}\n{listing}", "target": answer}]
    pairs = [{"prompt": f"True or false? {generated}", "target": "True"}]
    if other and answer.lower() in generated.lower():
        swapped = re.sub(re.escape(answer), rng.choice(other), generated, count=1, flags=re.IGNORECASE)
        pairs.append({"prompt": f"True or false? {swapped}", "target": "False"})
    return pairs


def round_trip(index, question: str, answer: str, k: int) -> tuple[bool, list[int]]:
    """Keep a pair iff ``answer`` occurs (case-insensitive) in one of the top-``k`` documents
    retrieved for ``question``. Returns (kept, retrieved document indices, best first)."""
    hits = index.search(question, k) if question.strip() else []
    return any(answer.lower() in text.lower() for _, _, text in hits), [i for i, _, _ in hits]


def load_stage1(files: list[str]) -> list[dict]:
    """Stage-I records ``{"prompt", "target"}`` from JSONL files.

    Raises:
        DataError: unreadable JSON or a record without prompt/instruction and response/output.
    """
    rows = []
    for name in files:
        path = Path(name)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(path, f"cannot read: {e}") from None
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON: {e.msg}", record=i) from None
            prompt = rec.get("prompt") or rec.get("instruction") if isinstance(rec, dict) else None
            target = rec.get("response") or rec.get("output") if isinstance(rec, dict) else None
            if not isinstance(prompt, str) or not isinstance(target, str) or not prompt or not target:
                raise DataError(path, "needs a non-empty prompt/instruction and response/output", record=i)
            if isinstance(rec.get("input"), str) and rec["input"]:
                prompt = f"{prompt}\n\n{rec['input']}"
            rows.append({"prompt": prompt, "target": target})
    return rows


def generate_pairs(generator, index, documents: list[str], cfg: Config, rng: random.Random, progress=None,
                   truncate=lambda d: d) -> list[dict]:
    """Stage II steps 1-3: extract answers, write questions, apply the round-trip filter.

    Args:
        truncate: cuts a retrieved document for the training prompt (``max_doc_tokens``).

    Returns:
        One dict per generated pair: type, document (index into ``documents``), answer,
        question (as generated), prompt (the question text: options or "True or false?"
        included) and target, kept (the filter's verdict), retrieved (indices into
        ``index.documents``, best first) and training_prompt: ``documents_prompt(prompt, the
        retrieved documents, cut)``, the user turn Stage II trains on.
    """
    replies = generator.generate([extraction_prompt(d, cfg.answers_per_document) for d in documents], progress)
    answers = [(i, a) for i, (d, r) in enumerate(zip(documents, replies))
               for a in parse_candidates(r, d, cfg.answers_per_document)]
    jobs = [(i, a, t) for i, a in answers for t in cfg.question_types]
    questions = generator.generate([question_prompt(documents[i], a, t) for i, a, t in jobs], progress)
    pairs = []
    for (i, answer, qtype), question in zip(jobs, questions):
        question = question.strip().splitlines()[0].strip() if question.strip() else ""
        other = [a for j, a in answers if j != i and a.lower() != answer.lower()]
        kept, retrieved = round_trip(index, question, answer, cfg.filter_top_k)
        context = [truncate(index.documents[j]) for j in retrieved]
        for pair in training_pair(qtype, question, answer, other, rng) if question else []:
            pairs.append({"type": qtype, "document": i, "answer": answer, "question": question, **pair,
                          "kept": kept, "retrieved": retrieved,
                          "training_prompt": documents_prompt(pair["prompt"], context)})
    return pairs


def stage1_data(records: list[QARecord], cfg: Config, seed: int, truncate=lambda d: d) -> list[dict]:
    """The Stage-I training data: the record-built examples (:func:`stage1_examples`, when
    ``stage1_records``; a seeded sample of ``stage1_max_examples`` in their order when there are
    more), then the rows of ``stage1_files`` (task ``file``)."""
    built = stage1_examples(records, cfg, truncate) if cfg.stage1_records else []
    if cfg.stage1_max_examples is not None and len(built) > cfg.stage1_max_examples:
        built = [built[i] for i in sorted(random.Random(seed).sample(range(len(built)), cfg.stage1_max_examples))]
    return built + [{"task": "file", **row} for row in load_stage1(cfg.stage1_files)]


def _finetune(ctx, rows: list[dict], label: str) -> None:
    save_examples(ctx, label, [{"prompt": row["prompt"], "completion": row["target"]} for row in rows])
    examples = []
    for row in rows:
        ids, mask = chat_answer_ids(ctx.tokenizer, row["prompt"], row["target"])
        examples.append({"input_ids": ids, "loss_mask": mask})
    fit_lm(ctx, examples, ctx.method_config.epochs, label)


def train(ctx) -> None:
    """Stage I (when it has data), then Stage II on the Stage-I model. Saved in the run:
    ``simrag_stage1.jsonl``, ``simrag_generated.jsonl`` and ``simrag_kept.jsonl``; counts,
    keep rates and a low-yield warning go to metrics.jsonl."""
    from kembed.generation import LocalGenerator
    from kembed.runs import write_jsonl

    cfg: Config = ctx.method_config
    cut = functools.lru_cache(maxsize=None)(lambda text: cut_tokens(ctx.tokenizer, text, cfg.max_doc_tokens))
    done = ctx.run.state.get("iterations_done", 0)
    stage1 = stage1_data(ctx.records, cfg, ctx.config.seed, cut)
    if done < 1:
        if stage1:
            found = Counter(e["task"] for e in stage1)
            counts = {t: found[t] for t in (*STAGE1_TASKS, "file")}
            write_jsonl(ctx.run.path / "simrag_stage1.jsonl", stage1)
            ctx.run.log("simrag_stage1", examples=len(stage1), per_task=counts, records=len(ctx.records))
            ctx.console.print(f"SimRAG Stage I: {len(stage1)} examples from {len(ctx.records)} training records and "
                              f"{len(cfg.stage1_files)} files: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
            _finetune(ctx, stage1, "stage I")
            ctx.finish_iteration(1)
        else:
            ctx.run.log("notice", message="SimRAG Stage I skipped: no Stage-I data")
            ctx.console.print("[yellow]SimRAG Stage I skipped[/]: no Stage-I data (simrag.stage1_records is off "
                              "or the records have no snippets, and no simrag.stage1_files)")
    if done >= 2:
        return
    rng = random.Random(ctx.config.seed)
    documents = ctx.knowledge_documents()
    index = ctx.knowledge_index(cfg.index)
    chosen = list(range(len(documents)))
    if cfg.documents is not None and cfg.documents < len(documents):
        chosen = sorted(rng.sample(chosen, cfg.documents))

    generator = LocalGenerator(ctx.model, ctx.tokenizer, ctx.placement, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.generation_batch_size, name="policy")
    with ctx.task("SimRAG: generating", len(chosen) * (1 + cfg.answers_per_document * len(cfg.question_types))) as adv:
        pairs = generate_pairs(generator, index, [cut(documents[i]) for i in chosen], cfg, rng, adv, cut)
    for pair in pairs:  # an index into the domain documents, like "retrieved"
        pair["document"] = chosen[pair["document"]]
    kept = [p for p in pairs if p["kept"]]
    write_jsonl(ctx.run.path / "simrag_generated.jsonl", pairs)
    write_jsonl(ctx.run.path / "simrag_kept.jsonl", kept)
    total, good = Counter(p["type"] for p in pairs), Counter(p["type"] for p in kept)
    rates = {t: {"generated": total[t], "kept": good[t], "keep_rate": good[t] / total[t] if total[t] else None}
             for t in cfg.question_types}
    low = len(kept) < cfg.min_kept_pairs
    ctx.run.log("simrag_filter", documents=len(chosen), filter_top_k=cfg.filter_top_k, index=cfg.index,
                generated=len(pairs), kept=len(kept), per_type=rates, min_kept_pairs=cfg.min_kept_pairs,
                below_min_kept=low)
    ctx.console.print(f"SimRAG: {len(pairs)} pairs generated from {len(chosen)} documents, {len(kept)} kept by "
                      f"the round-trip filter (top-{cfg.filter_top_k}): "
                      + ", ".join(f"{t} {v['kept']}/{v['generated']}" for t, v in rates.items()))
    if low:
        message = (f"SimRAG kept only {len(kept)} of {len(pairs)} generated pairs, fewer than min_kept_pairs = "
                   f"{cfg.min_kept_pairs}: Stage II learns little from them. Raise simrag.documents (now "
                   f"{len(chosen)}) or simrag.answers_per_document (now {cfg.answers_per_document}), raise "
                   f"simrag.filter_top_k (now {cfg.filter_top_k}), use a stronger model, or lower "
                   f"simrag.min_kept_pairs to accept this yield.")
        ctx.run.log("warning", message=message, kept=len(kept), min_kept_pairs=cfg.min_kept_pairs)
        ctx.console.print(f"[bold red]WARNING: {message}[/]")
    rows = [{"prompt": p["training_prompt"], "target": p["target"]} for p in kept] + stage1
    if cfg.stage2_learning_rate is not None:
        ctx.config.train.learning_rate = cfg.stage2_learning_rate
    if rows:
        _finetune(ctx, rows, "stage II")
    else:
        ctx.console.print("[yellow]SimRAG: no pair survived the filter and there is no Stage-I data; the model "
                          "is left as it was[/]")
    ctx.finish_iteration(2)
