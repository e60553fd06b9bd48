"""RAFT: retrieval-augmented fine-tuning (Zhang et al. 2024, arXiv 2403.10131), as
methods.md describes it.

For each training question: its oracle document(s) D* (the question's knowledge snippets that
best support the gold answer) and k distractor documents (retrieved hard negatives from the
domain index, or drawn at random). A fraction P of the examples gets D* + distractors, the
rest distractors only; the document order is shuffled. The target is a chain-of-thought answer
that quotes the supporting text between ``##begin_quote##`` and ``##end_quote##`` and ends
with ``<ANSWER>: <gold answer>``; it is built extractively (gold answer + the best-supporting
sentences of D*) or written by a teacher model. Every document is cut at a sentence boundary to
``max_doc_tokens`` tokens before it goes into the prompt, and the target is built from the cut
D* (a teacher sees the same cut D*), so every extractive quote of an example whose prompt
holds D* is text of that prompt. The user prompt is ``kembed.prompts.documents_prompt`` (the
layout SimRAG and chat-format scoring share) plus RAFT's instruction line. Training is plain SFT
on the target.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field, model_validator

from kembed.config import Strict
from kembed.methods.common import chat_answer_ids, fit_lm, save_examples
from kembed.prompts import ANSWER_MARK as ANSWER, QUOTE_BEGIN as BEGIN, QUOTE_END as END, cut_tokens, raft_prompt
from kembed.records import QARecord

NAME = "raft"
DESCRIPTION = "RAFT: oracle + distractor documents in the prompt, quoting chain-of-thought targets"
_WORD = re.compile(r"[a-z0-9]+")
_STOP = set("a an the of in on at to for and or is are was were be by with as from that this which what who "
            "whom when where why how did does do it its his her their they he she following".split())


class TeacherConfig(Strict):
    """The teacher model that writes targets: a local model argument (``model``) or an
    OpenAI-compatible endpoint (``url`` + ``model``; key from the ``api_key_env`` variable)."""

    model: str
    url: str | None = None
    api_key_env: str | None = None
    max_new_tokens: int = Field(256, ge=1)


class Config(Strict):
    """The ``raft:`` recipe section.

    Attributes:
        k: distractor documents per example (paper: 4; reference code default 3).
        p: P, the fraction of examples whose context holds the oracle document (paper: 0.8;
            the reference CLI default 1.0 silently disables the mixture).
        distractors: ``retrieved`` (hard negatives from the domain index) or ``random``.
        index: the domain index kind for retrieved distractors.
        oracle_docs: how many of the question's snippets form D* (the best-supporting ones;
            ``null``: all of them).
        quote_sentences: sentences the extractive target quotes.
        max_doc_tokens: each document in the prompt keeps its leading whole sentences that fit
            in this many tokens (see ``cut_sentences``; 0: no cut).
        target: ``extractive`` or ``teacher``.
        teacher: the teacher model, for ``target: teacher``.
        epochs: passes over the examples.
    """

    k: int = Field(4, ge=0)  # 0: the oracle alone (or no document)
    p: float = Field(0.8, ge=0, le=1)
    distractors: Literal["retrieved", "random"] = "retrieved"
    index: Literal["bm25", "dense", "hybrid"] = "bm25"
    oracle_docs: int | None = Field(1, ge=1)
    quote_sentences: int = Field(2, ge=1)
    max_doc_tokens: int = Field(96, ge=0)
    target: Literal["extractive", "teacher"] = "extractive"
    teacher: TeacherConfig | None = None
    epochs: float = Field(2, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.target == "teacher" and self.teacher is None:
            raise ValueError("target: teacher needs a teacher: {model: ..., url: ...}")
        return self


def words(text: str) -> set[str]:
    """Lower-cased alphanumeric words minus a few stop words."""
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def sentences(text: str) -> list[str]:
    """Split on sentence-ending punctuation followed by white space."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def cut_sentences(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` cut at a sentence boundary to at most ``max_tokens`` tokens.

    Tokens are counted with ``tokenizer`` without special tokens. The result is the longest
    verbatim prefix of ``text`` that ends with a whole sentence (``sentences``) and fits the
    budget, so each kept sentence is a substring of it. ``text`` comes back unchanged when it
    fits or when ``max_tokens <= 0``; when even the first sentence is over the budget, that
    sentence is cut to its first ``max_tokens`` tokens (``cut_tokens``) rather than dropped.
    """
    def n_tokens(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    if max_tokens <= 0 or n_tokens(text) <= max_tokens:
        return text
    kept, end = "", 0
    for sentence in sentences(text):
        end = text.index(sentence, end) + len(sentence)
        if n_tokens(text[:end]) > max_tokens:
            break
        kept = text[:end]
    return kept or cut_tokens(tokenizer, text[:end], max_tokens)


def support(text: str, record: QARecord) -> float:
    """How well ``text`` supports the gold answer: answer words found count double,
    question words once (a plain overlap score; no model)."""
    w = words(text)
    return 2 * len(w & words(record.answer)) + len(w & words(record.question))


def oracle_documents(record: QARecord, n: int | None) -> list[str]:
    """D*: the record's knowledge snippets ranked by support for the gold answer (top ``n``)."""
    ranked = sorted(record.knowledge, key=lambda z: -support(z, record))
    return ranked if n is None else ranked[:n]


