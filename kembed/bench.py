"""Benchmark suites: every method on the same data, model and evaluator, in one command.

``kembed bench SUITE`` reads ``benchmarks/<SUITE>.yaml`` (:class:`Suite`), and for each domain
scores the base model, then for each method (and seed) trains it (or reuses a finished run
whose resolved config is identical: run directories are named by a hash of that config),
evaluates it in every mode the suite lists, generates explanations for its correct
closed-book answers and judges them. Each step is a ``kembed`` subprocess whose output file
marks it done, so an interrupted bench resumes where it stopped and never redoes a finished
step; a failing step is reported, the steps that need it are skipped and the rest go on.

Finally :func:`collect` gathers one row per model (:func:`model_row`) and
:func:`write_report` writes ``results.json``, ``results.md`` and PNG plots into the suite's
results folder. :func:`comparison_rows` and the table and plot helpers serve ``kembed compare``
as well.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean, stdev
from typing import Callable

import yaml
from pydantic import Field, ValidationError

from kembed.config import Strict
from kembed.errors import ConfigError, KembedError
from kembed.tune import TuneSpec
from kembed.runs import read_jsonl, training_seconds
from kembed.tables import ConsoleTables, markdown_table

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
SCORER = "token_mean"  # the headline scorer


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


@dataclass
class Step:
    """One subprocess of a bench: ``argv()`` is built when it runs; ``done()`` says whether its
    output already exists; ``needs``: the labels of steps that must have succeeded;
    ``copies_tuning``: a test run expected to be a copy of the selected tuning run
    (:func:`_train_or_reuse`), not a training."""

    label: str
    argv: Callable[[], list[str]]
    done: Callable[[], bool] = lambda: False
    needs: list[str] = field(default_factory=list)
    copies_tuning: bool = False


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
    from kembed.data import get_domain
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
            base = ModelEntry(domain, "base", None, None, suite.model, None,
                              {s.label: out / domain / "base" / f"eval-{suite.split}-{s.label}" for s in suite.evals})
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
                    entry = ModelEntry(domain, name, method, seed, str(run), run,
                                       {s.label: run / f"eval-{suite.split}-{s.label}" for s in suite.evals},
                                       selection)
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


REUSE_CALL = "from kembed.bench import reuse_run"  # how execute tells a copy from a training step


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


def step_kind(label: str, domains: list[str]) -> str:
    """What a step does, apart from where: ``"<model>: <step>"`` without the domain and the
    seed (``"rlag: train"``, ``"base: eval closed-book-raw"``); a tuning step is its method's
    training (``"tune current-events rlag (lr x2, epochs x1): train"`` -> ``"rlag: train"``)."""
    if label.startswith("tune "):
        return label.split(" ")[2] + ": train"
    domain = _domain_of(label, domains)
    rest = label[len(domain) + 1:] if domain else label
    return re.sub(r" \(seed \d+\)", "", rest)


def recorded(results_dir: Path, out: Path, field: str = "seconds") -> dict[str, float]:
    """Step label -> its recorded ``field`` (``seconds``, or ``max_rss_mb``: the peak resident
    memory of its largest process) in this output folder (``bench-steps.jsonl``), else in the
    committed report of this suite (``results_dir``), else in the committed reports of the other
    suites beside it: what :func:`expected` extends to steps not recorded yet. Seconds are those
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


