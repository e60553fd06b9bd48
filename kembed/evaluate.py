"""Accuracy evaluation by option scoring, with bootstrap confidence intervals.

``kembed eval`` writes ``results.json`` (domain, split, mode, format, model, n, coverage (a trained
run's knowledge coverage of the questions, :func:`run_knowledge`), accuracy and
ci95 per scorer; ``index`` and ``top_k`` for retrieved-context, else null) and ``samples.jsonl`` (one line
per question: id, per-option scores of every scorer, predicted and gold option; in
retrieved-context also ``retrieved``, the ``[document index, score]`` of each retrieved
document) into its output directory.

Modes: ``closed-book`` (the question alone), ``oracle-context`` (the question's own knowledge
snippets before it) and ``retrieved-context`` (the top-k documents that the domain index
(:mod:`kembed.retrieval`) returns for the question text, best first, before it). Knowledge in
the prompt is cut to the prompt format's token budget in both context modes.

Formats (:data:`kembed.prompts.FORMATS`, see :mod:`kembed.scoring`): ``raw`` (the default and
the headline: ``prompt + " " + option`` with no chat template, the RLAG paper's protocol) and
``chat`` (the user turn through the model's chat template with the generation prompt, each
option scored as the assistant's reply; with knowledge the user turn is the RAFT / SimRAG
``<DOCUMENT>`` layout). Results written before formats existed have no ``format`` and are raw.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from kembed.prompts import truncate_knowledge
from kembed.records import QARecord
from kembed.scoring import DEFAULT_REASONING_TOKENS, SCORERS, OptionScorer, raft_reasoning
from kembed.stats import bootstrap_ci
from kembed.tables import ConsoleTables, markdown_table

MODES = ("closed-book", "oracle-context", "retrieved-context")


def score_records(scorer: OptionScorer, records: list[QARecord], mode: str = "closed-book",
                  progress=None, retrieved: Mapping[str, Sequence] | None = None,
                  reasoning_tokens: int = DEFAULT_REASONING_TOKENS) -> list[dict]:
    """Score every option of every record and return one sample dict per record.

    Args:
        scorer: the option scorer (model, tokenizer, prompt format).
        records: the questions.
        mode: ``closed-book`` (question only), ``oracle-context`` (the record's own
            knowledge snippets in the prompt) or ``retrieved-context`` (``retrieved[record.id]``
            in the prompt).
        progress: optional callable ``progress(k)`` advanced as each k records finish (in the
            ``raft`` format twice per record: once written, once scored).
        retrieved: for ``retrieved-context``: record id -> the retrieved documents, best first,
            each a text or a ``(document index, score, text)`` hit of
            :meth:`kembed.retrieval.DomainIndex.search` (see :func:`retrieve_for`).
        reasoning_tokens: ``raft`` format: the tokens the model may write before ``<ANSWER>:``.

    Returns:
        Dicts with id, gold, ``scores`` (scorer -> per-option list), ``predicted``
        (scorer -> option index) and ``correct`` (scorer -> bool); with hits, also
        ``retrieved`` (``[document index, score]`` per hit); in the ``raft`` format also
        ``reasoning``, what the model wrote (the options were scored after its
        :func:`kembed.prompts.answer_stem`).

    Raises:
        ValueError: an unknown mode, or ``retrieved-context`` without ``retrieved`` or with a
            record missing from it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}' ({', '.join(MODES)})")
    if mode == "retrieved-context":
        if retrieved is None:
            raise ValueError("mode 'retrieved-context' needs the retrieved documents (retrieved=...)")
        missing = [r.id for r in records if r.id not in retrieved]
        if missing:
            raise ValueError(f"no retrieved documents for {len(missing)} records (first: {missing[0]})")
    knowledge, hits = [], []
    for record in records:
        found = None
        if mode == "oracle-context":
            context = scorer.knowledge(record)
        elif mode == "retrieved-context":
            docs = retrieved[record.id]
            found = None if any(isinstance(d, str) for d in docs) else docs
            texts = tuple(d if isinstance(d, str) else d[2] for d in docs)
            # nothing retrieved (a BM25 index with no matching word): the closed-book prompt
            context = truncate_knowledge(texts, scorer.tokenizer, scorer.prompts.knowledge_max_tokens) or None
        else:
            context = None
        knowledge.append(context)
        hits.append(found)
    reasoning = None
    if scorer.fmt == "raft":
        reasoning = raft_reasoning(scorer.model, scorer.tokenizer, scorer.placement, records, knowledge,
                                   reasoning_tokens, progress)
    results = scorer.score_many(records, knowledge, progress=progress, reasoning=reasoning)
    samples = []
    for i, (record, result, found) in enumerate(zip(records, results, hits)):
        predicted = {s: result.predict(s) for s in SCORERS}
        samples.append({
            "id": record.id,
            "gold": record.answer_index,
            "predicted": predicted,
            "correct": {s: predicted[s] == record.answer_index for s in SCORERS},
            "scores": {s: [round(v, 6) for v in result.scores(s)] for s in SCORERS},
            "n_tokens": result.n_tokens,
        })
        if found is not None:
            samples[-1]["retrieved"] = [[int(h[0]), round(float(h[1]), 6)] for h in found]
        if reasoning is not None:
            samples[-1]["reasoning"] = reasoning[i]
    return samples


