"""``kembed train``: recipe -> run directory -> model -> method -> saved model, for any method.

This is the one place that loads data and models, places them, seeds, shows progress and
writes the run directory; methods receive a ``TrainContext`` and never do these themselves.

Launched as N processes (``accelerate launch`` or ``torchrun``), every rank runs the same code:
the main one alone writes the run directory (see :mod:`kembed.runs`) and prints, training is
data-parallel with ``train.batch_size`` as the global batch, and dev accuracy is scored on a
share of the questions per rank (:mod:`kembed.distributed`).
"""

from __future__ import annotations

import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kembed import distributed
from kembed.config import RunConfig, apply_overrides, dump_config, load_recipe_dict, recipe_path, resolve_config
from kembed.errors import KembedError
from kembed.models import Placement
from kembed.records import QARecord
from kembed.runs import Run, environment, write_json


@dataclass
class TrainContext:
    """What a method's ``train`` receives.

    Attributes:
        run: the run directory (``run.state`` says how far an interrupted run got).
        config: the method-independent recipe fields.
        method_config: the method's own recipe section, validated.
        placement: device and precision.
        model, tokenizer: the policy (already resumed from ``run/model`` when resuming).
        records: the training records (a seeded sample of the train split: ``limit`` of them,
            the validation records held out; see :func:`kembed.data.training_sample`).
        dev_records: the records of ``config.eval.split`` for accuracy after each iteration
            (the held-out validation records by default).
        console: where to print.
        progress: the run's rich progress display.
    """

    run: Run
    config: RunConfig
    method_config: BaseModel
    placement: Placement
    model: object
    tokenizer: object
    records: list[QARecord]
    dev_records: list[QARecord] = field(default_factory=list)
    console: Console = field(default_factory=Console)
    progress: Progress | None = None
    _knowledge_logged: int = field(default=-1, repr=False)

    @contextmanager
    def task(self, description: str, total: int):
        """A progress bar for ``total`` units of work; yields the function that advances it."""
        task_id = self.progress.add_task(description, total=total)
        try:
            yield lambda n=1: self.progress.advance(task_id, n)
        finally:
            self.progress.remove_task(task_id)

    def knowledge_documents(self) -> list[str]:
        """The domain text this run may read (``config.knowledge``), and the record of it in
        ``metrics.jsonl`` (a ``knowledge`` event: setting, documents, their sha256).

        ``records``: the unique knowledge snippets of the training records, in first-seen
        order; ``knowledge-base``: :func:`kembed.retrieval.domain_documents`.

        Raises:
            KembedError: no documents (a ``records`` sample without snippets, or an empty
                knowledge base).
        """
        from kembed.retrieval import documents_sha256, domain_documents

        if self.config.knowledge == "knowledge-base":
            documents = domain_documents(self.config.domain, self.config.data_dir)
        else:
            documents = list(dict.fromkeys(z.strip() for r in self.records for z in r.knowledge if z.strip()))
        if not documents:
            raise KembedError(f"knowledge={self.config.knowledge}: the {len(self.records)} training records of "
                              f"{self.config.domain} carry no knowledge snippets to read")
        if self._knowledge_logged != len(documents):
            self.run.log("knowledge", setting=self.config.knowledge, documents=len(documents),
                         sha256=documents_sha256(documents))
            self._knowledge_logged = len(documents)
        return documents

    def knowledge_index(self, kind: str):
        """A retrieval index (:func:`kembed.retrieval.build_index`) over
        :meth:`knowledge_documents`: what RAFT's retrieved distractors and SimRAG's round-trip
        filter search."""
        from kembed.retrieval import build_index

        return build_index(self.config.domain, kind, self.config.data_dir, documents=self.knowledge_documents())

    def fit(self, examples: list[dict], collate, loss_fn, *, epochs: float, seed: int, label: str) -> dict:
        """Train on ``examples`` through the shared backend, logging every step to metrics.jsonl.

        Unless ``train.checkpoints`` is off, a checkpoint is kept after every epoch under
        ``checkpoints/<label>``, so that an interrupted ``fit`` with the same label resumes from
        its last epoch.
        """
        from kembed.trainer import fit

        task_id = self.progress.add_task(f"{label}: training", total=None)

        def on_step(step, total):
            self.progress.update(task_id, completed=step, total=total)

        def on_log(step, logs):
            self.run.log("train", label=label, step=step, **logs)

        checkpoints = None
        if self.config.train.checkpoints:
            checkpoints = self.run.path / "checkpoints" / re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
        try:
            metrics = fit(self.model, examples, collate, loss_fn, self.config.train, self.placement,
                          epochs=epochs, seed=seed, checkpoint_dir=checkpoints, on_log=on_log, on_step=on_step)
        finally:
            self.progress.remove_task(task_id)
        self.console.print(f"[bold]{label}[/] trained on {len(examples)} examples: "
                           f"loss {metrics.get('train_loss', float('nan')):.4f} in {metrics.get('train_runtime', 0):.0f}s")
        return metrics

    def dev_accuracy(self, label: str) -> dict:
        """Closed-book accuracy of the current weights on the ``eval.split`` records (``{}`` if
        none), with the evaluator's default prompt format, so that every run and recipe is
        compared by the same protocol as ``kembed eval``; also on its taught questions (the gold
        answer in the training records' snippets, :func:`kembed.data.answer_knowledge`: what
        ``kembed tune`` selects on) and the ids answered correctly (for paired comparisons).
        Under several processes each rank scores its :func:`~kembed.distributed.shard` of the
        questions (all of them when the weights are sharded, whose forward passes must run in
        step) and every rank gets the summary of all of them."""
        if not self.dev_records:
            return {}
        from kembed.data import TAUGHT, answer_knowledge
        from kembed.evaluate import score_records, summarize
        from kembed.scoring import OptionScorer

        split = self.config.eval.split
        scorer = OptionScorer(self.model, self.tokenizer, self.placement)
        split_work = distributed.splits_work(self.model)
        mine = distributed.shard(self.dev_records) if split_work else self.dev_records
        with self.task(f"{split} accuracy {label}", len(mine)) as advance:
            samples = score_records(scorer, mine, "closed-book", advance)
        if split_work:
            samples = distributed.gather(samples, len(self.dev_records))
        summary = summarize(samples)
        correct = [s["id"] for s in samples if s["correct"]["token_mean"]]
        classes = answer_knowledge(self.records, self.dev_records)
        taught = [i for i, k in classes.items() if k == TAUGHT]
        taught_acc = len(set(correct) & set(taught)) / len(taught) if taught else None
        self.console.print(f"  {split} closed-book accuracy {label} (token_mean): "
                           f"{100 * summary['accuracy']['token_mean']:.1f}% on {summary['n']} questions"
                           + (f", {100 * taught_acc:.1f}% on the {len(taught)} taught" if taught else ""))
        return {"dev_split": split, "dev_accuracy": summary["accuracy"], "dev_ci95": summary["ci95"],
                "dev_taught": {"n": len(taught), "accuracy": taught_acc, "ids": sorted(taught)},
                "dev_correct_ids": sorted(correct)}

    def finish_iteration(self, done: int) -> None:
        """Save the model, measure dev accuracy if configured, and record progress (``done``
        iterations completed) so that ``--resume`` continues after it. Every rank calls it;
        the main process writes."""
        self.run.save_model(self.model, self.tokenizer)
        self.run.save_state(iterations_done=done)  # right after the weights it describes
        if distributed.is_main():
            shutil.rmtree(self.run.path / "checkpoints", ignore_errors=True)  # mid-iteration checkpoints
        self.run.log("iteration_end", iteration=done, **self.dev_accuracy(f"after iteration {done}"))
        distributed.barrier()  # the ranks leave the iteration together