def expected(steps: list[Step], values: dict[str, float], domains: list[str], of_kind=fmean) -> dict[str, float]:
    """Label -> what each step is expected to take (seconds or MiB, :func:`recorded`): 0 for a
    copy of a tuning run (``Step.copies_tuning``), else its own recorded value (``values``, by
    label), else ``of_kind`` (the mean; :func:`expected_memory` takes the largest) of the
    recorded values of its kind (:func:`step_kind`), else, for a step that
    does not train, the mean of the same step of the other models (``eval
    retrieved-context-raft``: scoring costs about the same whatever trained the model; a
    training's cost depends on its method; a retention step, of every retention step, whatever
    domain it scores: a medical model's ``retention current-events`` before any ran), else 0."""
    kinds: dict[str, list[float]] = {}
    for label, value in values.items():
        kind = step_kind(label, domains)
        kinds.setdefault(kind, []).append(value)
        kinds.setdefault(_action(kind), []).append(value)

    def guess(label: str) -> float:
        kind = step_kind(label, domains)
        same = kinds.get(kind) or (kinds.get(_action(kind)) if _action(kind) != ": train" else None)
        if not same and _action(kind).startswith(": retention "):
            same = [v for k, vs in kinds.items() if k.startswith(": retention ") for v in vs]
        return of_kind(same or [0.0])

    return {s.label: 0.0 if s.copies_tuning else values.get(s.label, guess(s.label)) for s in steps}


def expected_memory(steps: list[Step], memory: dict[str, float], domains: list[str]) -> dict[str, float]:
    """Label -> each step's expected peak resident memory in MiB: :func:`expected` of the
    recorded peaks (``memory``, :func:`recorded` of ``max_rss_mb``) with the largest of a kind,
    not its mean, for a step not recorded itself: a peak that does not fit is an
    out-of-memory kill, not a late finish (medical's RLAG training peaked at 9.4 GB, its
    current-events trainings' mean was 8.9)."""
    return expected(steps, memory, domains, of_kind=max)


def _action(kind: str) -> str:
    """What a step of kind ``"<model>: <step>"`` (:func:`step_kind`) does, whatever the model:
    ``": <step>"`` (``": eval closed-book-raw"``, ``": train"``)."""
    return ": " + kind.split(": ", 1)[-1]


def longest_first(steps: list[Step], seconds: dict[str, float], domains: list[str]) -> list[Step]:
    """``steps`` ordered for :func:`execute` with several jobs: by the expected seconds of the
    longest chain each step starts (itself and what needs it, transitively), longest first,
    plan order among equals, so that the longest training starts early instead of running alone
    at the end. ``seconds``: recorded step times by label (:func:`recorded`, :func:`expected`).
    Needs keep their order: a step waits for them whatever its place."""
    took = expected(steps, seconds, domains)
    dependents: dict[str, list[str]] = {}
    for step in steps:
        for need in step.needs:
            dependents.setdefault(need, []).append(step.label)
    chain: dict[str, float] = {}
    for step in reversed(steps):  # a step comes after its needs in a plan
        after = [chain.get(d, 0.0) for d in dependents.get(step.label, [])]
        chain[step.label] = took[step.label] + max(after, default=0.0)
    return sorted(steps, key=lambda s: -chain[s.label])