def retrieve_for(records: Sequence[QARecord], index, top_k: int) -> dict[str, list]:
    """The ``top_k`` documents that ``index`` (a :class:`kembed.retrieval.DomainIndex`) returns
    for each record's question (one batched search).

    Returns:
        record id -> list of ``(document index, score, text)`` hits, best first (fewer than
        ``top_k`` when a BM25 index finds fewer matching documents).
    """
    hits = index.search_many([r.question for r in records], top_k)
    return {r.id: h for r, h in zip(records, hits)}


def summarize(samples: list[dict], **meta) -> dict:
    """The results summary: ``meta`` plus n, accuracy and ci95 per scorer (fractions)."""
    accuracy, ci95 = {}, {}
    for s in SCORERS:
        correct = [x["correct"][s] for x in samples]
        accuracy[s] = sum(correct) / len(correct) if correct else 0.0
        ci95[s] = bootstrap_ci(correct)
    return {**meta, "n": len(samples), "accuracy": accuracy, "ci95": ci95}


def evaluate(model_name: str, records: list[QARecord], *, mode: str, placement, prompts=None,
             implementation: str = "packed", model=None, tokenizer=None, progress=None,
             index=None, top_k: int = 3, fmt: str = "raw", batch_tokens: int | None = None,
             reasoning_tokens: int = DEFAULT_REASONING_TOKENS) -> tuple[dict, list[dict]]:
    """Load ``model_name`` (unless ``model``/``tokenizer`` are given) and score ``records``.

    Under a multi-process launch each rank scores its :func:`~kembed.distributed.shard` of the
    records and every rank returns all the samples in record order (a collective); ``progress``
    advances for this rank's records only.

    Args:
        fmt: scoring format, ``"raw"`` (default, the paper's protocol), ``"chat"`` (the
            model's chat template) or ``"raft"`` (RAFT's instruction; the model writes its
            reasoning, options scored after ``<ANSWER>:``); see :func:`kembed.scoring.build_prompt`.
        index: for ``retrieved-context``: the :class:`kembed.retrieval.DomainIndex` to search
            (see :func:`kembed.retrieval.build_index`).
        top_k: documents retrieved per question (retrieved-context).
        batch_tokens: the token budget of one scoring forward pass (None: the implementation's
            default; see :class:`kembed.scoring.OptionScorer`).
        reasoning_tokens: ``raft`` format: tokens the model may write before ``<ANSWER>:``.

    Returns:
        ``(summary, samples)`` (see ``summarize`` and ``score_records``); the summary records
        ``format``, and ``index`` (its kind) and ``top_k`` in retrieved-context mode, else both
        are None; in the ``raft`` format also ``reasoning_tokens``.

    Raises:
        ValueError: an unknown ``fmt``, ``retrieved-context`` without an index, or ``top_k`` < 1.
        ModelError: ``fmt`` ``chat`` or ``raft`` and the tokenizer has no chat template.
    """
    from kembed import distributed
    from kembed.models import load_model, load_tokenizer
    from kembed.scoring import check_format

    check_format(fmt)
    retrieved = None
    if mode == "retrieved-context":
        if index is None:
            raise ValueError("mode 'retrieved-context' needs an index")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        retrieved = retrieve_for(records, index, top_k)
    if model is None:
        tokenizer = load_tokenizer(model_name)
        model = load_model(model_name, placement)
        if placement.precision == "bf16":  # scored in bf16 (kembed.models.inference_weights): cast once, no copy
            model = model.to(torch.bfloat16)
    scorer = OptionScorer(model, tokenizer, placement, prompts, implementation, fmt, batch_tokens)
    split_work = distributed.splits_work(model)
    start = time.perf_counter()
    samples = score_records(scorer, distributed.shard(records) if split_work else records, mode, progress,
                            retrieved=retrieved, reasoning_tokens=reasoning_tokens)
    if split_work:
        samples = distributed.gather(samples, len(records))
    seconds = time.perf_counter() - start
    summary = summarize(samples, model=str(model_name), mode=mode, format=fmt, implementation=implementation,
                        index=index.kind if retrieved is not None else None,
                        top_k=top_k if retrieved is not None else None,
                        device=placement.device, precision=placement.precision, seconds=round(seconds, 2),
                        questions_per_second=round(len(samples) / seconds, 3) if seconds else None)
    if fmt == "raft":
        summary["reasoning_tokens"] = reasoning_tokens
    return summary, samples


def _model_label(model: str) -> str:
    """A short name for a model argument: a run directory's folder name, else the argument."""
    path = Path(model)
    return path.name if path.name and (path / "kembed-run.json").exists() else model


