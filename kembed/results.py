"""Results of bench models: per-model rows, statistics over seeds, tables and plots.

The stage after evaluation and judging: each :class:`ModelEntry` (the base model or a trained
run, with its evaluation folders) becomes one row (:func:`model_row`, :func:`collect`): accuracy
per evaluation with its CI and the paired difference to the base model, taught/untaught splits,
retention, grounded rationality and training time. :func:`seed_summary`,
:func:`seed_rationality` and :func:`method_ranking` aggregate a method's training seeds with
two-level bootstrap CIs (:mod:`kembed.stats`). The table and plot helpers render rows for
``kembed bench`` (:mod:`kembed.bench` writes the report) and ``kembed compare``
(:func:`compare_entries`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Callable

from kembed.errors import KembedError
from kembed.runs import read_jsonl, training_seconds
from kembed.tables import ConsoleTables

SCORER = "token_mean"  # the headline scorer


@dataclass
class ModelEntry:
    """A model of the bench: ``base`` or a method's run, with its evaluation folders by label."""

    domain: str
    name: str
    method: str | None
    seed: int | None
    model: str
    run: Path | None
    evals: dict[str, Path]
    tuning: Callable[[], dict] | None = None  # the tune selection its training used (kembed.tune.select)
    retention: dict[str, Path] = field(default_factory=dict)  # other domain -> its closed-book evaluation


def _samples(folder: Path) -> list[dict]:
    return read_jsonl(folder / "samples.jsonl")


def _correct(folder: Path, samples: list[dict] | None = None) -> dict[str, bool]:
    return {r["id"]: bool(r["correct"][SCORER]) for r in (samples or _samples(folder))}


def _knowledge(folder: Path, samples: list[dict] | None = None) -> dict[str, str]:
    """Question id -> knowledge class (taught, untaught, no-answer-snippet) of an evaluation of a
    trained run (``kembed eval`` marks each sample); empty for the base model."""
    if samples is None and not (folder / "samples.jsonl").is_file():
        return {}
    return {r["id"]: r["knowledge"] for r in (samples or _samples(folder)) if "knowledge" in r}


KNOWLEDGE_CODES = {"taught": "t", "untaught": "u", "no-answer-snippet": "n"}  # "." : not marked


def outcomes(correct: dict[str, bool], classes: dict[str, str] | None = None, where: str = "") -> dict:
    """The per-question outcomes of an evaluation in the compact form a results.json cell
    carries (no question text): ``{"ids": [question ids, sorted], "correct": "0110...",
    "knowledge": "tun."}``. ``correct`` has one ``1`` / ``0`` per id (correct under the
    headline scorer); ``knowledge``, present only when some question has a class, one letter per
    id: ``t`` taught, ``u`` untaught, ``n`` no answer snippet (:func:`kembed.data.answer_knowledge`),
    ``.`` not marked.

    Raises:
        KembedError: (naming ``where``) a knowledge class that is none of those.
    """
    ids = sorted(correct)
    out = {"ids": ids, "correct": "".join("1" if correct[i] else "0" for i in ids)}
    if classes:
        unknown = sorted({k for k in classes.values() if k not in KNOWLEDGE_CODES})
        if unknown:
            raise KembedError(f"{where}: unknown knowledge class {unknown[0]!r} "
                              f"(expected one of {', '.join(KNOWLEDGE_CODES)})")
        out["knowledge"] = "".join(KNOWLEDGE_CODES[classes[i]] if i in classes else "." for i in ids)
    return out


def cell_outcomes(cell: dict, where: str = "") -> tuple[dict[str, bool], dict[str, str]] | None:
    """Decode a cell's ``outcomes`` (:func:`outcomes`): ``(question id -> correct, question id ->
    knowledge class)``; None for a cell without them (a results.json written before cells
    carried outcomes).

    Raises:
        KembedError: (naming ``where``) malformed outcomes: strings whose length is not the
            number of ids, letters outside ``01`` / ``tun.``, or ids naming a list not found.
    """
    o = cell.get("outcomes")
    if not o:
        return None
    ids, correct, knowledge = o.get("ids"), o.get("correct"), o.get("knowledge")
    if isinstance(ids, str):  # a name :func:`kembed.bench.earlier_report` found no list for
        raise KembedError(f"{where}: outcomes: 'ids' names {ids!r}, which the file's question_ids lacks")
    letters = {v: k for k, v in KNOWLEDGE_CODES.items()}
    if (not isinstance(ids, list) or not isinstance(correct, str) or len(correct) != len(ids)
            or set(correct) - {"0", "1"}):
        raise KembedError(f"{where}: outcomes: 'correct' must hold one 0/1 per id ({len(ids or [])} ids)")
    if knowledge is not None and (not isinstance(knowledge, str) or len(knowledge) != len(ids)
                                  or set(knowledge) - {*letters, "."}):
        raise KembedError(f"{where}: outcomes: 'knowledge' must hold one of t/u/n/. per id ({len(ids)} ids)")
    return ({i: c == "1" for i, c in zip(ids, correct)},
            {i: letters[k] for i, k in zip(ids, knowledge or "") if k != "."})