@functools.cache  # asked at every start decision of execute and simulate; the machine's memory does not change
def physical_memory_mb() -> float:
    """This machine's physical memory, in MiB."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def memory_limit_mb() -> float:
    """90% of this machine's physical memory, in MiB: what the expected peaks of steps running
    at once may add up to (:func:`execute`)."""
    return 0.9 * physical_memory_mb()


def startable(step: Step, running: list[str], done: set[str], jobs: int, memory_mb: dict[str, float] | None,
              alone: set[str] = frozenset()) -> bool:
    """The rule by which :func:`execute` starts ``step`` now, beside the ``running`` step labels:
    every step it needs is ``done``, fewer than ``jobs`` run, and the expected peak memory
    (``memory_mb``, MiB by label; None: not checked) of it and the running ones stays within
    :func:`memory_limit_mb` (a step alone always starts); a step in ``alone`` (killed once by
    SIGKILL) starts only with nothing running, and nothing starts beside it."""
    fits = (not memory_mb or not running
            or sum(memory_mb.get(x, 0.0) for x in [step.label, *running]) <= memory_limit_mb())
    return (all(n in done for n in step.needs) and len(running) < jobs and fits
            and (step.label not in alone or not running) and not any(label in alone for label in running))


def simulate(steps: list[Step], seconds: dict[str, float], memory: dict[str, float], domains: list[str],
             jobs: int) -> float:
    """Seconds until every step has finished when :func:`execute` runs ``steps`` in list order
    with ``jobs`` jobs and each takes its expected time and memory (:func:`expected` of the
    recorded ``seconds`` and ``memory``, :func:`recorded`). A need that is not among ``steps``
    counts as done."""
    import heapq

    took, rss = expected(steps, seconds, domains), expected_memory(steps, memory, domains)
    pending, running, now = list(steps), [], 0.0
    finished = {n for s in steps for n in s.needs} - {s.label for s in steps}
    while pending or running:
        for step in list(pending):
            if startable(step, [label for _, label in running], finished, jobs, rss):
                pending.remove(step)
                heapq.heappush(running, (now + took[step.label], step.label))
        if not running:  # needs that nothing provides
            break
        now, label = heapq.heappop(running)
        finished.add(label)
    return now


def forecast(steps: list[Step], seconds: dict[str, float], memory: dict[str, float], domains: list[str],
             jobs: int, console) -> float:
    """Print what ``steps`` are expected to cost (``kembed bench --plan``): per tuning grid and
    domain the steps, their expected minutes and how many have no recorded time of their kind,
    then the wall time :func:`simulate` gives with ``jobs``. Returns that wall time in seconds."""
    from rich.table import Table

    took = expected(steps, seconds, domains)
    table = Table("steps of", "steps", "expected min", "no recorded time")
    copies = {s.label for s in steps if s.copies_tuning}  # these take no time, recorded or not
    groups: dict[str, list[str]] = {}
    for step in steps:
        groups.setdefault(_group_of(step.label, domains), []).append(step.label)
    for group, labels in groups.items():
        table.add_row(group, str(len(labels)), f"{sum(took[x] for x in labels) / 60:.0f}",
                      str(sum(x not in seconds and took[x] == 0 and x not in copies for x in labels)))
    wall = simulate(steps, seconds, memory, domains, jobs)
    console.print(table)
    console.print(f"{len(steps)} step(s) to run, {sum(took.values()) / 60:.0f} min of expected step time: about "
                  f"{wall / 60:.0f} min of wall time with --jobs {jobs}. Expected from the step times the committed "
                  "reports and this output folder recorded (of the same step, else the mean of its kind, else, "
                  "but for a training, of the same step of the other models, else 0; "
                  f"{len(copies)} test run(s) that copy their selected tuning run, 0); "
                  "they hold for the machine kind that recorded them.", highlight=False)
    return wall


def available_memory_mb() -> float:
    """The memory available to new work (``MemAvailable`` of /proc/meminfo), in MiB; infinite
    where there is no /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


MEMORY_RESERVE = 0.08  # of physical memory: below it available, execute stops the step started last