def prepare_config(method: str, recipe: str | None, overrides: list[str], *, domain: str | None = None,
                   limit: int | None = None, data_dir: str | None = None, init_from: str | None = None) -> tuple[RunConfig, BaseModel, dict]:
    """Resolve a recipe plus command-line options into validated configs.

    Returns:
        ``(run_config, method_config, resolved_dict)``.

    Raises:
        ConfigError: unknown keys or bad values; a recipe made for another method.
    """
    from kembed.methods import get_method

    module = get_method(method)
    path = recipe_path(method, recipe)
    data = load_recipe_dict(path)
    data.setdefault("method", method)
    if data["method"] != method:
        raise KembedError(f"{path} is a recipe for '{data['method']}', not '{method}'")
    cli = {"domain": domain, "limit": limit, "data_dir": data_dir, "init_from": init_from}
    data.update({k: v for k, v in cli.items() if v is not None})
    apply_overrides(data, overrides)
    run_cfg, method_cfg = resolve_config(data, module.Config, str(path))
    return run_cfg, method_cfg, dump_config(run_cfg, method_cfg)


def default_output(run_cfg: RunConfig) -> Path:
    """``runs/<method>-<domain>-<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / f"{run_cfg.method}-{run_cfg.domain}-{datetime.now():%Y%m%d-%H%M%S}"


def train(method: str, *, recipe: str | None = None, overrides: list[str] = (), output: str | None = None,
          domain: str | None = None, limit: int | None = None, data_dir: str | None = None,
          init_from: str | None = None, resume: bool = False, console: Console | None = None) -> Path:
    """Train ``method`` as the recipe says and return the run directory.

    With ``resume``, ``output`` must be an existing run; its saved config is used and training
    continues after its last completed iteration. ``init_from`` (a run directory) starts a new
    run from that run's weights instead of the recipe's model.

    Raises:
        KembedError (and subclasses): bad recipe, data, model or run directory.
    """
    from transformers import set_seed

    from kembed.data import AUTO_VALIDATION, VALIDATION_SPLIT, held_out_splits, knowledge_coverage, load_records, training_sample
    from kembed.methods import get_method
    from kembed.models import choose_placement, load_model, load_tokenizer
    from kembed.trainer import check_train_options
    from kembed.trainer import per_device_batch_size

    console = console or Console()
    if not distributed.is_main():
        console = Console(quiet=True)  # the main process prints for all
    if resume:
        if output is None:
            raise KembedError("--resume needs --output: the run directory to continue")
        run = Run.open(Path(output))
        distributed.barrier()  # the main process has repaired an interrupted save
        saved = dict(run.config)
        run_cfg, method_cfg = resolve_config(saved, get_method(saved["method"]).Config, str(run.path / "config.yaml"))
        if run_cfg.method != method:
            raise KembedError(f"{output} is a '{run_cfg.method}' run, not '{method}'")
        if overrides or recipe or domain or init_from or limit is not None:
            console.print("[yellow]--resume uses the run's saved config; recipe, --domain, --limit and "
                          "key=value overrides are ignored[/]")
        if data_dir:  # where the data lives may change between sessions; what it is may not
            run_cfg.data_dir = data_dir
    else:
        if init_from and not (Path(init_from) / "kembed-run.json").is_file():
            raise KembedError(f"--init-from {init_from}: not a kembed run directory")
        run_cfg, method_cfg, resolved = prepare_config(method, recipe, list(overrides), domain=domain,
                                                       limit=limit, data_dir=data_dir, init_from=init_from)
    module = get_method(method)
    per_device_batch_size(run_cfg.train.batch_size)  # fail before any work when it does not split

    # load (and so validate) the data before anything is written
    sample = training_sample(load_records(run_cfg.domain, "train", run_cfg.data_dir), limit=run_cfg.limit,
                             validation=run_cfg.validation, seed=run_cfg.data_seed)
    records, held_out = sample.train, held_out_splits(run_cfg.domain, run_cfg.data_dir, sample)
    held = f"{len(sample.validation)} held out for validation"
    if run_cfg.validation is None:  # sized to the domain; the saved config records the number chosen
        held += f" ({AUTO_VALIDATION})"
        run_cfg.validation = len(sample.validation)
        if not resume:
            resolved["validation"] = run_cfg.validation
    dev = held_out.get(run_cfg.eval.split, [])[: run_cfg.eval.limit]
    if run_cfg.eval.split and not dev:
        why = "validation = 0" if run_cfg.eval.split == VALIDATION_SPLIT else "no such split"
        console.print(f"[yellow]{run_cfg.domain}: no '{run_cfg.eval.split}' records ({why}): no accuracy during training[/]")
    placement = choose_placement(run_cfg.device, run_cfg.precision)
    check_train_options(run_cfg.train, placement)  # before the run directory exists
    if not resume:
        run = Run.create(distributed.from_main(Path(output) if output else default_output(run_cfg)), resolved)
        if distributed.is_main():
            write_json(run.path / "data_sample.json", sample.to_dict())
        run.log("coverage", **{split: knowledge_coverage(records, qs) for split, qs in held_out.items()})
    set_seed(run_cfg.seed)
    resuming = resume and run.state.get("iterations_done", 0) > 0
    model_source = str(run.path) if resuming else run_cfg.init_from or run_cfg.model
    tokenizer = load_tokenizer(model_source)
    lora = run_cfg.train.lora.model_dump() if run_cfg.train.lora and not resuming else None
    model = load_model(model_source, placement, lora=lora, trainable=True)
    if distributed.is_main() and not (run.path / "environment.json").exists():  # a resumed run keeps its own
        write_json(run.path / "environment.json", environment(placement, run_cfg.seed))
    run.log("start", resume=resume, records=len(records), dev_records=len(dev),
            device=placement.device, precision=placement.precision, processes=distributed.world_size())
    processes = f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    console.print(f"[bold]kembed train {method}[/] on {run_cfg.domain}: {len(records)} training records, {held}, "
                  f"model {run_cfg.model}, {placement.device}/{placement.precision}{processes}, run {run.path}"
                  + (f" (resuming after iteration {run.state['iterations_done']})" if resuming else ""))
    start = time.time()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not distributed.is_main())
    ctx = TrainContext(run, run_cfg, method_cfg, placement, model, tokenizer, records, dev, console, progress)
    with progress:
        if not resuming and dev:
            run.log("dev_before_training", **ctx.dev_accuracy("before training"))
        module.train(ctx)
    run.log("end", seconds=round(time.time() - start, 1))
    console.print(f"[green]done[/] in {time.time() - start:.0f}s: model saved in {run.path / 'model'}")
    return run.path