def shared_knowledge(entries: list[ModelEntry]) -> dict[tuple[str, str], dict[str, str]]:
    """(domain, evaluation label) -> the knowledge classes of the first trained run's evaluation
    that has them: what a model that was not trained (the base model) is split by, so that its
    taught / untaught accuracy is over the same questions as the runs'. In a suite every run
    trains on the same sample, so every run has these classes."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for e in entries:
        for label, folder in e.evals.items():
            if (e.domain, label) not in out:
                classes = _knowledge(folder)
                if classes:
                    out[e.domain, label] = classes
    return out


def by_knowledge(correct: dict[str, bool], reference: dict[str, bool] | None, classes: dict[str, str]) -> dict:
    """Accuracy on the taught and on the untaught questions (:func:`kembed.data.answer_knowledge`),
    each with the paired difference to ``reference`` on the same questions.

    Returns:
        ``{"taught": {"n", "accuracy", "vs_reference"?}, "untaught": {...}}``; accuracy 0.0 for
        no questions.
    """
    from kembed.data import TAUGHT, UNTAUGHT
    from kembed.stats import paired_accuracy

    out = {}
    for kind in (TAUGHT, UNTAUGHT):
        ids = [i for i in correct if classes.get(i) == kind]
        mine = {i: correct[i] for i in ids}
        out[kind] = {"n": len(ids), "accuracy": sum(mine.values()) / len(ids) if ids else 0.0}
        if reference is not None:
            out[kind]["vs_reference"] = paired_accuracy(mine, {i: reference[i] for i in ids if i in reference})
    return out


def _training_seconds(run: Path | None) -> float | None:
    """Training wall time of a run (:func:`kembed.runs.training_seconds`); ``None`` without one."""
    if run is None or not (run / "metrics.jsonl").is_file():
        return None
    return training_seconds(read_jsonl(run / "metrics.jsonl"))


def _latest_judgments(folder: Path, judge: str) -> dict[str, dict]:
    """Question id -> the latest configuration's judgment of that judge (a re-parse supersedes
    earlier judgments); empty when not judged."""
    from kembed.judges import judge_key, read_judgments

    rows = [r for r in read_judgments(folder) if r["judge"] == judge]
    if not rows:
        return {}
    key = judge_key(rows[-1]["judge"], rows[-1]["version"], rows[-1]["settings"])
    return {r["id"]: r for r in read_judgments(folder, key)}


def rationality(folder: Path, judge: str = "grounded") -> dict | None:
    """A judge's summary (:func:`kembed.judges.summarize_judgments`) of the explanations in an
    evaluation folder: the latest configuration of that judge; None when not judged."""
    from kembed.judges import summarize_judgments

    latest = _latest_judgments(folder, judge)
    return summarize_judgments(list(latest.values())) if latest else None


def paired_rationality(folder: Path, reference: Path, judge: str = "grounded") -> dict | None:
    """Rationality of two models compared on the questions both answered correctly and both
    had scored (each model explains only its own correct answers, so unpaired means compare
    different questions): the paired bootstrap of the score difference
    (:func:`kembed.stats.paired_bootstrap_diff`).

    Returns:
        ``{"n", "diff": mean score of folder - of reference, "ci95"}``; None when either is not
        judged.
    """
    from kembed.stats import paired_bootstrap_diff

    a, b = judged_scores(folder, judge), judged_scores(reference, judge)
    if not a or not b:
        return None
    ids = sorted(set(a) & set(b))
    return paired_bootstrap_diff([a[i] for i in ids], [b[i] for i in ids])


def judged_scores(folder: Path, judge: str = "grounded") -> dict[str, float]:
    """Question id -> the score in [0, 1] the latest configuration of ``judge`` gave the
    explanation in an evaluation folder (explanations without a score left out); empty when not
    judged. A cell carries them (``grounded_scores``) for :func:`seed_rationality`."""
    return {i: r["score"] for i, r in _latest_judgments(folder, judge).items() if r["score"] is not None}


def eval_cell(folder: Path, reference: Path | None, classes: dict[str, str] | None = None) -> dict | None:
    """Accuracy of one evaluation folder and, against ``reference`` (another evaluation of the
    same questions), the paired difference (:func:`kembed.stats.paired_accuracy`); the same on
    the taught and untaught questions (:func:`by_knowledge`, ``by_knowledge`` in the cell) by
    the folder's own knowledge classes, else by ``classes``; None when the folder holds no
    results.

    The cell: ``folder``, ``n``, ``accuracy``, ``ci95``, ``coverage``, ``mode``, ``format``,
    ``model``, ``domain``, ``split``; ``outcomes``, every question's correctness and the
    folder's own knowledge classes in compact form (:func:`outcomes`: ids, a ``0``/``1``
    string, a ``t``/``u``/``n``/``.`` string), from which the report's statistics over seeds and
    methods are computed without the folder; ``vs_reference``, ``by_knowledge``, ``grounded``
    and ``grounded_vs_reference`` when they apply."""
    from kembed.stats import paired_accuracy

    if not (folder / "results.json").is_file():
        return None
    summary = json.loads((folder / "results.json").read_text())
    cell = {"folder": str(folder), "n": summary["n"], "accuracy": summary["accuracy"][SCORER],
            "ci95": summary["ci95"][SCORER], "coverage": summary.get("coverage"),
            "mode": summary.get("mode"), "format": summary.get("format") or "raw", "model": summary.get("model"),
            "domain": summary.get("domain"), "split": summary.get("split")}
    samples = _samples(folder)
    correct, own = _correct(folder, samples), _knowledge(folder, samples)
    cell["outcomes"] = outcomes(correct, own, str(folder / "samples.jsonl"))
    ref = _correct(reference) if reference is not None and reference != folder and \
        (reference / "samples.jsonl").is_file() else None
    if ref is not None:
        cell["vs_reference"] = paired_accuracy(correct, ref)
    classes = own or classes
    if classes:
        cell["by_knowledge"] = by_knowledge(correct, ref, classes)
    judged = rationality(folder)
    if judged:
        cell["grounded"] = judged
        cell["grounded_scores"] = {i: round(v, 6) for i, v in sorted(judged_scores(folder).items())}
        if ref is not None:
            cell["grounded_vs_reference"] = paired_rationality(folder, reference)
    return cell


def model_row(entry: ModelEntry, reference: ModelEntry | None,
              classes: dict[tuple[str, str], dict[str, str]] | None = None,
              base_retention: dict[str, Path] | None = None) -> dict:
    """One table row: the model's evaluations (:func:`eval_cell`, against the reference model's
    evaluation of the same label, split by ``classes``, :func:`shared_knowledge`), training
    seconds, knowledge coverage and, for a trained model, retention: its closed-book cells on
    the other domains against the base model's (``base_retention``: domain -> folder), and
    ``retention_mean``, the mean difference over those domains (fractions)."""
    classes = classes or {}
    cells = {label: eval_cell(folder, reference.evals.get(label) if reference else None,
                              classes.get((entry.domain, label)))
             for label, folder in entry.evals.items()}
    coverage = next((c["coverage"] for c in cells.values() if c and c.get("coverage")), None)
    row = {"domain": entry.domain, "name": entry.name, "method": entry.method, "seed": entry.seed,
           "model": entry.model, "training_seconds": _training_seconds(entry.run), "coverage": coverage,
           "evals": cells}
    if entry.method is not None and entry.retention:
        row["retention"] = {d: eval_cell(f, (base_retention or {}).get(d)) for d, f in entry.retention.items()}
        diffs = [c["vs_reference"]["diff"] for c in row["retention"].values() if c and c.get("vs_reference")]
        row["retention_mean"] = sum(diffs) / len(diffs) if diffs else None
    if entry.tuning is not None:
        try:
            row["tune"] = {k: v for k, v in entry.tuning().items() if k in ("selected", "overrides", "grid")}
        except KembedError:  # no configuration of the grid finished
            row["tune"] = None
    return row


def compare_entries(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """Rows (:func:`model_row`) for ``kembed compare``: each path is an evaluation directory, or
    a run directory holding ``eval-*`` evaluations (as the bench writes them); the first path is
    the reference of the paired tests. Evaluations are matched by mode and format.

    Returns:
        ``(rows, labels)``: labels are the ``<mode>-<format>`` evaluations in first-seen order.

    Raises:
        KembedError: a path holds no evaluation.
    """
    entries = []
    for path in paths:
        path = Path(path)
        folders = [path] if (path / "results.json").is_file() else sorted(
            p.parent for p in path.glob("eval-*/results.json"))
        if not folders:
            raise KembedError(f"{path}: no evaluation (results.json) in it or in its eval-* folders")
        evals = {}
        for folder in folders:
            summary = json.loads((folder / "results.json").read_text())
            evals[f"{summary.get('mode')}-{summary.get('format') or 'raw'}"] = folder
        summary = json.loads((folders[0] / "results.json").read_text())
        model = str(summary.get("model"))
        run = Path(model) if (Path(model) / "kembed-run.json").is_file() else None
        name = run.name if run else (path.name if len(paths) > 1 else model)
        entries.append(ModelEntry(str(summary.get("domain")), name, None, None, model, run, evals))
    names = [e.name for e in entries]
    for e, p in zip(entries, paths):
        if names.count(e.name) > 1:
            e.name = str(p)
    labels = list(dict.fromkeys(label for e in entries for label in e.evals))
    classes = shared_knowledge(entries)
    return [model_row(e, entries[0] if i else None, classes) for i, e in enumerate(entries)], labels


def collect(models: list[ModelEntry]) -> list[dict]:
    """Rows for every model, each compared with its domain's base model."""
    base = {m.domain: m for m in models if m.method is None}
    classes = shared_knowledge(models)
    retention = {d: f for m in base.values() for d, f in m.retention.items()}
    return [model_row(m, base.get(m.domain), classes, retention) for m in models]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(e: dict, scale: float = 100, digits: int = 1) -> str:
    """``"+d [+lo, +hi]"`` of a ``{"diff", "ci95"}`` dict: points by default (``scale`` 100)."""
    d, (lo, hi) = e["diff"], e["ci95"]
    return f"{scale * d:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def format_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def table_cells(rows: list[dict], labels: list[str], reference: str = "base") -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table: per evaluation label, accuracy [95% CI],
    difference to the ``reference`` row [paired 95% CI] with McNemar's p; then grounded rationality and
    unable-to-explain share [Wilson 95% CI] (from the first explained evaluation), training
    time and knowledge coverage of the evaluated split. The first evaluation also gets its
    accuracy on the taught and the untaught questions (:func:`by_knowledge`) with the paired
    difference to the reference, when the rows carry knowledge classes."""
    header = ["model"]
    split = next((c["by_knowledge"] for r in rows for c in [r["evals"].get(labels[0])] if c and c.get("by_knowledge")),
                 None) if labels else None
    for label in labels:
        header += [f"{label} % [95% CI]", f"{label} vs {reference} (pp) [paired CI], p"]
        if split and label == labels[0]:
            header += [f"{label} {kind} % (n = {split[kind]['n']}), vs {reference} (pp)" for kind in ("taught", "untaught")]
    header += ["grounded rationality (n)", f"grounded vs {reference}, both correct [paired CI] (n)",
               "unable to explain % [95% CI]"]
    header += ["retention vs base (pp, domains)"] if any("retention" in r for r in rows) else []
    header += ["training s", "answer in training knowledge"]
    body = []
    for r in rows:
        line = [r["name"] + (" (carried over)" if r.get("carried_from") and not all(
            x.get("carried_from") for x in rows if x["domain"] == r["domain"]) else "")]
        judged = paired_judged = None
        for label in labels:
            c = r["evals"].get(label)
            if c is None:
                line += ["-", "-"] + (["-", "-"] if split and label == labels[0] else [])
                continue
            line.append(f"{_pct(c['accuracy'])} [{_pct(c['ci95'][0])}, {_pct(c['ci95'][1])}]")
            v = c.get("vs_reference")
            line.append(f"{100 * v['diff']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}], {format_p(v['p_value'])}"
                        if v else "-")
            if split and label == labels[0]:
                for kind in ("taught", "untaught"):
                    k = (c.get("by_knowledge") or {}).get(kind)
                    d = (k or {}).get("vs_reference")
                    line.append("-" if not k else _pct(k["accuracy"]) + (f", {100 * d['diff']:+.1f}" if d else ""))
            if not judged and c.get("grounded"):
                judged, paired_judged = c["grounded"], c
        if judged and judged["scored"]:
            line.append(f"{judged['mean_score']:.2f} ({judged['scored']})")
            g = paired_judged.get("grounded_vs_reference") if paired_judged else None
            line.append(f"{g['diff']:+.2f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}] ({g['n']})" if g and g["n"] else "-")
            lo, hi = judged["unable_ci95"]
            line.append(f"{_pct(judged['unable_share'])} [{_pct(lo)}, {_pct(hi)}]")
        else:
            line += ["-", "-", "-"]
        if any("retention" in x for x in rows):
            line.append("-" if r.get("retention_mean") is None else
                        f"{100 * r['retention_mean']:+.1f} ({len(r['retention'])})")
        line.append(f"{r['training_seconds']:.0f}" if r.get("training_seconds") is not None else "-")
        cov = r.get("coverage")
        line.append(f"{cov['answer_covered']}/{cov['answer_in_snippets']}" if cov else "-")
        body.append(line)
    return header, body


def console_tables(rows: list[dict], labels: list[str], title: str, reference: str = "base") -> ConsoleTables:
    """The :func:`table_cells` table for the console: short headers, a legend, one group of
    columns per evaluation plus one of rationality, training time and coverage, packed into as
    few tables as the console width allows (:class:`kembed.tables.ConsoleTables`)."""
    header, body = table_cells(rows, labels, reference)
    ref = reference if len(reference) <= 10 else "ref"
    short = {"grounded rationality (n)": "grounded (n)", "unable to explain % [95% CI]": "unable %",
             f"grounded vs {reference}, both correct [paired CI] (n)": f"grounded vs {ref}",
             "training s": "train s", "answer in training knowledge": "answer known",
             "retention vs base (pp, domains)": "retention"}
    for label in labels:
        short |= {f"{label} % [95% CI]": f"{label} %", f"{label} vs {reference} (pp) [paired CI], p": f"{label} vs {ref}"}
    split = [i for i, h in enumerate(header) if "taught % (n = " in h]  # taught and untaught
    short |= {header[i]: re.sub(r" % \(n = (\d+)\).*", r" (n=\1)", header[i]) for i in split}
    groups = [[i for i, h in enumerate(header) if h.startswith(f"{label} ") and i not in split] for label in labels]
    groups += [split] if split else []
    rest = [i for i in range(1, len(header)) if all(i not in g for g in groups)]
    groups.append([i for i in rest if "grounded" in header[i] or "unable" in header[i]])  # rationality
    groups.append([i for i in rest if i not in groups[-1]])  # retention, time, coverage
    legend = [f"<eval> %: {SCORER} accuracy [95% bootstrap CI]; <eval> vs {ref}: paired difference to {reference} "
              "in points [paired bootstrap 95% CI], McNemar's exact p",
              *([f"{labels[0]} taught / untaught: accuracy on the questions whose gold answer is in the run's "
                 f"training snippets / only in their own untrained snippets, then the paired difference to {reference}"]
                if split else []),
              "grounded (n): mean grounded-judge score of the n judged explanations of correct answers; "
              f"grounded vs {ref}: the paired difference on the n questions both answered correctly; "
              "unable %: the share the model could not explain [Wilson 95% CI]",
              *(["retention: closed-book accuracy on the other domains' test samples minus the base model's, "
                 "in points, averaged over the domains (how many in brackets)"]
                if "retention vs base (pp, domains)" in header else []),
              "train s: training seconds; answer known: questions whose gold answer is in the run's training "
              "knowledge / questions whose answer is in their own snippets"]
    return ConsoleTables(title, [short.get(h, h) for h in header], body, numbers=range(1, len(header)),
                         groups=groups, legend=legend)


def plot(rows: list[dict], labels: list[str], out: Path) -> list[Path]:
    """PNG plots: accuracy with 95% CI bars per model and evaluation (one panel per domain, stacked),
    accuracy vs training time, and grounded rationality vs accuracy (a panel per domain, a colour
    per method, a point per run). Returns the files written
    (none without rows: a report written while only the tuning grid has run)."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    files = []

    # One panel per domain, stacked, each as wide as the domain with the most bars needs (about 0.2 inch a bar):
    # side by side, four domains made a picture too wide to read when scaled down.
    bars = max(sum(r["domain"] == d for r in rows) for d in domains) * len(labels)
    fig, axes = plt.subplots(len(domains), 1, figsize=(max(6.0, 2 + 0.2 * bars), 4.2 * len(domains)), squeeze=False)
    for ax, domain in zip(axes[:, 0], domains):
        mine = [r for r in rows if r["domain"] == domain]
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            xs, ys, err = [], [], [[], []]
            for i, r in enumerate(mine):
                c = r["evals"].get(label)
                if c:
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(100 * c["accuracy"])
                    err[0].append(100 * (c["accuracy"] - c["ci95"][0]))
                    err[1].append(100 * (c["ci95"][1] - c["accuracy"]))
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=label)
        ax.set_xticks(range(len(mine)), [r["name"] for r in mine], rotation=30, ha="right")
        ax.set_ylabel(f"accuracy % ({SCORER}, 95% CI)")
        ax.set_title(domain)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "accuracy.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    from matplotlib.lines import Line2D

    methods = list(dict.fromkeys(r["method"] or "base" for r in rows))
    style = {m: {"color": f"C{i % 10}", "marker": "x" if m == "base" else "o"} for i, m in enumerate(methods)}

    def scatter(xkey: Callable[[dict], float | None], ykey: Callable[[dict], float | None], xlabel, ylabel, name):
        # A panel per domain and a colour per method (its seeds share it): one panel of every model
        # with a label each was unreadable at four domains and three seeds.
        cols = min(2, len(domains))
        lines = -(-len(domains) // cols)
        fig, axes = plt.subplots(lines, cols, figsize=(5.5 * cols, 4.2 * lines), squeeze=False)
        for ax in axes.flat[len(domains):]:
            ax.set_visible(False)
        for ax, domain in zip(axes.flat, domains):
            for r in rows:
                x, y = (xkey(r), ykey(r)) if r["domain"] == domain else (None, None)
                if x is not None and y is not None:
                    ax.scatter([x], [y], **style[r["method"] or "base"])
            ax.set_title(domain)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        ncol = min(len(methods), 4 * cols)  # about 1.3 inch a legend entry
        fig.legend(handles=[Line2D([], [], linestyle="", label=m, **style[m]) for m in methods], loc="upper center",
                   ncol=ncol, fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 * -(-len(methods) // ncol) / fig.get_figheight()))
        files.append(out / name)
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

    first = labels[0]

    def acc(r, label=first):
        c = r["evals"].get(label)
        return 100 * c["accuracy"] if c else None

    scatter(lambda r: r.get("training_seconds") or (0.0 if r["method"] is None else None), acc,
            "training time (s)", f"{first} accuracy %", "accuracy_vs_training_time.png")
    explained = next((lab for lab in labels if any((r["evals"].get(lab) or {}).get("grounded") for r in rows)), None)
    if explained:
        scatter(lambda r: acc(r, explained),
                lambda r: ((r["evals"].get(explained) or {}).get("grounded") or {}).get("mean_score"),
                f"{explained} accuracy %", "grounded rationality (mean score)", "rationality_vs_accuracy.png")
    return files


def _runs_by_method(rows: list[dict], domain: str, label: str) -> dict[str, list[dict]]:
    """method (``base`` for the base model) -> the evaluation cells of its runs (one per seed)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        c = r["evals"].get(label)
        if r["domain"] == domain and c:
            out.setdefault(r["method"] or "base", []).append(c)
    return out


def _decoded(rows: list[dict], domain: str, label: str) -> dict[str, list[tuple[dict, dict]]]:
    """:func:`_runs_by_method` with each cell's decoded outcomes (:func:`cell_outcomes`); a
    method with a cell without outcomes (carried from an older results.json) is left out."""
    out = {}
    for method, cells in _runs_by_method(rows, domain, label).items():
        decoded = [cell_outcomes(c, f"results row {domain} {method}, {label}") for c in cells]
        if all(d is not None for d in decoded):
            out[method] = decoded
    return out


def without_outcomes(rows: list[dict], labels: list[str]) -> list[str]:
    """``"<domain> <name> (<label>)"`` of every evaluation cell that carries no ``outcomes``
    (rows carried from a results.json written before cells carried them): what
    :func:`seed_summary` and :func:`method_ranking` leave out."""
    return [f"{r['domain']} {r['name']} ({label})" for r in rows for label in labels
            if r["evals"].get(label) and not r["evals"][label].get("outcomes")]


def seed_summary(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per domain, method and evaluation, the accuracy over training seeds against the base
    model, with the two-level bootstrap (:func:`kembed.stats.seeds_accuracy`: seeds, then
    questions), on all questions and on the taught and untaught ones (the classes of the
    method's first run that carries outcomes).

    Reads only the rows: each cell's ``outcomes`` (:func:`eval_cell`), never a folder. A method
    with a cell without outcomes, or a domain whose base cell has none, is left out
    (:func:`without_outcomes` lists them).

    Returns:
        Dicts ``{"domain", "method", "evaluation", "seeds", "mean", "sd", "min", "max", "diff",
        "ci95", "taught": {"n", "mean", "diff", "ci95"} | None, "untaught": ...}``, fractions.

    Raises:
        KembedError: a cell's outcomes are malformed.
    """
    from kembed.data import TAUGHT, UNTAUGHT
    from kembed.stats import seeds_accuracy

    out = []
    for domain in dict.fromkeys(r["domain"] for r in rows):
        for label in labels:
            runs = _decoded(rows, domain, label)
            if "base" not in runs:
                continue
            base = [correct for correct, _ in runs["base"]]
            classes = next((k for m, cs in runs.items() if m != "base" for _, k in cs), {})
            for method, cells in runs.items():
                if method == "base":
                    continue
                correct = [c for c, _ in cells]
                whole = seeds_accuracy(correct, base)
                entry = {"domain": domain, "method": method, "evaluation": label, "seeds": whole["seeds"],
                         "mean": whole["mean"], "sd": whole["sd"], "min": min(whole["accuracies"]),
                         "max": max(whole["accuracies"]), "diff": whole["diff"], "ci95": whole["ci95"]}
                for kind in (TAUGHT, UNTAUGHT):
                    ids = {i for i, k in classes.items() if k == kind}
                    part = seeds_accuracy([{i: v for i, v in c.items() if i in ids} for c in correct],
                                          [{i: v for i, v in b.items() if i in ids} for b in base]) if ids else None
                    entry[kind] = {k: part[k] for k in ("n", "mean", "diff", "ci95")} if part else None
                out.append(entry)
    return out


def method_ranking(rows: list[dict], label: str) -> list[dict]:
    """Every pair of trained methods of a domain on one evaluation: the difference of their mean
    accuracy over seeds with the two-level bootstrap CI (:func:`kembed.stats.seeds_bootstrap_diff`)
    on the questions all their runs share; ``decided`` when the interval excludes zero.

    Reads only the rows' ``outcomes`` (:func:`eval_cell`); a method with a cell without them is
    left out (:func:`without_outcomes`).

    Returns:
        Dicts ``{"domain", "a", "b", "diff", "ci95", "decided"}`` (diff = a - b, fractions),
        ``a`` the method with the higher mean.

    Raises:
        KembedError: a cell's outcomes are malformed.
    """
    from kembed.stats import seeds_bootstrap_diff

    out = []
    for domain in dict.fromkeys(r["domain"] for r in rows):
        runs = {m: [correct for correct, _ in cells] for m, cells in _decoded(rows, domain, label).items()
                if m != "base"}
        methods = list(runs)
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                ids = sorted(set.intersection(*(set(c) for c in [*runs[a], *runs[b]])))
                x = [[c[q] for q in ids] for c in runs[a]]
                y = [[c[q] for q in ids] for c in runs[b]]
                d = seeds_bootstrap_diff(x, y)
                diff, (lo, hi) = d["diff"], d["ci95"]
                better, worse = (a, b) if diff >= 0 else (b, a)
                if diff < 0:  # name the better method first: b - a is the mirror of a - b
                    diff, lo, hi = -diff, -hi, -lo
                out.append({"domain": domain, "a": better, "b": worse, "diff": diff, "ci95": [lo, hi],
                            "decided": lo > 0 or hi < 0})
    return out


def seed_rationality(rows: list[dict], labels: list[str]) -> list[dict]:
    """Per domain and method, grounded rationality over training seeds against the base model,
    on the first evaluation whose cells carry judged scores (``grounded_scores``,
    :func:`eval_cell`): per seed the mean score, and the paired difference to the base model on
    the questions both explained with a score (each model explains only its own correct
    answers), with the two-level bootstrap over seeds and then pairs
    (:func:`kembed.stats.seeds_paired_mean`).

    Reads only the rows; a method with a cell without scores is left out.

    Returns:
        Dicts ``{"domain", "method", "evaluation", "seeds", "mean", "sd" (over seeds' mean
        scores), "base": the base model's mean score, "n": pairs per seed, "diff", "ci95"}``,
        scores in [0, 1].
    """
    from kembed.stats import seeds_paired_mean

    out = []
    for domain in dict.fromkeys(r["domain"] for r in rows):
        by_label = {label: {m: [c.get("grounded_scores") for c in cells]
                            for m, cells in _runs_by_method(rows, domain, label).items()} for label in labels}
        label = next((lb for lb, runs in by_label.items() if (runs.get("base") or [None])[0]), None)
        if label is None:
            continue
        runs = by_label[label]
        base = runs["base"][0]
        for method, seeds in runs.items():
            if method == "base" or not all(seeds):
                continue
            means = [fmean(s.values()) for s in seeds]
            paired = seeds_paired_mean([[s[i] - base[i] for i in sorted(set(s) & set(base))] for s in seeds])
            out.append({"domain": domain, "method": method, "evaluation": label, "seeds": len(seeds),
                        "mean": fmean(means), "sd": stdev(means) if len(means) > 1 else 0.0,
                        "base": fmean(base.values()), "n": paired["n"], "diff": paired["diff"], "ci95": paired["ci95"]})
    return out


def rationality_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of :func:`seed_rationality` for results.md."""
    header = ["domain", "method", "evaluation", "seeds", "mean score +- sd (base)",
              "vs base, both correct [two-level CI]", "pairs per seed"]
    body = [[e["domain"], e["method"], e["evaluation"], str(e["seeds"]),
             f"{e['mean']:.2f} +- {e['sd']:.2f} ({e['base']:.2f})",
             _ci(e, 1, 2), ", ".join(map(str, e["n"]))]
            for e in summary]
    return header, body


def seed_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of :func:`seed_summary` for results.md."""
    header = ["domain", "method", "evaluation", "seeds", "mean % +- sd", "min-max %", "vs base (pp) [two-level CI]",
              "taught: mean %, vs base (n)", "untaught: mean %, vs base (n)"]
    body = []
    for e in summary:
        parts = [f"{_pct(e[k]['mean'])}, {_ci(e[k])} ({e[k]['n']})" if e.get(k) else "-" for k in ("taught", "untaught")]
        body.append([e["domain"], e["method"], e["evaluation"], str(e["seeds"]),
                     f"{_pct(e['mean'])} +- {_pct(e['sd'])}", f"{_pct(e['min'])}-{_pct(e['max'])}", _ci(e), *parts])
    return header, body


def verdict_table(domain: str, rows: list[dict], labels: list[str], summary: list[dict],
                  judged: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one domain's verdict: a line per method over its training seeds
    (:func:`seed_summary`, :func:`seed_rationality`), after the base model's: accuracy mean +- sd
    on the first evaluation and its two-level CI against base, overall and on taught and untaught
    questions; the other evaluations' difference to base with their CI; retention (the mean over
    seeds of each run's mean change on the other domains); grounded rationality with its
    difference to base on the questions both explained; mean training seconds. Empty when no
    method of the domain has statistics over seeds.

    Reads only the rows and those summaries (percentage points, scores in [0, 1])."""
    acc = {(e["method"], e["evaluation"]): e for e in summary if e["domain"] == domain}
    rat = {e["method"]: e for e in judged if e["domain"] == domain}
    methods = list(dict.fromkeys(m for m, label in acc if label == labels[0]))
    if not methods:
        return [], []
    first = labels[0]
    header = ["method", "seeds", f"{first} % mean +- sd", "vs base (pp) [two-level CI]", "taught vs base (n)",
              "untaught vs base (n)", *(f"{label} vs base (pp)" for label in labels[1:]), "retention vs base (pp, mean)",
              "grounded rationality, vs base both correct", "training s (mean)"]
    base = next((r for r in rows if r["domain"] == domain and r["method"] is None), None)
    base_cells = (base or {}).get("evals", {})
    base_grounded = next((e["base"] for e in rat.values()), None)
    body = [["base", "-", _pct(base_cells[first]["accuracy"]) if base_cells.get(first) else "-", "-", "-", "-",
             *(f"{_pct(base_cells[label]['accuracy'])}%" if base_cells.get(label) else "-" for label in labels[1:]),
             "-", f"{base_grounded:.2f}" if base_grounded is not None else "-", "-"]]
    for method in methods:
        e = acc[(method, first)]
        runs = [r for r in rows if r["domain"] == domain and r["method"] == method]
        kept = [r["retention_mean"] for r in runs if r.get("retention_mean") is not None]
        seconds = [r["training_seconds"] for r in runs if r.get("training_seconds")]
        parts = [f"{_ci(e[k])} ({e[k]['n']})" if e.get(k) else "-" for k in ("taught", "untaught")]
        others = [_ci(acc[(method, label)]) if (method, label) in acc else "-" for label in labels[1:]]
        r = rat.get(method)
        body.append([method, str(e["seeds"]), f"{_pct(e['mean'])} +- {_pct(e['sd'])}", _ci(e), *parts, *others,
                     f"{100 * fmean(kept):+.1f}" if kept else "-",
                     f"{r['mean']:.2f}, {_ci(r, 1, 2)}" if r else "-", f"{fmean(seconds):.0f}" if seconds else "-"])
    return header, body


def across_domains_table(summary: list[dict], label: str) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the verdict at a glance: a line per method, a column per domain with
    the method's difference to the base model on evaluation ``label`` over its training seeds
    (:func:`seed_summary`: percentage points, two-level 95% CI, seeds in brackets), and the count
    of domains where that CI lies wholly above zero ("gains") or below it ("losses"). A domain a
    method has no statistics in shows "-". Empty when ``summary`` has none on ``label``."""
    acc = {(e["method"], e["domain"]): e for e in summary if e["evaluation"] == label}
    if not acc:
        return [], []
    domains = list(dict.fromkeys(d for _, d in acc))
    header = ["method", *(f"{d}: vs base (pp) [two-level CI] (seeds)" for d in domains), "domains with a gain / loss"]
    body = []
    for method in dict.fromkeys(m for m, _ in acc):
        mine = [acc.get((method, d)) for d in domains]
        gains = sum(1 for e in mine if e and e["ci95"][0] > 0)
        losses = sum(1 for e in mine if e and e["ci95"][1] < 0)
        body.append([method, *(f"{_ci(e)} ({e['seeds']})" if e else "-" for e in mine),
                     f"{gains} / {losses} of {sum(e is not None for e in mine)}"])
    return header, body


def ranking_lines(ranking: list[dict], label: str) -> list[str]:
    """results.md's paragraphs on the pairs of methods (:func:`method_ranking`) on evaluation
    ``label``: those whose two-level 95% CI clears zero, then those undecided at this scale."""
    def pair(e: dict, sign: str) -> str:
        return (f"{e['a']} {sign} {e['b']} ({e['domain']}, {100 * e['diff']:+.1f} pp "
                f"[{100 * e['ci95'][0]:+.1f}, {100 * e['ci95'][1]:+.1f}])")

    decided = [pair(e, ">") for e in ranking if e["decided"]]
    undecided = [pair(e, "vs") for e in ranking if not e["decided"]]
    lines = [f"Rankings on {label} whose two-level 95% CI clears zero: "
             + ("; ".join(decided) if decided else "none: every pair of methods is undecided at this scale"), ""]
    if decided and undecided:
        lines += ["Undecided at this scale (the CI holds zero): " + "; ".join(undecided), ""]
    return lines