def execute(steps: list[Step], console, log_dir: Path, jobs: int = 1, on_step_end=None,
            memory_mb: dict[str, float] | None = None, available_mb=available_memory_mb) -> list[dict]:
    """Run the steps, skipping those already done and those whose needs failed.

    With ``jobs`` = 1 the steps run one after the other in order, their output on the console.
    With more, up to ``jobs`` steps run at once (each started in order as soon as
    :func:`startable` allows; :func:`longest_first` gives a good order), each with ``OMP_NUM_THREADS`` = CPU
    cores // jobs and its output in ``log_dir/logs/<step>.log``.

    ``memory_mb``: each step's expected peak resident memory (:func:`expected`); with it, a step
    does not start beside running ones while their expected peaks together would pass 90% of
    the machine's memory (the next step that fits starts instead; a step alone always starts).

    A step killed by SIGKILL (on Linux, most often the out-of-memory killer, which may pick it
    for memory that other processes hold) runs once more, alone, once the running steps have
    ended, instead of failing what needs it. Before that happens: while several steps run and
    ``available_mb()`` (MiB) falls below :data:`MEMORY_RESERVE` of the machine's memory (peaks
    differ between domains: a text-length-bound training may need more than its kind did
    elsewhere), the step started last is stopped, recorded as interrupted, and queued to run
    again alone.

    ``on_step_end()`` is called after each step that ran. Each step that ran appends
    ``{"step", "returncode", "seconds", "max_rss_mb"}`` (wall time; the peak resident memory of
    its largest process) to ``log_dir/bench-steps.jsonl``, the source of the report's time
    breakdown.

    SIGTERM, like SIGINT, interrupts the bench: the running steps get SIGTERM (SIGKILL after
    30 s), each is recorded with ``"interrupted": true`` and its exit code, and
    KeyboardInterrupt propagates. A step killed mid-way reruns next time; training resumes from
    its last finished iteration.

    Returns:
        The failures: ``{"step", "returncode"}``, or ``{"step", "blocked_by"}`` for a step skipped
        because a step it needs failed.

    Raises:
        KeyboardInterrupt: on SIGINT or SIGTERM, once the running steps have stopped.
    """
    import os
    import re
    import signal
    import threading

    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        (log_dir / "logs").mkdir(parents=True, exist_ok=True)
    failed: set[str] = set()
    succeeded: set[str] = set()
    failures: list[dict] = []
    pending = list(enumerate(steps, 1))
    number = {step.label: i for i, step in pending}
    running: dict[str, tuple] = {}
    alone: set[str] = set()  # steps killed once (SIGKILL), to run again with nothing beside them
    start = time.time()

    def reap(proc, block: bool) -> tuple[int, float] | None:
        """(exit code, peak RSS in MiB) of an ended step; None while it runs."""
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage.ru_maxrss / 1024  # Linux: KiB

    def finish(step: Step, rc: int, rss_mb: float, seconds: float, copied: bool = False,
               interrupted: bool = False) -> None:
        with open(log_dir / "bench-steps.jsonl", "a") as f:
            f.write(json.dumps({"step": step.label, "returncode": rc, "seconds": round(seconds, 1),
                                "max_rss_mb": round(rss_mb), **({"copied": True} if copied else {}),
                                **({"interrupted": True} if interrupted else {})}) + "\n")
        if interrupted:
            return
        if on_step_end is not None:
            on_step_end()
        if rc == 0:
            succeeded.add(step.label)
            return
        if rc == -signal.SIGKILL and step.label not in alone:
            alone.add(step.label)
            pending.insert(0, (number[step.label], step))
            console.print(f"[yellow]killed[/] {step.label} (SIGKILL: out of memory?); it runs again alone")
            return
        failed.add(step.label)
        failures.append({"step": step.label, "returncode": rc})
        console.print(f"[red]failed[/] {step.label} (exit {rc}); going on with the rest")

    def stop(label: str) -> int:
        """SIGTERM to a running step (SIGKILL after 30 s), recorded as interrupted with its peak
        so far; returns its exit code."""
        proc, step, log, began, copied = running.pop(label)
        os.kill(proc.pid, signal.SIGTERM)  # not Popen.terminate: its poll() would reap the step, and its peak with it
        deadline = time.time() + 30
        while (result := reap(proc, block=False)) is None and time.time() < deadline:
            time.sleep(0.1)
        if result is None:
            os.kill(proc.pid, signal.SIGKILL)
            result = reap(proc, block=True)
        if log is not None:
            log.close()
        finish(step, *result, seconds=time.time() - began, copied=copied, interrupted=True)
        return result[0]

    def stop_running() -> None:
        for proc, *_ in running.values():
            os.kill(proc.pid, signal.SIGTERM)  # all at once; stop() waits for each
        for label in list(running):
            rc = stop(label)
            console.print(f"[yellow]stopped[/] {label} (exit {rc}); it runs again next time", highlight=False)

    def preempt_if_memory_short() -> None:
        """With several steps running and less than :data:`MEMORY_RESERVE` of the machine's
        memory available, stop the step started last (SIGTERM: a training resumes from its last
        checkpoint) and queue it to run again alone, before the out-of-memory killer picks
        one."""
        if len(running) < 2 or available_mb() >= MEMORY_RESERVE * physical_memory_mb():
            return
        label = max(running, key=lambda x: running[x][3])
        step = running[label][1]
        stop(label)
        alone.add(label)
        pending.insert(0, (number[label], step))
        console.print(f"[yellow]stopped[/] {label}: memory short ({available_mb():.0f} MiB available); "
                      "it runs again alone", highlight=False)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        while pending or running:
            before = len(pending)
            for item in list(pending):
                i, step = item
                head = f"[bold]bench {i}/{len(steps)}[/] {step.label}"
                blocked = [n for n in step.needs if n in failed]
                if blocked:
                    pending.remove(item)
                    failed.add(step.label)
                    failures.append({"step": step.label, "blocked_by": blocked[0]})
                    console.print(f"{head}: [yellow]skipped[/] ({blocked[0]} failed)")
                elif startable(step, list(running), succeeded, jobs, memory_mb, alone):
                    pending.remove(item)
                    if step.done():
                        succeeded.add(step.label)
                        console.print(f"{head}: done before", highlight=False)
                        continue
                    console.print(f"{head} ({time.time() - start:.0f}s elapsed)", highlight=False)
                    began = time.time()
                    argv = step.argv()
                    copied = REUSE_CALL in " ".join(argv)
                    if jobs == 1:  # its output on the console
                        running[step.label] = (proc := subprocess.Popen(argv), step, None, began, copied)
                        result = reap(proc, block=True)
                        del running[step.label]
                        finish(step, *result, seconds=time.time() - began, copied=copied)
                        break  # in order: look at the next step only now
                    log = open(log_dir / "logs" / (re.sub(r"[^A-Za-z0-9._-]+", "-", step.label).strip("-") + ".log"), "a")
                    running[step.label] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env),
                                           step, log, began, copied)
                elif jobs == 1:
                    break
            ended = False
            for label, (proc, step, log, began, copied) in list(running.items()):
                result = reap(proc, block=False)
                if result is not None:
                    ended = True
                    log.close()
                    del running[label]
                    console.print(f"finished {label} (exit {result[0]}, {time.time() - start:.0f}s elapsed)",
                                  highlight=False)
                    finish(step, *result, seconds=time.time() - began, copied=copied)
            if running:
                preempt_if_memory_short()
                time.sleep(1)
            elif pending and len(pending) == before and not ended:  # needs no step provides: those never start
                stuck = [item for item in pending if any(n not in succeeded for n in item[1].needs)]
                for item in stuck:
                    pending.remove(item)
                    failed.add(item[1].label)
                    failures.append({"step": item[1].label, "blocked_by": next(n for n in item[1].needs if n not in succeeded)})
                if not stuck:
                    break
    except KeyboardInterrupt:
        stop_running()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return failures