def results_cells(rows: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    """The cells of a results table: ``(title suffix, header, one list of cells per summary)``.

    Columns: model, domain and split when the rows differ in them (else they form the title
    suffix ``domain / split``), mode, n, accuracy and 95% CI per scorer (%), the knowledge
    coverage of a trained run's questions (``coverage`` in the summary: questions whose gold
    answer occurs in snippets the run trained on / questions whose answer is in their own
    snippets; ``-`` for a model that is not a kembed run), and what the run trained on
    (``trained_on``, :func:`run_training`). The mode reads e.g. ``retrieved-context (bm25,
    k=3)``; when any row is not in the raw format every row also names its format
    (``closed-book, raw``); a summary without ``format`` (written before formats existed) is raw.
    """
    shared = {k: {str(r.get(k)) for r in rows} for k in ("domain", "split")}
    per_row = [k for k, values in shared.items() if len(values) > 1]
    suffix = f"{rows[0].get('domain')} / {rows[0].get('split')}" if rows and not per_row else ""
    header = ["model", *per_row, "mode", "n", *(f"{s} % [95% CI]" for s in SCORERS),
              "answer in training knowledge", "trained on"]
    show_format = any((r.get("format") or "raw") != "raw" for r in rows)
    body = []
    for r in rows:
        accuracy = [f"{100 * r['accuracy'][s]:.1f} [{100 * r['ci95'][s][0]:.1f}, {100 * r['ci95'][s][1]:.1f}]"
                    for s in SCORERS]
        mode = str(r.get("mode")) + (f" ({r['index']}, k={r['top_k']})" if r.get("index") else "")
        if show_format:
            mode += f", {r.get('format') or 'raw'}"
        c = r.get("coverage")
        covered = f"{c['answer_covered']}/{c['answer_in_snippets']}" if c else "-"
        body.append([_model_label(str(r.get("model"))), *[str(r.get(k)) for k in per_row], mode, str(r["n"]),
                     *accuracy, covered, r.get("trained_on") or "-"])
    return suffix, header, body


def results_table(rows: list[dict], title: str = "Accuracy") -> ConsoleTables:
    """The :func:`results_cells` table for the console: short headers and a legend; when the
    scorers do not fit the width side by side, the model and mode start each of several tables."""
    suffix, header, body = results_cells(rows)
    short = {f"{s} % [95% CI]": f"{s} %" for s in SCORERS} | {"answer in training knowledge": "answer known"}
    key = header.index("mode") + 1
    numbers = [i for i, h in enumerate(header) if h == "n" or h in short]
    groups = [[key, key + 1], *([i] for i in range(key + 2, len(header) - 2)), [len(header) - 2, len(header) - 1]]
    legend = ["<scorer> %: accuracy by that option scorer [95% bootstrap CI]; answer known: questions whose gold "
              "answer is in the run's training knowledge / questions whose answer is in their own snippets"]
    return ConsoleTables(f"{title}: {suffix}" if suffix else title, [short.get(h, h) for h in header], body,
                         numbers=numbers, key=key, groups=groups, legend=legend)


def results_markdown(rows: list[dict]) -> str:
    """The same table as :func:`results_table` as GitHub-flavoured Markdown, full headers."""
    suffix, header, body = results_cells(rows)
    return (f"Accuracy: {suffix}\n\n" if suffix else "") + markdown_table(header, body)


def run_knowledge(model: str, records: list[QARecord], data_dir=None) -> tuple[dict, dict[str, str]] | None:
    """What a kembed run's training records (its ``data_sample.json``) teach of ``records``:
    ``(coverage, classes)``, the counts of :func:`kembed.data.knowledge_coverage` and each
    question's class (:func:`kembed.data.answer_knowledge`: taught, untaught or
    no-answer-snippet); None when ``model`` is not a run with a saved sample, or the run
    trained on another domain.

    Raises:
        KembedError, DataError: the run's domain data cannot be loaded.
    """
    import json

    import yaml

    from kembed.data import answer_knowledge, knowledge_coverage, load_records

    path = Path(model)
    if not (path / "data_sample.json").is_file() or not records:
        return None
    domain = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("domain")
    if domain != records[0].domain:
        return None
    ids = set(json.loads((path / "data_sample.json").read_text())["train_ids"])
    train = [r for r in load_records(domain, "train", data_dir) if r.id in ids]
    return knowledge_coverage(train, records), answer_knowledge(train, records)


def run_training(model: str) -> str | None:
    """What a kembed run trained on, in a few words for results tables (method, the number of
    training records and the sample's seed, and CPT's corpus); None when ``model`` is not a run."""
    import yaml

    path = Path(model) / "config.yaml"
    if not path.is_file() or not (Path(model) / "kembed-run.json").is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    method = cfg.get("method", "?")
    section = cfg.get(method) or {}
    corpus = (section.get("cpt") or section).get("corpus") if isinstance(section, dict) else None
    records = "all" if cfg.get("limit") is None else cfg["limit"]
    return f"{method}: {records} records (seed {cfg.get('seed')})" + (f", CPT corpus {corpus}" if corpus else "")


def write_results(output: Path, summary: dict, samples: list[dict]) -> None:
    """Write ``results.json`` and ``samples.jsonl`` into ``output`` (atomically)."""
    from kembed.runs import write_json, write_jsonl

    write_jsonl(Path(output) / "samples.jsonl", samples)
    write_json(Path(output) / "results.json", summary)

