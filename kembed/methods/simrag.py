"""SimRAG (Xu et al., NAACL 2025, arXiv 2410.17952), as methods.md describes it.

Stage I (optional): fine-tune on general instruction / context-QA data given as JSONL files
(``prompt``/``instruction`` [+ ``input``] -> ``response``/``output``), answer-only loss. No such
data is available offline, so without ``stage1_files`` the stage is skipped with a notice.

Stage II (self-training, one round), with the current model:

1. answer extraction: for each unlabeled domain document, the model lists candidate answers;
   candidates that do not occur in the document are discarded;
2. question generation: for each (document, answer) the model writes a question of each type:
   short answer, multiple choice (the answer plus candidates of other documents as options),
   claim verification (a true claim, and a false one made by swapping in another candidate);
3. round-trip filter: retrieve the top-k documents for the generated question from the domain
   index and keep the pair only if the answer appears in one of them;
4. fine-tune on the kept pairs (mixed with the Stage-I data), answer-only loss.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from kembed.config import Strict
from kembed.errors import DataError
from kembed.methods.common import chat_answer_ids, fit_lm
from kembed.prompts import cut_tokens

NAME = "simrag"
DESCRIPTION = "SimRAG: self-generated QA pairs from domain documents, round-trip retrieval filter, then SFT"
QUESTION_TYPES = ("short_answer", "multiple_choice", "claim_verification")


class Config(Strict):
    """The ``simrag:`` recipe section.

    Attributes:
        stage1_files: JSONL files of general instruction / context-QA data for Stage I.
        documents: unlabeled domain documents used in Stage II (a seeded sample; null: all).
        answers_per_document: candidate answers kept per document.
        question_types: which of short_answer, multiple_choice, claim_verification to write.
        filter_top_k: k of the round-trip filter (not public in the paper; recorded).
        index: the domain index kind the filter retrieves with.
        max_doc_tokens: each document is cut to this many tokens in the generation prompts.
        max_new_tokens, generation_batch_size: generation settings.
        epochs: passes over the fine-tuning data per stage (paper: 1).
    """

    stage1_files: list[str] = []
    documents: int | None = 60
    answers_per_document: int = 2
    question_types: list[Literal["short_answer", "multiple_choice", "claim_verification"]] = list(QUESTION_TYPES)
    filter_top_k: int = 3
    index: Literal["bm25", "dense", "hybrid"] = "bm25"
    max_doc_tokens: int = 160  # 0: no cut
    max_new_tokens: int = 40
    generation_batch_size: int = 8
    epochs: float = 1


def extraction_prompt(document: str, n: int) -> str:
    return (f"Document: {document}\n\nList {n} short answers (names, dates, numbers or terms) found in the "
            f"document, one per line.")


def question_prompt(document: str, answer: str, qtype: str) -> str:
    if qtype == "claim_verification":
        return f"Document: {document}\n\nWrite one true sentence about \"{answer}\" stated in the document."
    kind = "multiple-choice question" if qtype == "multiple_choice" else "question"
    return f"Document: {document}\n\nWrite one {kind} whose answer is \"{answer}\". Reply with the question only."


def parse_candidates(reply: str, document: str, n: int) -> list[str]:
    """Candidate answers from the model's reply: one per line (bullets and numbering removed),
    1-60 characters, occurring in the document as whole words (case-insensitive), first ``n``
    distinct."""
    found, seen = [], set()
    for line in re.split(r"[\n;]", reply):
        cand = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().strip(".,:\"'")
        key = cand.lower()
        occurs = re.search(rf"(?<!\w){re.escape(cand)}(?!\w)", document, flags=re.IGNORECASE)
        if 0 < len(cand) <= 60 and key not in seen and occurs:
            found.append(cand)
            seen.add(key)
        if len(found) == n:
            break
    return found


def training_pair(qtype: str, generated: str, answer: str, other: list[str], rng: random.Random) -> list[dict]:
    """The (user prompt, target) pairs a generated question gives: one for short answer and
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
    retrieved for ``question``. Returns (kept, retrieved document indices)."""
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


def generate_pairs(generator, index, documents: list[str], cfg: Config, rng: random.Random, progress=None) -> list[dict]:
    """Stage II steps 1-3: extract answers, write questions, apply the round-trip filter.

    Returns:
        One dict per generated pair: type, document index, answer, question (as generated),
        prompt/target for training, kept (the filter's verdict) and the retrieved indices.
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
        for pair in training_pair(qtype, question, answer, other, rng) if question else []:
            pairs.append({"type": qtype, "document": i, "answer": answer, "question": question, **pair,
                          "kept": kept, "retrieved": retrieved})
    return pairs


def _finetune(ctx, pairs: list[dict], label: str) -> None:
    examples = []
    for pair in pairs:
        ids, mask = chat_answer_ids(ctx.tokenizer, pair["prompt"], pair["target"])
        examples.append({"input_ids": ids, "loss_mask": mask})
    fit_lm(ctx, examples, ctx.method_config.epochs, label)


def train(ctx) -> None:
    """Stage I (when configured), then Stage II; generated and kept pairs are saved as
    ``simrag_generated.jsonl`` and ``simrag_kept.jsonl``; keep rates go to metrics.jsonl."""
    from kembed.generation import LocalGenerator
    from kembed.retrieval import build_index, domain_documents
    from kembed.runs import write_jsonl

    cfg: Config = ctx.method_config
    done = ctx.run.state.get("iterations_done", 0)
    stage1 = load_stage1(cfg.stage1_files)
    if done < 1:
        if stage1:
            _finetune(ctx, stage1, "stage I")
            ctx.finish_iteration(1)
        else:
            ctx.run.log("notice", message="SimRAG Stage I skipped: no stage1_files in the recipe")
            ctx.console.print("[yellow]SimRAG Stage I skipped[/]: the recipe names no general instruction / "
                              "context-QA files (simrag.stage1_files)")
    if done >= 2:
        return
    rng = random.Random(ctx.config.seed)
    documents = domain_documents(ctx.config.domain, ctx.config.data_dir)
    index = build_index(ctx.config.domain, cfg.index, ctx.config.data_dir)
    if cfg.documents is not None and cfg.documents < len(documents):
        documents = [documents[i] for i in sorted(rng.sample(range(len(documents)), cfg.documents))]

    generator = LocalGenerator(ctx.model, ctx.tokenizer, ctx.placement, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.generation_batch_size, name="policy")
    with ctx.task("SimRAG: generating", len(documents) * (1 + cfg.answers_per_document * len(cfg.question_types))) as adv:
        cut = [cut_tokens(ctx.tokenizer, d, cfg.max_doc_tokens) for d in documents]
        pairs = generate_pairs(generator, index, cut, cfg, rng, progress=adv)
    kept = [p for p in pairs if p["kept"]]
    write_jsonl(ctx.run.path / "simrag_generated.jsonl", pairs)
    write_jsonl(ctx.run.path / "simrag_kept.jsonl", kept)
    total, good = Counter(p["type"] for p in pairs), Counter(p["type"] for p in kept)
    rates = {t: {"generated": total[t], "kept": good[t], "keep_rate": good[t] / total[t] if total[t] else None}
             for t in cfg.question_types}
    ctx.run.log("simrag_filter", documents=len(documents), filter_top_k=cfg.filter_top_k, index=cfg.index,
                generated=len(pairs), kept=len(kept), per_type=rates)
    ctx.console.print(f"SimRAG: {len(pairs)} pairs generated from {len(documents)} documents, {len(kept)} kept by "
                      f"the round-trip filter (top-{cfg.filter_top_k}): "
                      + ", ".join(f"{t} {v['kept']}/{v['generated']}" for t, v in rates.items()))
    if kept or stage1:
        _finetune(ctx, kept + stage1, "stage II")
    else:
        ctx.console.print("[yellow]SimRAG: no pair survived the filter; the model is left as it was[/]")
    ctx.finish_iteration(2)