# ---------------------------------------------------------------------------------------------
# results


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
            number of ids, or letters outside ``01`` / ``tun.``.
    """
    o = cell.get("outcomes")
    if not o:
        return None
    ids, correct, knowledge = o.get("ids"), o.get("correct"), o.get("knowledge")
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


def _p(p: float) -> str:
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
            line.append(f"{100 * v['diff']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}], {_p(v['p_value'])}"
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
    """PNG plots: accuracy with 95% CI bars per model and evaluation (one panel per domain),
    accuracy vs training time, and grounded rationality vs accuracy. Returns the files written
    (none without rows: a report written while only the tuning grid has run)."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    files = []

    fig, axes = plt.subplots(1, len(domains), figsize=(max(6, 1.2 * len(rows) / len(domains) * len(labels)) * len(domains), 4),
                             squeeze=False)
    for ax, domain in zip(axes[0], domains):
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

    def scatter(xkey: Callable[[dict], float | None], ykey: Callable[[dict], float | None], xlabel, ylabel, name):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in rows:
            x, y = xkey(r), ykey(r)
            if x is None or y is None:
                continue
            ax.scatter([x], [y])
            ax.annotate(r["name"] if len(domains) == 1 else f"{r['name']} ({r['domain']})", (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
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


STEP_KINDS = {"train": "training", "eval": "scoring", "explain": "generation", "judge": "judging",
              "retention": "retention"}


def time_breakdown(records: list[dict]) -> list[dict]:
    """Wall seconds and peak memory per model and kind of step, from ``bench-steps.jsonl``
    records (:func:`execute`): ``tuning`` (a method's grid), ``training`` (RLAG's sampling
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
        groups.setdefault(_group_of(label, domains), []).append(label.split(": ")[0])
    return "; ".join(f"{g}: {len(labels)} step(s) of {len(set(labels))} "
                     f"{'configuration' if g == 'tuning' else 'model'}(s)" for g, labels in groups.items())


def _group_of(label: str, domains: list[str]) -> str:
    """``"tuning"`` for a step of a tuning grid, else the step's domain (``"other"`` if none)."""
    return "tuning" if label.startswith("tune ") else _domain_of(label, domains) or "other"


def _domain_of(label: str, domains: list[str]) -> str | None:
    """The domain a step label (``"<domain> <model>: <step>"``) belongs to; None for a tuning
    step or another label."""
    return next((d for d in domains if label.startswith(f"{d} ")), None)


def carry_over(suite: Suite, earlier: Path, rows: list[dict], invocations: list[dict], step_times: list[dict],
               failures: list[dict], pending: list[str] | None, planned: set[tuple[str, str]] = frozenset()) -> dict:
    """Merge what an earlier report of the suite (``earlier``, its committed ``results.json``)
    holds with what this bench's output folder gave, so that invocations one domain at a time,
    each on a fresh machine whose output folder is gone by the next, add up to one report.

    A domain of the suite with no row in ``rows`` but rows in ``earlier`` is carried over: its
    rows, each marked ``carried_from: {"commit", "date"}`` (of the earlier report, or the mark it
    already had), its step records (``bench-steps.jsonl`` records, when this output folder has
    none of that domain), failures and pending steps. A domain with rows in both keeps this
    folder's rows, plus the earlier rows of finished trained models (:func:`finished_models`)
    that this folder lacks and this plan has (``planned``: ``(domain, name)``; the models
    :func:`run_suite` did not train again), with their step records: a domain too long for one
    session adds up model by model. When anything is carried over, the earlier report's
    invocations that this folder's log lacks (by ``started``) are kept, each with its ``commit``
    (the earlier report's when it has none), and so are its tuning step records when no
    invocation is shared (another output folder), or when they were carried over already; when
    nothing is, the earlier report is superseded and none of it counts. Carried rows are read
    as they are: their folders are never opened.

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

    stepped = {_domain_of(str(s.get("step", "")), suite.domains) for s in step_times}

    def carried_step(label: str, record: dict) -> bool:
        if label.startswith("tune "):  # the grid ran in another output folder, or was carried already
            return not shared or bool(record.get("carried_from"))
        if label.startswith(tuple(models)):  # a carried model of a domain run here
            return True
        domain = _domain_of(label, suite.domains)
        return domain in domains and domain not in stepped

    merged["steps"] = [*step_times, *({**s, "carried_from": s.get("carried_from") or stamp}
                                      for s in old.get("steps") or [] if carried_step(str(s.get("step", "")), s))]
    merged["failures"] = [*failures, *({**f, "carried_from": f.get("carried_from") or stamp}
                                       for f in old.get("failures") or []
                                       if _domain_of(str(f.get("step", "")), suite.domains) in domains)]
    waiting = [p for p in old.get("pending") or [] if _domain_of(p, suite.domains) in domains]
    merged["pending"] = [*(pending or []), *waiting] if waiting else pending
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
    """The parsed earlier ``results.json`` at ``path``; ``{}`` when it is missing, not an object
    or, unless ``strict``, unreadable.

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
    return old if isinstance(old, dict) else {}


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
    otherwise take a line each)."""
    blocks: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k == "outcomes" and isinstance(v, dict):
                    blocks.append(json.dumps(v, ensure_ascii=False))
                    out[k] = f"\0outcomes-{len(blocks) - 1}\0"
                else:
                    out[k] = walk(v)
            return out
        return [walk(v) for v in x] if isinstance(x, list) else x

    text = json.dumps(walk(obj), indent=2, ensure_ascii=False)
    return re.sub(r'"\\u0000outcomes-(\d+)\\u0000"', lambda m: blocks[int(m.group(1))], text) + "\n"


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


def write_report(suite: Suite, rows: list[dict], failures: list[dict], results_dir: Path, invocations: list[dict],
                 step_times: list[dict] | None = None, pending: list[str] | None = None,
                 tuning: dict[str, dict] | None = None) -> Path:
    """``results.json``, ``results.md`` and the plots of a suite into ``results_dir``;
    ``step_times``: the ``bench-steps.jsonl`` records, for the time breakdown; ``pending``: the
    labels of steps not finished yet (a report written while the bench is incomplete);
    ``tuning``: the grids (:func:`tuning_section`).

    ``results.json`` holds: ``suite``, ``description``, ``command``, ``date``, ``commit`` and
    ``machine`` of this report; ``invocations`` (every bench invocation's record: ``started``,
    ``seconds``, ``domains``, ``jobs``, ``steps_run``, ``finished`` and, in records written since
    they carry them, ``commit``, ``command`` and ``machine``) and ``bench_seconds``, their
    total; ``rows`` (:func:`model_row`: per model its cells, :func:`eval_cell`, whose
    ``outcomes`` give every question's correctness and knowledge class in compact form,
    :func:`outcomes`; a row carried over from an earlier report, :func:`carry_over`, has
    ``carried_from: {"commit", "date"}`` and a ``folder`` that need not exist); ``carried``
    (domain -> that mark); ``over_seeds`` (:func:`seed_summary`), ``ranking``
    (:func:`method_ranking`) and ``rationality_over_seeds`` (:func:`seed_rationality`), from the
    rows' outcomes and judged scores alone; ``without_outcomes``
    (:func:`without_outcomes`: cells these leave out); ``tuning`` (:func:`tuning_section`: every
    configuration's validation score, the ids it was scored on, and the selection); ``steps``
    and ``time_breakdown``;
    ``scorer``, ``failures``, ``pending``. Nothing here reads an
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
             "and McNemar's exact p",
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
        significant = [f"{r['name']} ({label}: {100 * c['vs_reference']['diff']:+.1f} pp, p = {_p(c['vs_reference']['p_value'])})"
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
    expected to cost and the wall time with ``jobs`` (:func:`forecast`), and returns ``(None, [])``.

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

    from kembed.runs import cpu_model, write_atomic

    console = console or Console()
    steps, models = plan(suite, out, seeds, data_dir, earlier_tuning(results_dir / "results.json", suite))
    if domains:
        unknown = [d for d in domains if d not in suite.domains]
        if unknown:
            raise ConfigError(f"suite {suite.name}: --domains {', '.join(unknown)} not in its domains "
                              f"({', '.join(suite.domains)})")
        steps = [s for s in steps if s.label.startswith("tune ") or any(s.label.startswith(f"{d} ") for d in domains)]
    if methods:
        unknown = [m for m in methods if m not in suite.methods]
        if unknown:
            raise ConfigError(f"suite {suite.name}: --methods {', '.join(unknown)} not in its methods "
                              f"({', '.join(suite.methods)})")
        steps = only_methods(steps, methods, suite.domains)
    here = {(m.domain, m.name) for m in models if m.run is not None and m.run.exists()}  # resumed in out
    steps = skip_finished(steps, finished_models(earlier_report(results_dir / "results.json"), suite) - here)
    seconds, memory = recorded(results_dir, out), recorded(results_dir, out, "max_rss_mb")
    if jobs > 1:
        steps = longest_first(steps, seconds, suite.domains)
    log = out / "bench-invocations.jsonl"
    if plan_only or report_only:
        done = {s.label for s in steps if s.done()}
        # a judge step has no done check (every invocation re-runs it, cheaply, from its cache): it
        # counts as pending while the explanations it judges are
        pending = [s for s in steps if s.label not in done
                   and not (": judge " in s.label and all(n in done for n in s.needs))]
    if plan_only:
        forecast(pending, seconds, memory, suite.domains, jobs, console)
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