def extractive_target(record: QARecord, oracle: list[str], n_quotes: int) -> str:
    """A chain-of-thought target built without a model: the ``n_quotes`` sentences of D* that
    best support the gold answer, quoted in document order, then the answer."""
    candidates = [s for doc in oracle for s in sentences(doc)]
    best = sorted(range(len(candidates)), key=lambda i: -support(candidates[i], record))[:n_quotes]
    quotes = " ".join(f"{BEGIN}{candidates[i]}{END}" for i in sorted(best))
    reason = f"##Reason: The context says {quotes} " if quotes else "##Reason: "
    return f"{reason}So the answer is {record.answer}.\n{ANSWER} {record.answer}"


def teacher_prompt(record: QARecord, oracle: list[str]) -> str:
    """The request to a teacher model (question, context and the verified answer)."""
    context = "\n".join(oracle)
    return (f"Question: {record.question}\nContext:\n{context}\nVerified answer: {record.answer}\n\n"
            f"Explain step by step how the context supports the answer. Copy the supporting sentences "
            f"word for word between {BEGIN} and {END}. End with the line '{ANSWER} {record.answer}'.")


def user_prompt(record: QARecord, documents: list[str]) -> str:
    """The training prompt: :func:`kembed.prompts.raft_prompt` (the documents, the question and
    RAFT's instruction line), the same user turn ``raft``-format scoring uses."""
    return raft_prompt(record.question, documents)


def choose_distractors(record: QARecord, oracle: list[str], k: int, documents: list[str], rng: random.Random,
                       index=None) -> tuple[list[str], int]:
    """k distractors: the top retrieved documents for the question (``index`` given), else
    documents drawn at random from ``documents``; never an oracle document, one of the
    record's own snippets, or a document that contains the gold answer text as whole words (case-insensitive,
    whitespace-normalised): a distractor must not answer the question.

    Returns:
        ``(distractors, replaced)``: up to k documents, and how many candidates were passed
        over because they contain the gold answer.
    """
    taken = {d.strip() for d in oracle} | {z.strip() for z in record.knowledge}
    answer = " ".join(record.answer.split())
    has_answer = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)", re.IGNORECASE).search if answer else lambda _: None
    distractors, replaced, want = [], 0, k + len(taken) + 5
    while True:
        if index is not None:
            candidates = [text for _, _, text in index.search(record.question, min(want, len(documents)))]
        else:
            candidates = rng.sample(documents, min(len(documents), want))
        distractors, replaced = [], 0
        for text in candidates:
            if text.strip() in taken:
                continue
            if has_answer(" ".join(text.split())):
                replaced += 1
                continue
            distractors.append(text)
        if len(distractors) >= k or want >= len(documents):
            return distractors[:k], replaced
        want *= 2


