"""Accuracy evaluation by option scoring, with bootstrap confidence intervals.

``kembed eval`` writes ``results.json`` (domain, split, mode, model, n, accuracy and ci95 per
scorer) and ``samples.jsonl`` (one line per question: id, per-option scores of every scorer,
predicted and gold option) into its output directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from kembed.records import QARecord
from kembed.scoring import SCORERS, OptionScorer

MODES = ("closed-book", "oracle-context")


def bootstrap_ci(correct: list[bool], *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap confidence interval of a mean accuracy, resampling questions.

    Args:
        correct: one bool per question.
        resamples: bootstrap resamples.
        level: coverage (0.95 gives the 2.5th and 97.5th percentiles).

    Returns:
        ``[low, high]`` as fractions in [0, 1]; ``[0, 0]`` for no questions.
    """
    n = len(correct)
    if n == 0:
        return [0.0, 0.0]
    import numpy as np

    rng = np.random.default_rng(seed)
    values = np.asarray(correct, dtype=float)
    means = values[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def score_records(scorer: OptionScorer, records: list[QARecord], mode: str = "closed-book",
                  progress=None) -> list[dict]:
    """Score every option of every record and return one sample dict per record.

    Args:
        scorer: the option scorer (model, tokenizer, prompt format).
        records: the questions.
        mode: ``closed-book`` (question only) or ``oracle-context`` (the record's own
            knowledge snippets in the prompt).
        progress: optional callable advanced once per record.

    Returns:
        Dicts with id, gold, ``scores`` (scorer -> per-option list), ``predicted``
        (scorer -> option index) and ``correct`` (scorer -> bool).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}' ({', '.join(MODES)})")
    samples = []
    for record in records:
        knowledge = scorer.knowledge(record) if mode == "oracle-context" else None
        result = scorer.score(record, knowledge)
        predicted = {s: result.predict(s) for s in SCORERS}
        samples.append({
            "id": record.id,
            "gold": record.answer_index,
            "predicted": predicted,
            "correct": {s: predicted[s] == record.answer_index for s in SCORERS},
            "scores": {s: [round(v, 6) for v in result.scores(s)] for s in SCORERS},
            "n_tokens": result.n_tokens,
        })
        if progress is not None:
            progress()
    return samples


def summarize(samples: list[dict], **meta) -> dict:
    """The results summary: ``meta`` plus n, accuracy and ci95 per scorer (fractions)."""
    accuracy, ci95 = {}, {}
    for s in SCORERS:
        correct = [x["correct"][s] for x in samples]
        accuracy[s] = sum(correct) / len(correct) if correct else 0.0
        ci95[s] = bootstrap_ci(correct)
    return {**meta, "n": len(samples), "accuracy": accuracy, "ci95": ci95}


def evaluate(model_name: str, records: list[QARecord], *, mode: str, placement, prompts=None,
             implementation: str = "shared_prefix", model=None, tokenizer=None, progress=None) -> tuple[dict, list[dict]]:
    """Load ``model_name`` (unless ``model``/``tokenizer`` are given) and score ``records``.

    Returns:
        ``(summary, samples)`` (see ``summarize`` and ``score_records``).
    """
    from kembed.models import load_model, load_tokenizer

    if model is None:
        tokenizer = load_tokenizer(model_name)
        model = load_model(model_name, placement)
    scorer = OptionScorer(model, tokenizer, placement, prompts, implementation)
    start = time.perf_counter()
    samples = score_records(scorer, records, mode, progress)
    seconds = time.perf_counter() - start
    summary = summarize(samples, model=str(model_name), mode=mode, implementation=implementation,
                        device=placement.device, precision=placement.precision, seconds=round(seconds, 2),
                        questions_per_second=round(len(samples) / seconds, 3) if seconds else None)
    return summary, samples


def results_table(rows: list[dict], title: str = "Accuracy"):
    """A rich table with one row per results summary: accuracy and 95% CI per scorer (%)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "domain", "split", "mode", "n"):
        table.add_column(col)
    for s in SCORERS:
        table.add_column(f"{s} % [95% CI]", justify="right")
    for r in rows:
        cells = [f"{100 * r['accuracy'][s]:.1f} [{100 * r['ci95'][s][0]:.1f}, {100 * r['ci95'][s][1]:.1f}]"
                 for s in SCORERS]
        table.add_row(str(r.get("model")), str(r.get("domain")), str(r.get("split")), str(r.get("mode")),
                      str(r["n"]), *cells)
    return table


def write_results(output: Path, summary: dict, samples: list[dict]) -> None:
    """Write ``results.json`` and ``samples.jsonl`` into ``output`` (atomically)."""
    from kembed.runs import write_json, write_jsonl

    write_jsonl(Path(output) / "samples.jsonl", samples)
    write_json(Path(output) / "results.json", summary)

