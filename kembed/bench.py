"""Benchmark suites: every method on the same data, model and evaluator, in one command.

``kembed bench SUITE`` reads ``benchmarks/<SUITE>.yaml`` (:class:`Suite`), and for each domain
scores the base model, then for each method (and seed) trains it (or reuses a finished run
whose resolved config is identical: run directories are named by a hash of that config),
evaluates it in every mode the suite lists, generates explanations for its correct
closed-book answers and judges them. Each step is a ``kembed`` subprocess whose output file
marks it done, so an interrupted bench resumes where it stopped and never redoes a finished
step; a failing step is reported, the steps that need it are skipped and the rest go on.

Steps run through :mod:`kembed.schedule` (several at once within the machine's memory); the
rows, statistics, tables and plots of the report come from :mod:`kembed.results`, and
:func:`write_report` writes ``results.json``, ``results.md`` and PNG plots into the suite's
results folder.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import yaml
from pydantic import Field, ValidationError

from kembed.config import Strict
from kembed.errors import ConfigError, KembedError
from kembed.tune import TuneSpec
from kembed.results import (SCORER, ModelEntry, across_domains_table, format_p, collect, console_tables, method_ranking,
                            plot, ranking_lines, rationality_table, seed_rationality, seed_summary, seed_table,
                            table_cells, verdict_table, without_outcomes)
from kembed.runs import read_jsonl
from kembed.schedule import (REUSE_CALL, Step, domain_of, group_of, execute, expected_memory, forecast,
                             longest_first, step_kind)
from kembed.tables import markdown_table

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


class EvalSpec(Strict):
    """One evaluation of every model: mode, scoring format and (retrieved-context) index and k;
    ``explain``: generate and judge explanations of its correct answers."""

    mode: str = "closed-book"
    format: str = "raw"
    index: str = "bm25"
    top_k: int = Field(3, ge=1)
    explain: bool = False

    @property
    def label(self) -> str:
        """Folder name and column label, e.g. ``closed-book-raw`` or ``retrieved-context-chat``."""
        return f"{self.mode}-{self.format}"


class Suite(Strict):
    """A benchmark suite (YAML in ``benchmarks/``).

    Attributes:
        name: the suite's name (its results folder).
        description: one line for the report.
        model: the base model (the recipes' model; its row is the reference of every paired test).
        domains, methods: what to train and score.
        recipes: method -> recipe name or file (default ``recipes/<method>.yaml``).
        overrides: method -> ``key=value`` recipe overrides; ``all`` applies to every method.
        seeds: training seeds (default: each recipe's own seed).
        split, eval_limit: the evaluated split and, optionally, its first N questions.
        eval_sample: score a seeded random N (seed 0) of a domain's split when it has more than
            N questions, the same N for every model (evaluation folders ``eval-<split>-sample<N>-*``):
            what keeps a domain with a large split (medical: 1272 test questions, 8 times the
            others') within a suite's time; a smaller split is scored whole.
        evals: the evaluations of every model.
        explain_max_new_tokens: explanation length budget (tokens).
        judges: judges of the explanations (``grounded``; ``rubric`` needs ``judge_model`` or
            ``judge_url``).
        judge_model, judge_url, judge_name, judge_key_env: the language-model judge (a local
            model; or an endpoint, the model name it serves, and the variable holding its key).
        tune: the tuning grid every method gets before it trains for test (:class:`TuneSpec`).
        domain_seeds: domain -> its training seeds, instead of ``seeds`` (e.g. three seeds on
            the tuning domain, one elsewhere).
        launch: an accelerate config file (e.g. ``accelerate/ddp.yaml``): every training step
            runs under ``accelerate launch --config_file <it>``.
        retention, retention_domains: score every trained model closed-book (raw) on a seeded
            sample of this many test questions of each other domain of ``retention_domains``,
            against the base model on the same questions: what injecting one domain cost the
            others.
    """

    name: str
    description: str = ""
    model: str = "smollm2-135m-instruct"
    domains: list[str]
    methods: list[str]
    recipes: dict[str, str] = {}
    overrides: dict[str, list[str]] = {}
    seeds: list[int] | None = None
    split: str = "test"
    eval_limit: int | None = Field(None, ge=1)
    eval_sample: int | None = Field(None, ge=1)
    evals: list[EvalSpec] = [EvalSpec(explain=True)]
    explain_max_new_tokens: int = Field(96, ge=1)
    judges: list[str] = ["grounded"]
    judge_model: str | None = None
    judge_url: str | None = None
    judge_name: str | None = None
    judge_key_env: str | None = None
    tune: TuneSpec | None = None
    retention: int | None = Field(None, ge=1)
    domain_seeds: dict[str, list[int]] = {}
    launch: str | None = None
    retention_domains: list[str] = ["medical", "legal", "astronomy", "current-events"]


def load_suite(name: str) -> Suite:
    """A suite by name (``benchmarks/<name>.yaml``) or path.

    Raises:
        ConfigError: no such suite, invalid YAML or invalid fields.
    """
    path = Path(name)
    if not path.is_file():
        path = BENCH_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BENCH_DIR.glob("*.yaml")))
        raise ConfigError(f"no benchmark suite '{name}' (known: {known})")
    try:
        return Suite.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def config_hash(resolved: dict) -> str:
    """8 hex digits identifying a resolved run config (where the data lives is left out)."""
    canonical = {k: v for k, v in resolved.items() if k != "data_dir"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:8]


def _finished(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and '"event": "end"' in metrics.read_text()


def _explained(folder: Path) -> bool:
    """The evaluation in ``folder`` was explained, and every correct answer has its explanation."""
    samples, results = folder / "samples.jsonl", folder / "results.json"
    if not samples.is_file() or not results.is_file() or "explanations" not in json.loads(results.read_text()):
        return False
    rows = read_jsonl(samples)
    return all("explanation" in r for r in rows if r["correct"][SCORER])


def plan(suite: Suite, out: Path, seeds: int | None = None, data_dir: str | None = None,
         carried_tuning: dict[str, dict] | None = None) -> tuple[list[Step], list[ModelEntry]]:
    """The steps of a suite and the models they produce.

    Args:
        out: where runs and evaluations go (``out/<domain>/<method>-s<seed>-<config hash>/``,
            ``out/<domain>/base/``).
        seeds: train this many seeds per method (the recipe's seed and the next ones),
            overriding the suite's ``seeds``.
        carried_tuning: method -> a tuning selection an earlier report holds (:func:`earlier_tuning`);
            a method whose grid it matches (same ``grid`` key: recipe, overrides, tuning
            block) is not tuned again, so that a later session trains the selected
            configuration without re-running the grid.

    Raises:
        ConfigError: (one line, naming the suite) an unknown domain, or one without the suite's
            split; an unknown method; a missing recipe; an invalid override or recipe value; a
            recipe whose model is not the suite's; an override that sets ``domain``. All are
            checked before anything runs or is written.
    """
    from kembed.data import get_domain, load_records
    from kembed.train import prepare_config

    kembed = [sys.executable, "-m", "kembed.cli"]
    trainer = train_command(suite.launch)
    data = ["--data-dir", data_dir] if data_dir else []
    steps: list[Step] = []
    models: list[ModelEntry] = []

    def add_model_steps(entry: ModelEntry, needs: list[str]) -> None:
        for spec in suite.evals:
            folder = entry.evals[spec.label]
            argv = [*kembed, "eval", "--domain", entry.domain, "--model", entry.model, "--split", suite.split,
                    "--mode", spec.mode, "--format", spec.format, "--output", str(folder), "--overwrite", *data]
            if spec.mode == "retrieved-context":
                argv += ["--index", spec.index, "--top-k", str(spec.top_k)]
            if suite.eval_limit is not None:
                argv += ["--limit", str(suite.eval_limit)]
            argv += sample_args(entry.domain)
            label = f"{entry.domain} {entry.name}: eval {spec.label}"
            steps.append(Step(label, lambda a=argv: a, lambda f=folder: (f / "results.json").is_file(), needs))
            if not spec.explain:
                continue
            steps.append(Step(f"{entry.domain} {entry.name}: explain {spec.label}",
                              lambda f=folder: [*kembed, "explain", str(f), "--max-new-tokens",
                                                str(suite.explain_max_new_tokens), *data],
                              lambda f=folder: _explained(f), [label]))
            for judge in suite.judges:
                argv = [*kembed, "judge", str(folder), "--judge", judge, *data]
                if judge != "grounded":
                    argv += (["--judge-model", suite.judge_model] if suite.judge_model else []) + \
                            (["--judge-url", suite.judge_url, "--judge-name", suite.judge_name or ""]
                             if suite.judge_url else []) + \
                            (["--judge-key-env", suite.judge_key_env] if suite.judge_key_env else [])
                steps.append(Step(f"{entry.domain} {entry.name}: judge {judge} {spec.label}", lambda a=argv: a,
                                  needs=[f"{entry.domain} {entry.name}: explain {spec.label}"]))

    def add_retention_steps(entry: ModelEntry, needs: list[str]) -> None:
        for other in suite.retention_domains if suite.retention else []:
            if other == entry.domain:
                continue
            folder = (entry.run / f"retention-{other}" if entry.run
                      else out / "retention" / other / "base")
            entry.retention[other] = folder
            label = f"{entry.domain} {entry.name}: retention {other}"
            if entry.run is None and any(s.label.endswith(f"base: retention {other}") for s in steps):
                continue  # the base model is scored once per domain
            argv = [*kembed, "eval", "--domain", other, "--model", entry.model, "--split", "test", "--mode",
                    "closed-book", "--format", "raw", "--sample", str(suite.retention), "--output", str(folder),
                    "--overwrite", *data]
            steps.append(Step(label, lambda a=argv: a, lambda f=folder: (f / "results.json").is_file(), needs))

    sizes: dict[str, int] = {}

    def sample_args(domain: str) -> list[str]:
        """``--sample N`` when the suite samples and ``domain``'s split has more than N questions."""
        if suite.eval_sample is None:
            return []
        if domain not in sizes:
            sizes[domain] = len(load_records(domain, suite.split, data_dir))
        return ["--sample", str(suite.eval_sample), "--sample-seed", "0"] if sizes[domain] > suite.eval_sample else []

    def eval_folders(parent: Path, domain: str) -> dict[str, Path]:
        split = f"{suite.split}-sample{suite.eval_sample}" if sample_args(domain) else suite.split
        return {s.label: parent / f"eval-{split}-{s.label}" for s in suite.evals}

    def check_domain(name: str) -> None:
        split = get_domain(name, data_dir).splits
        if suite.split not in split:
            raise ConfigError(f"domain '{name}' has no split '{suite.split}' (it has {', '.join(split)})")

    tunings: dict = {}

    def add_tune_steps(method: str, overrides: list[str]):
        """The grid's training steps of ``method``; returns its selection (None without a
        ``tune:`` block)."""
        if suite.tune is None:
            return None
        check_domain(suite.tune.domain or suite.domains[0])
        tune, selection = tune_steps(method, suite.recipes.get(method), overrides, suite.tune,
                                     suite.tune.domain or suite.domains[0], out / "tune", data_dir, suite.launch,
                                     (carried_tuning or {}).get(method))
        steps.extend(tune)
        return selection

    try:  # every domain, method, recipe and override is checked here, before any step runs
        for domain in suite.domains + (suite.retention_domains if suite.retention else []):
            check_domain(domain)
        for domain in suite.domains:
            base = ModelEntry(domain, "base", None, None, suite.model, None, eval_folders(out / domain / "base", domain))
            models.append(base)
            add_model_steps(base, [])
            add_retention_steps(base, [])
            for method in suite.methods:
                overrides = [*suite.overrides.get("all", []), *suite.overrides.get(method, [])]
                run_cfg, _, _ = prepare_config(method, suite.recipes.get(method), overrides, domain=domain,
                                               data_dir=data_dir)
                if run_cfg.model != suite.model:
                    raise ConfigError(f"the {method} recipe trains {run_cfg.model}, not the suite's base model {suite.model}")
                if run_cfg.domain != domain:
                    raise ConfigError(f"the {method} overrides set domain={run_cfg.domain}; list domains under 'domains'")
                method_seeds = (list(range(run_cfg.seed, run_cfg.seed + seeds)) if seeds
                                else suite.domain_seeds.get(domain) or suite.seeds or [run_cfg.seed])
                selection = tunings[method] = tunings.get(method) or add_tune_steps(method, overrides)
                for seed in method_seeds:
                    seeded = [*overrides, f"seed={seed}"]
                    _, _, resolved = prepare_config(method, suite.recipes.get(method), seeded, domain=domain,
                                                    data_dir=data_dir)
                    tuned = f"-tuned{config_hash(suite.tune.model_dump())}" if selection else ""
                    run = out / domain / f"{method}-s{seed}-{config_hash(resolved)}{tuned}"
                    name = method if len(method_seeds) == 1 else f"{method} (seed {seed})"
                    argv = [*trainer, "train", method, "--domain", domain, "--output", str(run), *data]
                    if method in suite.recipes:
                        argv += ["--recipe", suite.recipes[method]]
                    label = f"{domain} {name}: train"
                    steps.append(Step(label, lambda a=argv, r=run, o=seeded, t=selection, m=method, d=domain:
                                      _train_or_reuse(a, r, o, t, m, suite.recipes.get(m), d, data_dir),
                                      lambda r=run: _finished(r), needs=selection.needs if selection else [],
                                      copies_tuning=bool(selection) and domain == selection.domain
                                      and selection.copied_by(seeded)))
                    entry = ModelEntry(domain, name, method, seed, str(run), run, eval_folders(run, domain), selection)
                    models.append(entry)
                    add_model_steps(entry, [label])
                    add_retention_steps(entry, [label])
    except KembedError as e:
        raise ConfigError(f"suite {suite.name}: {e}") from None
    return steps, models


def _with_overrides(seeded: list[str], overrides: list[str]) -> list[str]:
    """A test run's overrides with a tuning configuration's: ``seeded`` ends with ``seed=``, which stays last."""
    return [*seeded[:-1], *overrides, seeded[-1]]


def _train_or_reuse(argv: list[str], run: Path, seeded: list[str], selection, method: str, recipe: str | None,
                    domain: str, data_dir: str | None) -> list[str]:
    """A test run's command: resume it; else copy the selected tuning run when that trained
    this very configuration (:func:`reuse_run`); else train with the selection's overrides
    (``seeded`` ends with the ``seed=`` override, which stays last)."""
    if (run / "kembed-run.json").is_file():
        return [*argv, "--resume"]
    final = _with_overrides(seeded, selection()["overrides"] if selection else [])
    if selection:
        from kembed.train import prepare_config

        _, _, resolved = prepare_config(method, recipe, final, domain=domain, data_dir=data_dir)
        source = selection.reusable(resolved)
        if source is not None and not run.exists():
            return [sys.executable, "-c", f"{REUSE_CALL}; reuse_run({str(source)!r}, {str(run)!r})"]
    return [*argv, *final]


def train_command(launch: str | None = None) -> list[str]:
    """The command line that runs ``kembed`` training: in this Python, or under ``accelerate
    launch --config_file <launch>`` (an accelerate config file).

    Raises:
        ConfigError: ``launch`` is not a file.
    """
    if launch is None:
        return [sys.executable, "-m", "kembed.cli"]
    path = Path(launch) if Path(launch).is_file() else BENCH_DIR.parent / launch
    if not path.is_file():
        raise ConfigError(f"launch: no accelerate config file {launch}")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "-m", "kembed.cli"]


def tune_steps(method: str, recipe: str | None, overrides: list[str], spec: TuneSpec, domain: str, out: Path,
               data_dir: str | None = None, launch: str | None = None,
               earlier: dict | None = None) -> tuple[list[Step], Callable[[], dict]]:
    """The training steps of ``method``'s tuning grid (:func:`kembed.tune.grid`) on ``domain``,
    each run in ``out/<domain>/<method>-<config hash>/``, and the function that selects among
    them once they ran (:func:`kembed.tune.select`).

    The function's attributes: ``needs`` (the steps' labels), ``grid`` (a hash of what decides
    the selection: the method's resolved configuration, the tuning block and the domain) and
    ``points()`` (label -> the configuration's score, :func:`kembed.tune.run_score`, or None
    while it has none). ``earlier``, ``{"grid", "points": {label: score}}`` from a committed
    report (:func:`earlier_tuning`), supplies the scores of configurations an earlier session
    finished when its ``grid`` is this one and ``out`` has no run of (a run in ``out`` counts
    first, even one a report written meanwhile holds): those are not trained again, so that a
    grid too long for one session adds up configuration by configuration. Their scores keep
    their ``carried_from`` mark, which the selection's ``scores`` entries repeat.

    Raises:
        ConfigError, KembedError: the recipe, an override or a grid point is invalid.
    """
    from kembed.train import prepare_config
    from kembed.tune import grid, run_score, select, tune_overrides

    kembed = train_command(launch)
    _, _, resolved = prepare_config(method, recipe, overrides, domain=domain, data_dir=data_dir)
    key = config_hash({"resolved": resolved, "tune": spec.model_dump(), "domain": domain})
    earlier = earlier or {}
    carried = (earlier.get("points") or {}) if earlier.get("grid") == key else {}
    points, runs, steps, configs = grid(method, resolved, spec), [], [], {}
    for point in points:
        cfg = [*overrides, *point.overrides, *tune_overrides()]
        _, _, point_resolved = prepare_config(method, recipe, cfg, domain=domain, data_dir=data_dir)
        configs[point.label] = point_resolved
        run = out / domain / f"{method}-{config_hash(point_resolved)}"
        if point.label in carried and not run.is_dir():  # a run in this output folder counts first
            runs.append(None)
            continue
        argv = [*kembed, "train", method, "--domain", domain, "--output", str(run), *cfg,
                *(["--data-dir", data_dir] if data_dir else []), *(["--recipe", recipe] if recipe else [])]
        steps.append(Step(f"tune {domain} {method} ({point.label}): train",
                          lambda a=argv, r=run: [*a, "--resume"] if (r / "kembed-run.json").is_file() else a,
                          lambda r=run: _finished(r)))
        runs.append(run)

    def scored() -> dict[str, dict | None]:
        # a run cut off mid-way has validation scores of its early iterations: not a score of its configuration
        return {p.label: carried[p.label] if r is None else run_score(r, spec.selection) if _finished(r) else None
                for p, r in zip(points, runs)}

    def selection() -> dict:
        scores = scored()
        result = select(points, [scores[p.label] for p in points])
        for s in result["scores"]:
            if (scores[s["label"]] or {}).get("carried_from"):
                s["carried_from"] = scores[s["label"]]["carried_from"]
        return {"method": method, "domain": domain, "grid": key, **result}

    def reusable(test_resolved: dict) -> Path | None:
        """The selected configuration's finished run in ``out`` when a test run of
        ``test_resolved`` would train exactly it (same resolved configuration: the tuning
        domain and the recipe's seed), else None."""
        chosen = selection()["selected"]
        run = runs[[p.label for p in points].index(chosen)]
        same = configs[chosen] == test_resolved
        return run if same and run is not None and _finished(run) else None

    def copied_by(seeded: list[str]) -> bool:
        """Whether a test run of ``seeded`` (overrides ending with ``seed=``) will copy the
        selected run whichever point is selected: every point's run is in ``out`` and the test
        run of its overrides resolves to its configuration (what :func:`_train_or_reuse` checks)."""
        return all(run is not None for run in runs) and all(
            prepare_config(method, recipe, _with_overrides(seeded, p.overrides), domain=domain,
                           data_dir=data_dir)[2] == configs[p.label] for p in points)

    selection.needs, selection.grid, selection.domain, selection.points = [s.label for s in steps], key, domain, scored
    selection.reusable, selection.copied_by = reusable, copied_by
    return steps, selection


def reuse_run(source: str, target: str) -> None:
    """Make ``target`` a copy of the finished run ``source`` and record where it came from in
    ``target/reused-from.json``. Weight files (``*.safetensors``, ``*.bin``) are hard-linked
    where the file system allows (they are never written again), everything else is copied.
    A test run whose resolved configuration is the selected tuning run's trains the same
    weights (CPT's and SFT's did, byte for byte, in the cpu suite: docs/evaluation.md), so the
    bench copies them instead of training again.

    Raises:
        OSError: ``target`` exists and is not empty, or the copy fails.
    """
    import os
    import shutil

    def link_or_copy(a: str, b: str) -> None:
        if Path(a).suffix in (".safetensors", ".bin"):
            try:
                return os.link(a, b)
            except OSError:  # another file system, or none with hard links
                pass
        shutil.copy2(a, b)

    tmp = Path(f"{target}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link_or_copy)
    (tmp / "reused-from.json").write_text(json.dumps({"run": str(source)}) + "\n")
    tmp.rename(target)


def tuning_section(models: list[ModelEntry]) -> dict[str, dict]:
    """Method -> ``{"domain", "grid", "points": {label: score or None}, "selection"}``: every
    tuned method's grid as far as it has run (configurations carried over from an earlier report
    included, :func:`tune_steps`) and its selection among the scored configurations
    (:func:`kembed.tune.select`; None while none is scored). ``results.json`` keeps it as
    ``tuning``, which a later session reads back (:func:`earlier_tuning`)."""
    out = {}
    for m in models:
        if m.tuning is None or m.method in out:
            continue
        try:
            selection = m.tuning()
        except KembedError:  # no configuration of the grid finished yet
            selection = None
        out[m.method] = {"domain": m.tuning.domain, "grid": m.tuning.grid, "points": m.tuning.points(),
                         "selection": selection}
    return out


def recorded(results_dir: Path, out: Path, field: str = "seconds") -> dict[str, float]:
    """Step label -> its recorded ``field`` (``seconds``, or ``max_rss_mb``: the peak resident
    memory of its largest process) in this output folder (``bench-steps.jsonl``), else in the
    committed report of this suite (``results_dir``), else in the committed reports of the other
    suites beside it: what :func:`kembed.schedule.expected` extends to steps not recorded yet. Seconds are those
    of a step that succeeded (the first found); a peak is the largest of every run of the step
    in the first source that has one, finished or not (an interrupted or killed step's peak is
    a lower bound of what it needs). A step that copied a tuning run (:func:`reuse_run`) is
    left out."""
    found: dict[str, float] = {}
    reports = [results_dir / "results.json",
               *sorted(p for p in results_dir.parent.glob("*/results.json") if p.parent != results_dir)]
    for records in [read_jsonl(out / "bench-steps.jsonl", missing_ok=True),
                    *((earlier_report(p).get("steps") or []) for p in reports)]:
        here: dict[str, float] = {}
        for r in records:
            if (isinstance(r, dict) and isinstance(r.get(field), (int, float)) and r[field] > 0
                    and (r.get("returncode") == 0 or field == "max_rss_mb")
                    and not r.get("copied")):  # a copied tuning run (reuse_run) says nothing of training
                label, value = str(r.get("step")), float(r[field])
                if field == "max_rss_mb":
                    here[label] = max(here.get(label, 0.0), value)
                else:
                    here.setdefault(label, value)
        for label, value in here.items():
            found.setdefault(label, value)
    return found


STEP_KINDS = {"train": "training", "eval": "scoring", "explain": "generation", "judge": "judging",
              "retention": "retention"}


def time_breakdown(records: list[dict]) -> list[dict]:
    """Wall seconds and peak memory per model and kind of step, from ``bench-steps.jsonl``
    records (:func:`kembed.schedule.execute`): ``tuning`` (a method's grid), ``training`` (RLAG's sampling
    included), ``scoring``, ``generation`` (explanations), ``judging`` and ``retention``; a step
    that ran in several invocations counts each time.

    Returns:
        Dicts ``{"model": "<domain> <name>" or "<method> (tuning)", <kind>: seconds, ...,
        "max_rss_mb"}`` in first-seen order.
    """
    out: dict[str, dict] = {}
    for r in records:
        label = r["step"]
        if label.startswith("tune "):
            model, kind = label.split(" (")[0].split(" ", 2)[2] + " (tuning)", "tuning"
        else:
            model, _, rest = label.partition(": ")
            kind = STEP_KINDS.get(rest.split(" ")[0], "other")
        row = out.setdefault(model, {"model": model, "max_rss_mb": 0})
        row[kind] = round(row.get(kind, 0) + r["seconds"], 1)
        row["max_rss_mb"] = max(row["max_rss_mb"], r.get("max_rss_mb") or 0)
    return list(out.values())


def breakdown_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of :func:`time_breakdown` for results.md (seconds; MiB)."""
    kinds = ["tuning", *STEP_KINDS.values()]
    kinds = [k for k in kinds if any(k in r for r in rows)]
    header = ["model", *(f"{k} s" for k in kinds), "total s", "peak MiB"]
    body = [[r["model"], *(f"{r[k]:.0f}" if k in r else "-" for k in kinds),
             f"{sum(r.get(k, 0) for k in kinds):.0f}", str(r["max_rss_mb"])] for r in rows]
    return header, body


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes outside
    ``benchmarks/results/``, which the report itself rewrites), if in git."""
    root = BENCH_DIR.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def pending_summary(pending: list[str], domains: list[str], most: int = 12) -> str:
    """The labels of steps not finished yet, for results.md: all of them when there are at most
    ``most``, else counted per tuning grid and domain (``results.json`` keeps every label)."""
    if len(pending) <= most:
        return "; ".join(pending)
    groups: dict[str, list[str]] = {}
    for label in pending:
        groups.setdefault(group_of(label, domains), []).append(label.split(": ")[0])
    return "; ".join(f"{g}: {len(labels)} step(s) of {len(set(labels))} "
                     f"{'configuration' if g == 'tuning' else 'model'}(s)" for g, labels in groups.items())


def carry_over(suite: Suite, earlier: Path, rows: list[dict], invocations: list[dict], step_times: list[dict],
               failures: list[dict], pending: list[str] | None, planned: set[tuple[str, str]] = frozenset()) -> dict:
    """Merge what an earlier report of the suite (``earlier``, its committed ``results.json``)
    holds with what this bench's output folder gave, so that invocations one domain at a time,
    each on a fresh machine whose output folder is gone by the next, add up to one report.

    A domain of the suite with no row in ``rows`` but rows in ``earlier`` is carried over: its
    rows, each marked ``carried_from: {"commit", "date"}`` (of the earlier report, or the mark it
    already had), its step records (``bench-steps.jsonl`` records, when this output folder has
    none of that domain), failures and pending steps (in place of this plan's steps of it). A
    domain with rows in both keeps this folder's rows, plus the earlier rows of finished trained
    models (:func:`finished_models`) that this folder lacks and this plan has (``planned``:
    ``(domain, name)``; the models :func:`run_suite` did not train again), with their step
    records: a domain too long for one session adds up model by model. When anything is carried
    over, the earlier report's invocations that this folder's log lacks (by ``started``) are kept,
    each with its ``commit`` (the earlier report's when it has none), and so are its tuning step
    records when no invocation is shared (another output folder), or when they were carried over
    already; when nothing is, the earlier report is superseded and none of it counts. Carried rows
    are read as they are: their folders are never opened.

    Returns:
        ``{"rows", "invocations", "steps", "failures", "pending", "domains": {domain: carried_from},
        "ignored": None or why ``earlier`` was not used}``; rows in the suite's domain order,
        invocations by start time.

    Raises:
        KembedError: ``earlier`` is not valid JSON, or a row in it lacks ``domain`` or ``evals``.
    """
    merged = {"rows": rows, "invocations": invocations, "steps": step_times, "failures": failures,
              "pending": pending, "domains": {}, "ignored": None}
    if not earlier.is_file():
        return merged
    old = earlier_report(earlier, strict=True)
    if old.get("suite") != suite.name:
        merged["ignored"] = f"{earlier} is not a report of suite {suite.name}; nothing carried over from it"
        return merged
    for i, r in enumerate(old.get("rows") or []):
        if not isinstance(r, dict) or not isinstance(r.get("domain"), str) or not isinstance(r.get("evals"), dict):
            raise KembedError(f"{earlier}: rows[{i}]: expected an object with 'domain' and 'evals'")
    stamp = {"commit": old.get("commit"), "date": old.get("date")}
    present, present_rows = {r["domain"] for r in rows}, {(r["domain"], r["name"]) for r in rows}
    complete = finished_models(old, suite)
    carried = [{**r, "carried_from": r.get("carried_from") or stamp} for r in old.get("rows") or []
               if r["domain"] in suite.domains and (r["domain"] not in present
                                                    or (r["domain"], r.get("name")) in
                                                    (complete & set(planned)) - present_rows)]
    domains = {r["domain"]: r["carried_from"] for r in reversed(carried) if r["domain"] not in present}
    models = {f"{r['domain']} {r['name']}: " for r in carried if r["domain"] in present}
    order = {d: i for i, d in enumerate(suite.domains)}
    merged["rows"] = sorted([*rows, *carried], key=lambda r: order.get(r["domain"], len(order)))
    merged["domains"] = {d: domains[d] for d in suite.domains if d in domains}

    if not carried:  # the earlier report is superseded: none of its rows, invocations or steps count
        return merged
    started = {i.get("started") for i in invocations}
    before = old.get("invocations") or []
    shared = any(i.get("started") in started for i in before)
    kept = [{**i, "commit": i.get("commit") or old.get("commit")} for i in before if i.get("started") not in started]
    merged["invocations"] = sorted([*kept, *invocations], key=lambda i: i.get("started") or "")

    stepped = {domain_of(str(s.get("step", "")), suite.domains) for s in step_times}

    def carried_step(label: str, record: dict) -> bool:
        if label.startswith("tune "):  # the grid ran in another output folder, or was carried already
            return not shared or bool(record.get("carried_from"))
        if label.startswith(tuple(models)):  # a carried model of a domain run here
            return True
        domain = domain_of(label, suite.domains)
        return domain in domains and domain not in stepped

    merged["steps"] = [*step_times, *({**s, "carried_from": s.get("carried_from") or stamp}
                                      for s in old.get("steps") or [] if carried_step(str(s.get("step", "")), s))]
    merged["failures"] = [*failures, *({**f, "carried_from": f.get("carried_from") or stamp}
                                       for f in old.get("failures") or []
                                       if domain_of(str(f.get("step", "")), suite.domains) in domains)]
    # a carried domain's pending steps are those of the report it comes from: this plan lists
    # its base model's evaluations too (the base is evaluated afresh), which its rows already hold
    here = [p for p in pending or [] if domain_of(p, suite.domains) not in domains]
    waiting = [p for p in old.get("pending") or [] if domain_of(p, suite.domains) in domains]
    merged["pending"] = list(dict.fromkeys([*here, *waiting])) if pending is not None or waiting else None
    return merged


def finished_models(report: dict, suite: Suite) -> set[tuple[str, str]]:
    """``(domain, name)`` of the trained models an earlier report of ``suite`` (its parsed
    ``results.json``) holds complete: every evaluation of the suite with its per-question
    outcomes, retention when the suite scores it, and no step of the model pending or failed.
    A later invocation carries such a model's row over and does not run its steps again
    (:func:`run_suite`, :func:`carry_over`); the base model is always evaluated afresh."""
    if report.get("suite") != suite.name:
        return set()
    labels = [e.label for e in suite.evals]
    open_steps = [*(report.get("pending") or []), *(str(f.get("step", "")) for f in report.get("failures") or [])]
    out = set()
    for r in report.get("rows") or []:
        if not isinstance(r, dict) or not r.get("method") or r.get("domain") not in suite.domains:
            continue
        prefix = f"{r['domain']} {r.get('name')}: "
        evals = r.get("evals") or {}
        if (all((evals.get(label) or {}).get("outcomes") for label in labels)
                and (not suite.retention or (r.get("retention") and all(r["retention"].values())))
                and not any(step.startswith(prefix) for step in open_steps)):
            out.add((r["domain"], r["name"]))
    return out


def only_domains(steps: list[Step], domains: list[str]) -> list[Step]:
    """``steps`` of ``domains`` (``kembed bench --domains``), the tuning steps, and the base
    model's retention samples that those domains' models are compared against: the base model
    scores each retention domain once, under the first domain's base (:func:`plan`, e.g.
    ``current-events base: retention legal``), so a domain run alone in a fresh output folder
    would otherwise find no base score to subtract. In their order."""
    def wanted(label: str) -> bool:
        scored = label.partition(" base: retention ")[2]
        return (label.startswith("tune ") or any(label.startswith(f"{d} ") for d in domains)
                or (bool(scored) and any(d != scored for d in domains)))
    return [s for s in steps if wanted(s.label)]


def in_domain_order(steps: list[Step], domains: list[str], suite_domains: list[str]) -> list[Step]:
    """``steps`` with each listed domain's steps before the next one's (``kembed bench --domains
    legal,astronomy``; a stable sort, so the order within a domain stays). With several jobs a
    slot that the first domain leaves free (its next step waits for a training or for memory)
    takes a later domain's step, so the domains finish in the order listed: what a bench that
    cannot finish in one session needs for whole models to carry over. Steps of no listed domain
    (tuning, the base model's retention samples, which those domains' models need) come first."""
    rank = {d: i for i, d in enumerate(domains)}
    return sorted(steps, key=lambda s: rank.get(domain_of(s.label, suite_domains) or "", -1))


def only_methods(steps: list[Step], methods: list[str], domains: list[str]) -> list[Step]:
    """``steps`` of the base model and of ``methods`` (``kembed bench --methods``), with every
    step they need, transitively (their tuning grids), in their order."""
    keep = {s.label for s in steps if not s.label.startswith("tune ")
            and step_kind(s.label, domains).split(":")[0] in {"base", *methods}}
    needs = {s.label: s.needs for s in steps}
    todo = list(keep)
    while todo:
        for need in needs.get(todo.pop(), []):
            if need not in keep:
                keep.add(need)
                todo.append(need)
    return [s for s in steps if s.label in keep]


def skip_finished(steps: list[Step], finished: set[tuple[str, str]]) -> list[Step]:
    """``steps`` without those of the ``finished`` models (:func:`finished_models`: their rows
    are carried over, :func:`carry_over`), and without the tuning steps that no remaining step
    needs."""
    prefixes = tuple(f"{d} {n}: " for d, n in finished)
    steps = [s for s in steps if not s.label.startswith(prefixes)] if prefixes else steps
    needed = {n for s in steps for n in s.needs}
    return [s for s in steps if not s.label.startswith("tune ") or s.label in needed]


def earlier_report(path: Path, strict: bool = False) -> dict:
    """The parsed earlier ``results.json`` at ``path``, its shared id lists put back into the
    cells (:func:`_shared_ids`); ``{}`` when it is missing, not an object or, unless ``strict``,
    unreadable.

    Raises:
        KembedError: (``strict``) the file is not valid JSON: :func:`carry_over` reports it when
            it writes the report, while planning reads it leniently.
    """
    try:
        old = json.loads(path.read_text())
    except OSError:
        return {}
    except json.JSONDecodeError as e:
        if strict:
            raise KembedError(f"{path}: invalid JSON at line {e.lineno}: {e.msg} (fix or move it to write the "
                              "report)") from None
        return {}
    return _shared_ids(old) if isinstance(old, dict) else {}


def earlier_tuning(earlier: Path, suite: Suite) -> dict[str, dict]:
    """Method -> ``{"grid", "points": {label: score}}``: the tuning configurations a committed
    report of ``suite`` (``earlier``, its ``results.json``, section ``tuning``) holds scored,
    each score marked ``carried_from: {"commit", "date"}`` (the report's, or the mark it already
    had), for :func:`plan` to reuse when the grid is the same (its ``grid`` key). A configuration
    without a score (not run yet, or failed) is left out and runs again; so is everything when
    the file is missing, unreadable or of another suite."""
    old = earlier_report(earlier)
    if old.get("suite") != suite.name or not isinstance(old.get("tuning"), dict):
        return {}
    stamp = {"commit": old.get("commit"), "date": old.get("date")}
    fields = {"score", "n", "ids", "correct", "validation"}
    out = {}
    for method, t in old["tuning"].items():
        if not isinstance(t, dict) or not t.get("grid") or not isinstance(t.get("points"), dict):
            continue
        points = {label: {**s, "carried_from": s.get("carried_from") or stamp} for label, s in t["points"].items()
                  if isinstance(s, dict) and fields <= s.keys() and s["score"] is not None}
        if points:
            out[method] = {"grid": t["grid"], "points": points}
    return out


def _results_json(obj: dict) -> str:
    """``obj`` as indented JSON with each ``outcomes`` object on one line (its ids would
    otherwise take a line each). An id list is written once, in the top-level ``question_ids``
    (``{"ids-0": [ids], ...}``), and each ``outcomes`` names it in ``ids``: every model of a domain
    is scored on the same questions, so the lists repeat, and they were most of the file.
    :func:`earlier_report` puts the lists back."""
    blocks: list[str] = []
    shared: dict[tuple, str] = {}

    def walk(x):
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k == "outcomes" and isinstance(v, dict):
                    if isinstance(v.get("ids"), list):
                        v = {**v, "ids": shared.setdefault(tuple(v["ids"]), f"ids-{len(shared)}")}
                    blocks.append(json.dumps(v, ensure_ascii=False))
                    out[k] = f"\0block-{len(blocks) - 1}\0"
                else:
                    out[k] = walk(v)
            return out
        return [walk(v) for v in x] if isinstance(x, list) else x

    tree = walk(obj)
    for ids, name in shared.items():
        blocks.append(json.dumps(list(ids), ensure_ascii=False))
        tree.setdefault("question_ids", {})[name] = f"\0block-{len(blocks) - 1}\0"
    text = json.dumps(tree, indent=2, ensure_ascii=False)
    return re.sub(r'"\\u0000block-(\d+)\\u0000"', lambda m: blocks[int(m.group(1))], text) + "\n"


def _shared_ids(report: dict) -> dict:
    """``report`` (a parsed results.json) with every ``outcomes`` ``ids`` that names a list of
    its ``question_ids`` (:func:`_results_json`) replaced by that list, and ``question_ids``
    dropped; a name the table lacks stays, for :func:`kembed.results.cell_outcomes` to report."""
    table = report.pop("question_ids", None)
    if not isinstance(table, dict):
        return report

    def walk(x):
        if isinstance(x, dict):
            o = x.get("outcomes")
            if isinstance(o, dict) and isinstance(o.get("ids"), str) and isinstance(table.get(o["ids"]), list):
                o["ids"] = list(table[o["ids"]])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(report)
    return report


def _questions_per_domain(rows: list[dict], label: str | None) -> str:
    """``"; questions per domain: medical 300, ..."``: the n of each domain's base model on the
    first evaluation (``label``), or ``""`` where no base row is scored."""
    n = {r["domain"]: r["evals"][label]["n"] for r in rows
         if r["name"] == "base" and label and (r.get("evals") or {}).get(label)}
    return "; questions per domain: " + ", ".join(f"{d} {k}" for d, k in n.items()) if n else ""


def write_report(suite: Suite, rows: list[dict], failures: list[dict], results_dir: Path, invocations: list[dict],
                 step_times: list[dict] | None = None, pending: list[str] | None = None,
                 tuning: dict[str, dict] | None = None) -> Path:
    """``results.json``, ``results.md`` and the plots of a suite into ``results_dir``;
    ``step_times``: the ``bench-steps.jsonl`` records, for the time breakdown; ``pending``: the
    labels of steps not finished yet (a report written while the bench is incomplete);
    ``tuning``: the grids (:func:`tuning_section`).

    ``results.json`` holds: ``suite``, ``description``, ``command``, ``date``, ``commit`` and ``machine`` of
    this report; ``invocations`` (every bench invocation's record: ``started``, ``seconds``, ``domains``,
    ``jobs``, ``steps_run``, ``finished`` and, in records written since they carry them, ``commit``, ``command``
    and ``machine``) and ``bench_seconds``, their total; ``rows`` (:func:`kembed.results.model_row`: per model
    its cells, :func:`kembed.results.eval_cell`, whose ``outcomes`` give every question's correctness and
    knowledge class in compact form, :func:`kembed.results.outcomes`; a row carried over from an earlier report,
    :func:`carry_over`, has ``carried_from: {"commit", "date"}`` and a ``folder`` that need not exist);
    ``carried`` (domain -> that mark); ``over_seeds`` (:func:`kembed.results.seed_summary`), ``ranking``
    (:func:`kembed.results.method_ranking`) and ``rationality_over_seeds``
    (:func:`kembed.results.seed_rationality`), from the rows' outcomes and judged scores alone;
    ``without_outcomes`` (:func:`kembed.results.without_outcomes`: cells these leave out); ``tuning``
    (:func:`tuning_section`: every configuration's validation score, the ids it was scored on, and the
    selection); ``steps`` and ``time_breakdown``; ``scorer``, ``failures``, ``pending``. Nothing here reads an
    evaluation folder: a report can be written from rows alone."""
    from kembed.runs import cpu_model, write_atomic

    labels = [s.label for s in suite.evals]
    results_dir.mkdir(parents=True, exist_ok=True)
    carried = {r["domain"]: r["carried_from"] for r in reversed(rows) if r.get("carried_from")}
    carried = {d: carried[d] for d in dict.fromkeys(r["domain"] for r in rows) if d in carried}
    meta = {"suite": suite.name, "description": suite.description, "command": f"kembed bench {suite.name}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "machine": f"{cpu_model()} ({platform.machine()}), {__import__('os').cpu_count()} CPU cores, {platform.system()}",
            "bench_seconds": round(sum(i.get("seconds") or 0 for i in invocations), 1), "invocations": invocations,
            "scorer": SCORER, "failures": failures, "pending": pending or [], "carried": carried}
    summary, ranking = seed_summary(rows, labels), method_ranking(rows, labels[0])
    judged = seed_rationality(rows, labels)
    missing = without_outcomes(rows, labels)
    times = time_breakdown(step_times or [])
    write_atomic(results_dir / "results.json", _results_json(
        {**meta, "tuning": tuning or {}, "rows": rows, "over_seeds": summary, "ranking": ranking,
         "rationality_over_seeds": judged,
         "without_outcomes": missing,
         "steps": step_times or [], "time_breakdown": times}))
    plots = plot(rows, labels, results_dir)
    commits = list(dict.fromkeys(i["commit"] for i in invocations if i.get("commit")))
    lines = [f"# Benchmark suite `{suite.name}`", "", suite.description, "",
             f"- command: `{meta['command']}` (`make bench` for the quick suite: `--jobs 2`); "
             f"{len(invocations)} invocation(s) ({sum(not i.get('finished', True) for i in invocations)} interrupted "
             f"or still running when this report was written), {meta['bench_seconds'] / 60:.0f} min of bench wall "
             "time in all"
             + (f"; the invocations ran at commit(s) {', '.join(commits)}" if commits else ""),
             f"- date: {meta['date']}; commit: {meta['commit']}; machine: {meta['machine']}",
             f"- accuracy: `{SCORER}` option scoring on the {suite.split} split; 95% CIs bootstrap over questions; "
             "\"vs base\": the paired difference to the base model on the same questions (paired bootstrap 95% CI) "
             "and McNemar's exact p"
             + (f"; a split with more than {suite.eval_sample} questions is scored on a seeded random "
                f"{suite.eval_sample} of them, the same for every model" if suite.eval_sample else "")
             + _questions_per_domain(rows, labels[0] if labels else None),
             "- rationality: the `grounded` judge (no language model) on the explanations of correctly answered "
             "closed-book questions; mean score in [0, 1] over judged explanations; unable-to-explain share with "
             "its Wilson 95% CI",
             "- these intervals cover the choice of questions, not variation between training seeds "
             + ("(the section Over training seeds covers both)" if any(e["seeds"] > 1 for e in summary) else
                "(`kembed bench SUITE --seeds K` trains K seeds per method)")]
    if carried:
        lines.append("- carried over from earlier invocations (their runs are not in this bench's output folder; "
                     "rows as the earlier report gave them): "
                     + "; ".join(f"{d} (report of commit {m.get('commit')}, {m.get('date')})"
                                 for d, m in carried.items()))
    if pending:
        lines.append(f"- **partial**: {len(pending)} step(s) not finished yet, so the models they train or score "
                     f"are missing or incomplete below: {pending_summary(pending, suite.domains)}")
    lines.append("")
    verdicts = [(d, verdict_table(d, rows, labels, summary, judged)) for d in dict.fromkeys(r["domain"] for r in rows)]
    if any(body for _, (_, body) in verdicts):
        lines += ["## Verdict", "", "Per domain, each method over its training seeds against the base model: "
                  "differences in percentage points with two-level bootstrap 95% CIs that resample seeds, then "
                  "questions (the base row gives its own accuracy; the sections below give each run alone). A "
                  "difference whose CI holds zero is undecided at this scale.", ""]
        if len({d for d, (_, b) in verdicts if b}) > 1:
            lines += ["### Across domains", "", f"{labels[0]}: each method's difference to the base model per domain; "
                      "the last column counts the domains where its CI lies wholly above zero (gain) or below it "
                      "(loss).", "", markdown_table(*across_domains_table(summary, labels[0])), ""]
        for domain, (header, body) in verdicts:
            if body:
                lines += [f"### {domain}", "", markdown_table(header, body), ""]
    if tuning:
        from kembed.tune import summary_lines

        first = next(iter(tuning.values()))
        lines += ["## Tuning", "", f"Every method's grid (learning rate x {suite.tune.lr_scales}, epochs x "
                  f"{suite.tune.epoch_scales}) trained on {first['domain']} with the recipe's seed and scored "
                  f"closed-book on the validation split held out of the train split "
                  f"({suite.tune.selection}); test is never read. Each method's selected configuration is "
                  "what it trains for test, in every domain and seed. A configuration carried over was scored "
                  "by an earlier invocation of the same grid and not trained again.", ""]
        for method, t in tuning.items():
            if t["selection"] is None:
                lines += [f"### {method}", "", f"No configuration of {len(t['points'])} scored yet.", ""]
            else:
                lines += summary_lines(method, t["selection"])
    for domain in dict.fromkeys(r["domain"] for r in rows):
        header, body = table_cells([r for r in rows if r["domain"] == domain], labels)
        mark = carried.get(domain)
        whole = all(r.get("carried_from") for r in rows if r["domain"] == domain)
        heading = f"## {domain}" + (f" ({'' if whole else 'models marked '}carried over: commit "
                                    f"{mark.get('commit')}, {mark.get('date')})" if mark else "")
        lines += [heading, "", markdown_table(header, body), ""]
        significant = [f"{r['name']} ({label}: {100 * c['vs_reference']['diff']:+.1f} pp, "
                       f"p = {format_p(c['vs_reference']['p_value'])})"
                       for r in rows if r["domain"] == domain for label, c in r["evals"].items()
                       if c and c.get("vs_reference") and c["vs_reference"]["p_value"] < 0.05]
        lines += ["Differences to base significant at p < 0.05 (McNemar, paired): "
                  + ("; ".join(significant) if significant else "none"), ""]
    if summary:
        lines += ["## Over training seeds", "",
                  "Mean accuracy over each method's training seeds (the data sample is the same for every seed "
                  "and method); \"vs base\": the difference to the base model with a two-level bootstrap 95% CI "
                  "that resamples seeds, then questions. Taught: test questions whose gold answer is in the "
                  "training records' knowledge snippets; untaught: in their own snippets, none trained on.", "",
                  markdown_table(*seed_table(summary)), ""]
    if judged:
        lines += ["Grounded rationality over training seeds: each seed's mean score over its judged explanations "
                  "(of its correct answers), and the paired difference to the base model on the questions both "
                  "explained, with a two-level bootstrap 95% CI that resamples seeds, then those questions.", "",
                  markdown_table(*rationality_table(judged)), ""]
    if missing:
        lines += ["Left out of the statistics over seeds and the rankings: cells carried over from a results.json "
                  "written before cells kept their per-question outcomes (re-run those domains to include them): "
                  + "; ".join(missing), ""]
    if ranking:
        lines += ranking_lines(ranking, labels[0])
    if times:
        lines += ["## Where the time goes", "", "Wall seconds of the bench's steps per model (as run here, with "
                  "the step's threads; a step run again after an interruption counts again) and the peak resident "
                  "memory of a step's largest process"
                  + ("; a carried-over domain's steps as its own invocation ran them." if carried else "."),
                  "", markdown_table(*breakdown_table(times)), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if failures:
        lines += ["## Failures", ""] + [f"- {f['step']}: " + (f"exit {f['returncode']}" if "returncode" in f
                                                          else f"skipped, {f['blocked_by']} failed")
                                     + (" (carried over)" if f.get("carried_from") else "") for f in failures]
    write_atomic(results_dir / "results.md", "\n".join(lines) + "\n")
    return results_dir / "results.md"


def run_suite(suite: Suite, *, out: Path, results_dir: Path, seeds: int | None = None, data_dir: str | None = None,
              jobs: int = 1, console=None, domains: list[str] | None = None, methods: list[str] | None = None,
              report_only: bool = False, plan_only: bool = False) -> tuple[Path | None, list[dict]]:
    """Plan, execute and report a suite; returns ``(results.md, failures)``.

    ``report_only`` runs nothing and records no invocation: the report covers what has finished
    in ``out`` (another invocation may still be running) and lists the steps not finished yet.
    ``plan_only`` runs and writes nothing: it prints the steps still to run, what they are
    expected to cost and the wall time with ``jobs`` (:func:`kembed.schedule.forecast`), and returns ``(None, [])``.

    Steps of trained models that the existing ``results_dir/results.json`` holds finished
    (:func:`finished_models`) and ``out`` has no run of are not run again (a fresh machine):
    their rows are carried over, and a tuning
    selection of the same grid is reused (:func:`earlier_tuning`).

    ``domains`` runs only those domains' steps (and the tuning grid they need); the report
    still covers every domain with results in ``out``, and every other domain of the suite that
    the existing ``results_dir/results.json`` has rows of (:func:`carry_over`: rows, step times,
    invocations), so that invocations one domain at a time merge into one results.json and
    results.md even when each runs on a fresh machine with an empty ``out``. ``methods``
    likewise runs only the base model's steps and those methods' (:func:`only_methods`), for
    example to evaluate the models already trained before training the next.

    Every invocation keeps a record in ``out/bench-invocations.jsonl`` (start, wall seconds so
    far, steps run, whether it finished, its commit, command line and machine), updated after
    each step and when SIGINT or SIGTERM interrupts it (``"interrupted": true``; then
    KeyboardInterrupt propagates), so that the report states the total over resumed invocations.
    """
    import os

    from rich.console import Console

    from kembed.data import load_records
    from kembed.runs import cpu_model, write_atomic

    console = console or Console()
    steps, models = plan(suite, out, seeds, data_dir, earlier_tuning(results_dir / "results.json", suite))
    if domains:
        unknown = [d for d in domains if d not in suite.domains]
        if unknown:
            raise ConfigError(f"suite {suite.name}: --domains {', '.join(unknown)} not in its domains "
                              f"({', '.join(suite.domains)})")
        steps = only_domains(steps, domains)
    if methods:
        unknown = [m for m in methods if m not in suite.methods]
        if unknown:
            raise ConfigError(f"suite {suite.name}: --methods {', '.join(unknown)} not in its methods "
                              f"({', '.join(suite.methods)})")
        steps = only_methods(steps, methods, suite.domains)
    here = {(m.domain, m.name) for m in models if m.run is not None and m.run.exists()}  # resumed in out
    steps = skip_finished(steps, finished_models(earlier_report(results_dir / "results.json"), suite) - here)
    seconds, memory = recorded(results_dir, out), recorded(results_dir, out, "max_rss_mb")
    try:  # what each evaluation of a domain scores, for the expected times (unscaled without every domain's data)
        questions = {d: min(n, suite.eval_sample or n)
                     for d in suite.domains for n in [len(load_records(d, suite.split, data_dir))]}
    except KembedError:
        questions = None
    if jobs > 1:
        steps = longest_first(steps, seconds, suite.domains, questions)
    if domains:
        steps = in_domain_order(steps, domains, suite.domains)
    log = out / "bench-invocations.jsonl"
    if plan_only or report_only:
        done = {s.label for s in steps if s.done()}
        # a judge step has no done check (every invocation re-runs it, cheaply, from its cache): it
        # counts as pending while the explanations it judges are
        pending = [s for s in steps if s.label not in done
                   and not (": judge " in s.label and all(n in done for n in s.needs))]
    if plan_only:
        forecast(pending, seconds, memory, suite.domains, jobs, console, questions)
        return None, []
    if report_only:
        pending = [s.label for s in pending]
        invocations = read_jsonl(log, missing_ok=True)
        return _report(suite, models, out, results_dir, invocations, [], pending, console), []
    out.mkdir(parents=True, exist_ok=True)
    earlier = log.read_text().splitlines() if log.is_file() else []
    start = time.time()
    command = " ".join([f"kembed bench {suite.name}", *([f"--domains {','.join(domains)}"] if domains else []),
                        *([f"--methods {','.join(methods)}"] if methods else []),
                        *([f"--seeds {seeds}"] if seeds else []), *([f"--jobs {jobs}"] if jobs > 1 else [])])
    record = {"started": datetime.fromtimestamp(start, timezone.utc).isoformat(timespec="seconds"), "jobs": jobs,
              "domains": domains or suite.domains, "seconds": 0.0, "steps_run": 0, "finished": False,
              "commit": git_commit(), "command": command,
              "machine": f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} CPU cores"}

    def save(step_ran: bool = True) -> None:
        record["seconds"] = round(time.time() - start, 1)
        record["steps_run"] += step_ran
        write_atomic(log, "\n".join([*earlier, json.dumps(record)]) + "\n")

    save(False)
    try:
        failures = execute(steps, console, out, jobs, on_step_end=save,
                           memory_mb=expected_memory(steps, memory, suite.domains) if jobs > 1 else None)
    except KeyboardInterrupt:  # the running steps have stopped (execute): the record gets the time up to now
        record["interrupted"] = True
        save(False)
        raise
    record["finished"] = True
    save(False)
    invocations = read_jsonl(log)
    return _report(suite, models, out, results_dir, invocations, failures, None, console), failures


def _report(suite: Suite, models, out: Path, results_dir: Path, invocations: list[dict], failures: list[dict],
            pending: list[str] | None, console) -> Path:
    """Collect what has finished in ``out``, carry over the other domains of the existing
    ``results_dir/results.json`` (:func:`carry_over`), write the report and print its tables."""
    rows = [r for r in collect(models) if any(r["evals"].values())]  # domains not run yet are left out
    step_times = read_jsonl(out / "bench-steps.jsonl", missing_ok=True)
    merged = carry_over(suite, results_dir / "results.json", rows, invocations, step_times, failures, pending,
                        {(m.domain, m.name) for m in models})
    if merged["ignored"]:
        console.print(f"[yellow]note[/] {merged['ignored']}")
    for domain, mark in merged["domains"].items():
        console.print(f"{domain}: carried over from the earlier report (commit {mark.get('commit')}, "
                      f"{mark.get('date')})", highlight=False)
    rows = merged["rows"]
    report = write_report(suite, rows, merged["failures"], results_dir, merged["invocations"], merged["steps"],
                          merged["pending"], tuning_section(models))
    labels = [s.label for s in suite.evals]
    for domain in dict.fromkeys(r["domain"] for r in rows):
        console.print(console_tables([r for r in rows if r["domain"] == domain], labels, f"{suite.name}: {domain}"))
    return report
