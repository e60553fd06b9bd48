"""Explanation generation: for each question a model answered correctly, the model explains
its chosen answer (the mission's second axis, "explanation rationality"; RLAG paper Sec. 4,
where only correctly answered questions are explained and judged).

``kembed eval --explain`` and ``kembed explain EVAL_DIR`` add to the evaluation's
``samples.jsonl`` an ``explanation`` ``{"prompt", "text"}`` on every sample whose ``token_mean``
prediction is correct, and to its ``results.json`` an ``explanations`` record (generator model,
decoding settings, prompt version, count, seconds). Generation is greedy, through the model's
chat template, sorted by prompt length; it is resumable (samples that already hold an
explanation are kept, and progress is saved every ``SAVE_EVERY x batch_size`` prompts). Judging is separate
(:mod:`kembed.judges`, ``kembed judge``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from kembed.errors import KembedError
from kembed.records import QARecord
from kembed.runs import read_jsonl

PROMPT_VERSION = "1"
SCORER = "token_mean"  # the headline scorer decides which answers count as correct
DEFAULT_MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class ExplanationItem:
    """One explanation to judge.

    Attributes:
        id: the question's record id.
        question: the question text.
        options: the answer options, in order.
        chosen: index of the option the model chose (and explained).
        gold: index of the correct option (equal to ``chosen`` for correctly answered questions).
        knowledge: the reference a judge checks claims against: the question's knowledge
            snippets, or, for a question without any, the documents retrieved for it
            (:func:`load_explanations` with ``retrieved_top_k``).
        explanation: the model's explanation text.
        evidence: where ``knowledge`` comes from: ``snippets`` or ``retrieved``.
    """

    id: str
    question: str
    options: tuple[str, ...]
    chosen: int
    gold: int
    knowledge: tuple[str, ...]
    explanation: str
    evidence: str = "snippets"


def explanation_prompt(record: QARecord, chosen: int) -> str:
    """The user turn that asks the model to explain option ``chosen`` of ``record``: the
    question, the lettered options, the chosen answer, and a request for a short explanation
    (prompt version :data:`PROMPT_VERSION`)."""
    options = "\n".join(f"{label}. {text}" for label, text in zip(record.labels, record.options))
    return (f"Question: {record.question}\nOptions:\n{options}\n"
            f"Answer: {record.labels[chosen]}. {record.options[chosen]}\n"
            "Explain in two or three sentences why this answer is correct, citing the facts it rests on.")


def read_evaluation(folder: Path) -> tuple[dict, list[dict]]:
    """``(results.json, samples.jsonl rows)`` of an evaluation directory.

    Raises:
        KembedError: the folder holds no kembed evaluation, or a file is not valid JSON.
    """
    folder = Path(folder)
    results, samples = folder / "results.json", folder / "samples.jsonl"
    if not results.is_file() or not samples.is_file():
        raise KembedError(f"{folder}: not a kembed evaluation (needs results.json and samples.jsonl)")
    try:
        summary = json.loads(results.read_text())
        rows = read_jsonl(samples)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KembedError(f"{folder}: unreadable results ({e})") from None
    return summary, rows


def evaluation_records(summary: dict, data_dir=None) -> dict[str, QARecord]:
    """The records an evaluation scored, by id (its domain and split, loaded again).

    Raises:
        KembedError, DataError: the domain's data cannot be loaded.
    """
    from kembed.data import load_records

    records = load_records(summary["domain"], summary["split"], data_dir)
    return {r.id: r for r in records}


#: Explanations are saved every ``SAVE_EVERY x batch_size`` prompts (one generator call each).
SAVE_EVERY = 8


def explain_evaluation(folder: Path, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8,
                       device: str = "auto", precision: str = "auto", data_dir=None, progress=None) -> dict:
    """Generate the missing explanations of an evaluation directory, in place.

    Args:
        folder: a ``kembed eval`` output directory.
        max_new_tokens: generation budget per explanation (tokens).
        batch_size: prompts generated at once (:class:`kembed.generation.LocalGenerator`).
        progress: optional callable ``(total, advance_by)``: called once with the number of
            explanations to write as ``progress(total, 0)``, then ``progress(None, n)`` as each
            ``SAVE_EVERY x batch_size`` are written and saved.

    Returns:
        The ``explanations`` record written into ``results.json``.

    Raises:
        KembedError: not an evaluation; a sample's record is missing from the data; the
            evaluation was explained before with other settings (different model, prompt
            version or ``max_new_tokens``).
    """
    from kembed.generation import LocalGenerator
    from kembed.models import choose_placement, load_model, load_tokenizer
    from kembed.runs import write_json, write_jsonl

    folder = Path(folder)
    summary, samples = read_evaluation(folder)
    settings = {"model": summary["model"], "scorer": SCORER, "prompt_version": PROMPT_VERSION,
                "decoding": "greedy", "max_new_tokens": max_new_tokens, "format": "chat"}
    previous = summary.get("explanations")
    if previous and {k: previous.get(k) for k in settings} != settings:
        raise KembedError(f"{folder} holds explanations made with other settings "
                          f"({ {k: previous.get(k) for k in settings} }); evaluate into a new --output to change them")
    records = evaluation_records(summary, data_dir)
    todo = [s for s in samples if s["correct"][SCORER] and "explanation" not in s]
    for s in todo:
        if s["id"] not in records:
            raise KembedError(f"{folder}/samples.jsonl: record '{s['id']}' is not in "
                              f"{summary['domain']}/{summary['split']}")
    prompts = {s["id"]: explanation_prompt(records[s["id"]], s["predicted"][SCORER]) for s in todo}
    todo.sort(key=lambda s: len(prompts[s["id"]]))
    if progress is not None:
        progress(len(todo), 0)
    seconds = float((previous or {}).get("seconds", 0.0))
    if todo:
        placement = choose_placement(device, precision)
        tokenizer = load_tokenizer(summary["model"])
        model = load_model(summary["model"], placement)
        generator = LocalGenerator(model, tokenizer, placement, max_new_tokens=max_new_tokens, batch_size=batch_size)
        chunk = SAVE_EVERY * batch_size  # prompts per call: rows that end early make room for the next ones
        for i in range(0, len(todo), chunk):
            batch = todo[i:i + chunk]
            start = time.perf_counter()
            texts = generator.generate([prompts[s["id"]] for s in batch])
            seconds += time.perf_counter() - start
            for s, text in zip(batch, texts):
                s["explanation"] = {"prompt": prompts[s["id"]], "text": text}
            write_jsonl(folder / "samples.jsonl", samples)  # progress survives an interruption
            if progress is not None:
                progress(None, len(batch))
    record = {**settings, "n": sum("explanation" in s for s in samples), "seconds": round(seconds, 1)}
    write_json(folder / "results.json", {**summary, "explanations": record})
    return record


def load_explanations(folder: Path, data_dir=None, retrieved_top_k: int = 0) -> list[ExplanationItem]:
    """The explanations saved in an evaluation directory, as judge inputs.

    Args:
        retrieved_top_k: when > 0, a question without knowledge snippets (medical's and
            astronomy's test splits have none) gets as its ``knowledge`` the ``retrieved_top_k``
            documents a BM25 search of the domain's index returns for its question
            (``evidence="retrieved"``): the same documents whichever model explained it.

    Raises:
        KembedError: not an evaluation, no explanations in it (run ``kembed explain`` first), or
            a sample's record is missing from the data.
    """
    summary, samples = read_evaluation(folder)
    explained = [s for s in samples if "explanation" in s]
    if not explained and "explanations" in summary:  # explained, but no answer was correct
        return []
    if not explained:
        raise KembedError(f"{folder}: no explanations to judge (run `kembed explain {folder}` first)")
    records = evaluation_records(summary, data_dir)
    items = []
    for s in explained:
        record = records.get(s["id"])
        if record is None:
            raise KembedError(f"{folder}/samples.jsonl: record '{s['id']}' is not in "
                              f"{summary['domain']}/{summary['split']}")
        items.append(ExplanationItem(s["id"], record.question, record.options, s["predicted"][SCORER],
                                     record.answer_index, record.knowledge, s["explanation"]["text"]))
    bare = [i for i, item in enumerate(items) if not item.knowledge]
    if retrieved_top_k > 0 and bare:
        from dataclasses import replace

        from kembed.retrieval import build_index

        hits = build_index(summary["domain"], "bm25", data_dir).search_many([items[i].question for i in bare],
                                                                            retrieved_top_k)
        for i, found in zip(bare, hits):
            items[i] = replace(items[i], knowledge=tuple(text for _, _, text in found), evidence="retrieved")
    return items