def build_examples(records: list[QARecord], cfg: Config, documents: list[str], seed: int, index=None,
                   truncate=lambda d: d) -> list[dict]:
    """The RAFT mixture: exactly round(P * n) examples (a seeded choice) get the oracle
    documents (none for a record without knowledge snippets); every example gets k
    distractors; document order is shuffled. Every document is passed through ``truncate``
    (``train`` gives ``cut_sentences`` at ``max_doc_tokens``) and the target quotes the cut
    oracle documents, the text the prompt shows.

    Returns:
        Dicts with id, has_oracle, documents (as in the prompt, in prompt order), oracle (the
        cut oracle documents the target is built from, also for examples without them in the
        prompt), target (extractive; the teacher replaces it later when configured) and builder.
    """
    rng = random.Random(seed)
    with_oracle = set(rng.sample(range(len(records)), round(cfg.p * len(records))))
    examples = []
    for i, record in enumerate(records):
        full = oracle_documents(record, cfg.oracle_docs)
        distractors, replaced = choose_distractors(record, full, cfg.k, documents, rng, index)
        oracle = [truncate(d) for d in full]
        has_oracle = i in with_oracle and bool(oracle)
        docs = (oracle if has_oracle else []) + [truncate(d) for d in distractors]
        rng.shuffle(docs)
        examples.append({"id": record.id, "has_oracle": has_oracle, "documents": docs, "oracle": oracle,
                         "target": extractive_target(record, oracle, cfg.quote_sentences), "builder": "extractive",
                         "answer_distractors_replaced": replaced})
    return examples


def apply_teacher(examples: list[dict], records: list[QARecord], generator) -> None:
    """Replace each target with the teacher's (in place); a reply without the final answer
    line gets it appended. ``builder`` records the teacher's name."""
    replies = generator.generate([teacher_prompt(r, e["oracle"]) for e, r in zip(examples, records)])
    for example, record, reply in zip(examples, records, replies):
        if ANSWER not in reply:
            reply = f"{reply}\n{ANSWER} {record.answer}".strip()
        example["target"], example["builder"] = reply, f"teacher:{generator.name}"


def make_teacher(cfg: TeacherConfig, placement):
    """A generator for the configured teacher (see ``kembed.generation``)."""
    from kembed.generation import LocalGenerator, OpenAIGenerator

    if cfg.url:
        return OpenAIGenerator(cfg.url, cfg.model, api_key_env=cfg.api_key_env, max_new_tokens=cfg.max_new_tokens)
    from kembed.models import load_model, load_tokenizer

    return LocalGenerator(load_model(cfg.model, placement), load_tokenizer(cfg.model), placement,
                          max_new_tokens=cfg.max_new_tokens, name=cfg.model)


def train(ctx) -> None:
    """Build the RAFT examples (saved as ``raft_examples.jsonl``), then SFT on them."""
    if ctx.run.state.get("iterations_done", 0) >= 1:
        return
    from kembed.runs import write_jsonl

    cfg: Config = ctx.method_config
    documents = ctx.knowledge_documents()
    index = ctx.knowledge_index(cfg.index) if cfg.distractors == "retrieved" else None

    examples = build_examples(ctx.records, cfg, documents, ctx.config.seed, index,
                              lambda doc: cut_sentences(ctx.tokenizer, doc, cfg.max_doc_tokens))
    if cfg.target == "teacher":
        apply_teacher(examples, ctx.records, make_teacher(cfg.teacher, ctx.placement))
    write_jsonl(ctx.run.path / "raft_examples.jsonl", examples)
    n_oracle = sum(e["has_oracle"] for e in examples)
    replaced = sum(e["answer_distractors_replaced"] for e in examples)
    ctx.run.log("raft_examples", examples=len(examples), with_oracle=n_oracle, k=cfg.k, p=cfg.p,
                answer_distractors_replaced=replaced,
                distractors=cfg.distractors, builders=sorted({e["builder"] for e in examples}))
    ctx.console.print(f"RAFT: {len(examples)} examples, {n_oracle} with the oracle document, k = {cfg.k} "
                      f"{cfg.distractors} distractors ({replaced} candidates that contain the gold answer passed over)")
    rows = [{"prompt": user_prompt(record, example["documents"]), "completion": example["target"]}
            for record, example in zip(ctx.records, examples)]
    save_examples(ctx, "raft", rows)
    tokenized = []
    for row in rows:
        ids, mask = chat_answer_ids(ctx.tokenizer, row["prompt"], row["completion"])
        tokenized.append({"input_ids": ids, "loss_mask": mask})
    fit_lm(ctx, tokenized, cfg.epochs, "raft")
    ctx.finish_iteration(1)
