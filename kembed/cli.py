"""The ``kembed`` command line. Heavy modules (torch, transformers) are imported inside the
commands, so ``kembed --help`` and ``kembed ls`` stay fast."""

from __future__ import annotations

import functools
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kembed.errors import KembedError

app = typer.Typer(help="Embed domain knowledge into language models and compare the methods that do it.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Domain data: fetch, validate and import your own; export what a run trained on.", no_args_is_help=True)
app.add_typer(data_app, name="data")
index_app = typer.Typer(help="Retrieval indexes over a domain's knowledge documents.", no_args_is_help=True)
app.add_typer(index_app, name="index")
config_app = typer.Typer(help="Recipes: check a recipe with overrides without running it.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)
_debug = {"on": False}

DataDir = typer.Option(None, "--data-dir", help="Data directory (default: $KEMBED_DATA_DIR, else kembed's user data dir).")


def handle_errors(fn):
    """Report KembedError as one line and exit 2 (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KembedError as e:
            if _debug["on"]:
                raise
            err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: completed iterations are saved; continue with --resume")
            raise typer.Exit(130)

    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
         version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    """kembed: CPT, SFT, RAFT, SimRAG and RLAG on the same data, model and evaluator."""
    _debug["on"] = debug
    if version:
        from kembed import __version__

        console.print(__version__)
        raise typer.Exit()


@app.command(context_settings={"allow_extra_args": False})
@handle_errors
def train(method: str = typer.Argument(..., help="Method name (see `kembed ls`)."),
          overrides: Optional[list[str]] = typer.Argument(None, help="key=value recipe overrides, e.g. rlag.gamma=0.5"),
          domain: Optional[str] = typer.Option(None, help="Domain (default: the recipe's)."),
          recipe: Optional[str] = typer.Option(None, help="Recipe file or name (default: recipes/<method>.yaml)."),
          output: Optional[str] = typer.Option(None, help="Run directory (default: runs/<method>-<domain>-<time>)."),
          limit: Optional[int] = typer.Option(None, help="Train on a seeded random sample of N train records."),
          resume: bool = typer.Option(False, help="Continue the interrupted run in --output."),
          init_from: Optional[str] = typer.Option(None, help="Start from another run's weights (not --resume)."),
          data_dir: Optional[str] = DataDir):
    """Train a method on a domain; writes a run directory."""
    from kembed.train import train as run_train

    run_train(method, recipe=recipe, overrides=overrides or [], output=output, domain=domain, limit=limit,
              data_dir=data_dir, init_from=init_from, resume=resume, console=console)


@app.command("eval")
@handle_errors
def evaluate(domain: str = typer.Option(..., help="Domain to evaluate on."),
             model: str = typer.Option("smollm2-135m-instruct", help="Built-in name, HF id, model dir or run dir."),
             split: str = typer.Option("test", help="Split: train, dev or test."),
             mode: str = typer.Option("closed-book", help="closed-book, oracle-context or retrieved-context."),
             top_k: int = typer.Option(3, "--top-k", help="retrieved-context: documents retrieved per question."),
             index: str = typer.Option("bm25", "--index", help="retrieved-context: index kind, bm25, dense or hybrid."),
             limit: Optional[int] = typer.Option(None, help="Only the first N questions."),
             sample: Optional[int] = typer.Option(None, min=1, help="A seeded random N of the questions (in file order)."),
             sample_seed: int = typer.Option(0, help="--sample: the seed of the draw."),
             output: Optional[str] = typer.Option(None, help="Output directory (default: runs/eval-<domain>-<split>-<mode>[-chat]-<time>)."),
             fmt: str = typer.Option("raw", "--format", help="Scoring format: raw (the paper's protocol, no chat "
                                                             "template), chat (the model's chat template) or raft "
                                                             "(RAFT's instruction: the model reasons, options scored "
                                                             "after <ANSWER>:)."),
             reasoning_tokens: int = typer.Option(128, "--reasoning-tokens", min=1,  # scoring.DEFAULT_REASONING_TOKENS
                                                  help="--format raft: tokens the model may write before <ANSWER>:."),
             scorer: str = typer.Option("packed", help="Scorer implementation: packed, shared_prefix or reference."),
             batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", min=1,
                                                        help="Token budget of one scoring forward pass (default: 512 "
                                                             "packed, 4096 shared_prefix; halved and retried on "
                                                             "out-of-memory)."),
             device: str = typer.Option("auto", help="auto, cpu or cuda."),
             precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
             overwrite: bool = typer.Option(False, help="Replace results already in --output."),
             explain: bool = typer.Option(False, "--explain", help="Then explain every correct answer (see `kembed explain`)."),
             max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="--explain: tokens per explanation."),
             data_dir: Optional[str] = DataDir):
    """Accuracy by option scoring (token_mean, sum, char_norm) with 95% bootstrap CIs."""
    from rich.progress import Progress

    from kembed import distributed
    from kembed.data import load_records
    from kembed.evaluate import MODES, evaluate as run_eval, results_table, write_results
    from kembed.models import choose_placement

    from kembed.prompts import FORMATS
    from kembed.retrieval import KINDS, build_index
    from kembed.scoring import IMPLEMENTATIONS

    if mode not in MODES:
        raise KembedError(f"unknown --mode '{mode}' (choose from {', '.join(MODES)})")
    if fmt not in FORMATS:
        raise KembedError(f"unknown --format '{fmt}' (choose from {', '.join(FORMATS)})")
    if scorer not in IMPLEMENTATIONS:
        raise KembedError(f"unknown --scorer '{scorer}' (choose from {', '.join(IMPLEMENTATIONS)})")

    if index not in KINDS:
        raise KembedError(f"unknown --index '{index}' (choose from {', '.join(KINDS)})")
    if top_k < 1:
        raise KembedError(f"--top-k must be at least 1, got {top_k}")
    label = mode if fmt == "raw" else f"{mode}-{fmt}"
    out = Path(output) if output else Path("runs") / f"eval-{domain}-{split}-{label}-{datetime.now():%Y%m%d-%H%M%S}"
    if (out / "results.json").exists() and not overwrite:
        raise KembedError(f"{out / 'results.json'} exists: pass --overwrite or choose another --output")
    records = load_records(domain, split, data_dir, limit=limit)
    if sample is not None and sample < len(records):
        import random

        chosen = set(random.Random(sample_seed).sample(range(len(records)), sample))
        records = [r for i, r in enumerate(records) if i in chosen]
    if mode == "oracle-context" and not any(r.knowledge for r in records):
        raise KembedError(f"{domain}/{split} has no knowledge snippets: oracle-context needs them")
    retriever = build_index(domain, index, data_dir) if mode == "retrieved-context" else None
    placement = choose_placement(device, precision)
    main = distributed.is_main()  # under a multi-process launch the ranks share the questions
    with Progress(console=console, transient=True, disable=not main) as progress:
        passes = 2 if fmt == "raft" else 1  # raft: each question's reasoning is written, then scored
        task = progress.add_task(f"scoring {domain}/{split} ({mode}, {fmt})", total=passes * len(distributed.shard(records)))
        summary, samples = run_eval(model, records, mode=mode, placement=placement, implementation=scorer,
                                    progress=lambda k=1: progress.advance(task, k), index=retriever, top_k=top_k, fmt=fmt,
                                    batch_tokens=batch_tokens, reasoning_tokens=reasoning_tokens)
    if not main:
        return  # the main process writes and reports
    from kembed.evaluate import run_knowledge, run_training

    knowledge = run_knowledge(model, records, data_dir)
    if knowledge:  # each question: is its gold answer in what the run trained on
        for sample in samples:
            sample["knowledge"] = knowledge[1][sample["id"]]
    summary = {"domain": domain, "split": split, **summary, "coverage": knowledge[0] if knowledge else None,
               "trained_on": run_training(model)}
    write_results(out, summary, samples)
    console.print(results_table([summary]))
    console.print(f"{summary['questions_per_second']} questions/s; results in {out}")
    if explain:
        _explain(out, max_new_tokens, device, precision, data_dir)


def _explain(folder: Path, max_new_tokens: int, device: str, precision: str, data_dir: Optional[str]) -> None:
    from rich.progress import Progress

    from kembed.explain import explain_evaluation

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"explaining correct answers ({folder})", total=None)

        def advance(total, n):
            if total is not None:
                progress.update(task, total=total)
            progress.advance(task, n)

        record = explain_evaluation(folder, max_new_tokens=max_new_tokens, device=device, precision=precision,
                                    data_dir=data_dir, progress=advance)
    console.print(f"{record['n']} explanations in {folder / 'samples.jsonl'} ({record['seconds']:.0f}s of generation)")


@app.command()
@handle_errors
def explain(folder: Path = typer.Argument(..., help="A `kembed eval` output directory."),
            max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="Tokens per explanation."),
            device: str = typer.Option("auto", help="auto, cpu or cuda."),
            precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
            data_dir: Optional[str] = DataDir):
    """Explain every correctly answered question of an evaluation (greedy, chat template); resumable."""
    _explain(folder, max_new_tokens, device, precision, data_dir)


JudgeModel = typer.Option(None, "--judge-model", help="Language-model judge: a local model (built-in name, HF id or dir).")
JudgeUrl = typer.Option(None, "--judge-url", help="Language-model judge: an OpenAI-compatible endpoint, e.g. http://host/v1.")
JudgeName = typer.Option(None, "--judge-name", help="--judge-url: the model name the endpoint serves.")
JudgeKeyEnv = typer.Option(None, "--judge-key-env", help="--judge-url: environment variable holding the API key.")


@app.command()
@handle_errors
def judge(folders: list[Path] = typer.Argument(..., help="Evaluation directories with explanations, or folders holding them."),
          judge_name: str = typer.Option("grounded", "--judge", help="grounded (no language model) or rubric."),
          judge_model: Optional[str] = JudgeModel, judge_url: Optional[str] = JudgeUrl,
          judge_served: Optional[str] = JudgeName, judge_key_env: Optional[str] = JudgeKeyEnv,
          reparse: bool = typer.Option(False, "--reparse", help="rubric: parse the cached raw answers again (no calls)."),
          allow_self_judge: bool = typer.Option(False, "--allow-self-judge", help="Let a model judge its own family."),
          data_dir: Optional[str] = DataDir):
    """Judge saved explanations; judgments are appended to judgments.jsonl (resumable)."""
    from rich.progress import Progress

    from kembed.judges import evaluation_folders, judge_evaluation, make_judge

    found = evaluation_folders(folders)
    judge_obj = make_judge(judge_name, judge_model=judge_model, judge_url=judge_url, served_model=judge_served,
                           key_env=judge_key_env, generators=found, allow_self_judge=allow_self_judge)
    for folder in found:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"judging {folder} ({judge_name})", total=None)
            summary = judge_evaluation(folder, judge_obj, data_dir=data_dir, reparse=reparse,
                                       progress=lambda n=1: progress.advance(task, n),
                                       on_total=lambda t: progress.update(task, total=t))
        score = "-" if summary["mean_score"] is None else f"{summary['mean_score']:.3f}"
        console.print(f"{folder}: {judge_name} rationality {score} over {summary['scored']} explanations; "
                      f"unable to explain {summary['unable']}/{summary['n'] - summary['judge_failed']}; "
                      f"judge failed {summary['judge_failed']}", highlight=False)
    client = getattr(judge_obj, "client", None)
    if client is not None:
        u = client.usage
        console.print(f"judge calls: {u['requests']} requests, {u['cache_hits']} from the cache, "
                      f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens")


@app.command()
@handle_errors
def compare(paths: list[Path] = typer.Argument(..., help="Evaluation directories or run directories holding eval-* folders; the first is the reference."),
            plot: Optional[Path] = typer.Option(None, "--plot", help="Write the accuracy plot (PNG) into this folder."),
            markdown: bool = typer.Option(False, "--markdown", help="Print Markdown instead of a rich table."),
            judge_name: Optional[str] = typer.Option(None, "--judge", help="pairwise: a language model compares the "
                                                                          "explanations of the reference and each other run."),
            judge_model: Optional[str] = JudgeModel, judge_url: Optional[str] = JudgeUrl,
            judge_served: Optional[str] = JudgeName, judge_key_env: Optional[str] = JudgeKeyEnv,
            allow_self_judge: bool = typer.Option(False, "--allow-self-judge", help="Let a model judge its own family."),
            output: Optional[Path] = typer.Option(None, help="--judge pairwise: where to write pairwise.json "
                                                             "(default: runs/compare-<time>)."),
            data_dir: Optional[str] = DataDir):
    """One table over runs: accuracy, paired differences to the first (McNemar), rationality."""
    from kembed.results import compare_entries, console_tables, plot as plot_rows, table_cells
    from kembed.tables import markdown_table

    rows, labels = compare_entries(paths)
    if markdown:
        print(markdown_table(*table_cells(rows, labels, reference=rows[0]["name"])))
    else:
        console.print(console_tables(rows, labels, "kembed compare", reference=rows[0]["name"]))
    if plot:
        for f in plot_rows(rows, labels, plot):
            console.print(f"plot: {f}")
    if judge_name:
        if judge_name != "pairwise":
            raise KembedError(f"kembed compare --judge: only 'pairwise' (got '{judge_name}'); use `kembed judge` for others")
        from kembed.judges.pairwise import pairwise_table, run_pairwise

        out = output or Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
        results = run_pairwise(rows, judge_model=judge_model, judge_url=judge_url, served_model=judge_served,
                               key_env=judge_key_env, allow_self_judge=allow_self_judge, data_dir=data_dir, output=out)
        console.print(pairwise_table(results))
        console.print(f"pairwise judgments in {out}")


@app.command()
@handle_errors
def bench(suite: str = typer.Argument("quick", help="Suite name (benchmarks/<name>.yaml) or file."),
          out: Optional[Path] = typer.Option(None, help="Runs and evaluations (default: runs/bench/<suite>)."),
          results_dir: Optional[Path] = typer.Option(None, "--results", help="Tables and plots (default: benchmarks/results/<suite>)."),
          seeds: Optional[int] = typer.Option(None, help="Train K seeds per method (default: the suite's)."),
          jobs: int = typer.Option(1, help="Steps run at once (each with CPU cores / jobs threads; logs in OUT/logs)."),
          domains: Optional[str] = typer.Option(None, help="Run only these of the suite's domains (comma-separated), "
                                                           "in this order; the report merges every domain run so far."),
          methods: Optional[str] = typer.Option(None, help="Run only the base model's and these methods' steps "
                                                           "(comma-separated), with the tuning they need."),
          report_only: bool = typer.Option(False, "--report-only", help="Run nothing: write the report from what "
                                                                          "has finished in OUT (a bench may still be "
                                                                          "running) and list the steps still to run."),
          plan_only: bool = typer.Option(False, "--plan", help="Run nothing: print the steps still to run, their "
                                                                "expected minutes (recorded step times) and the wall "
                                                                "time with --jobs."),
          data_dir: Optional[str] = DataDir):
    """Train, evaluate, explain and judge every method of a suite; resumable; writes results.md and plots."""
    from kembed.bench import BENCH_DIR, load_suite, run_suite

    spec = load_suite(suite)
    try:
        report, failures = run_suite(spec, out=out or Path("runs") / "bench" / spec.name,
                                     results_dir=results_dir or BENCH_DIR / "results" / spec.name, seeds=seeds,
                                     data_dir=data_dir, jobs=jobs, console=console,
                                     domains=[d.strip() for d in domains.split(",") if d.strip()] if domains else None,
                                     methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
                                     report_only=report_only, plan_only=plan_only)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: finished steps are kept and the stopped ones run again; run the "
                          "same command to go on", soft_wrap=True)
        raise typer.Exit(130)
    if report is None:
        return
    console.print(f"results: {report}")
    if failures:
        console.print(f"[red]{len(failures)} step(s) failed or were skipped[/]: see the Failures section of {report}")
        raise typer.Exit(1)


@app.command()
@handle_errors
def tune(method: str = typer.Argument(..., help="Method name (see `kembed ls`)."),
         overrides: Optional[list[str]] = typer.Argument(None, help="key=value recipe overrides shared by the grid."),
         domain: Optional[str] = typer.Option(None, help="Domain (default: the recipe's)."),
         recipe: Optional[str] = typer.Option(None, help="Recipe file or name (default: recipes/<method>.yaml)."),
         lr_scales: str = typer.Option("0.5,1,2", help="Multipliers of the recipe's learning rate."),
         epoch_scales: str = typer.Option("1", help="Multipliers of every epochs field of the method's section."),
         selection: str = typer.Option("validation-taught", help="validation-taught or validation."),
         out: Optional[Path] = typer.Option(None, help="Runs (default: runs/tune)."),
         jobs: int = typer.Option(1, help="Runs trained at once."),
         data_dir: Optional[str] = DataDir):
    """Train a grid around a method's recipe and select on held-out validation questions (never test)."""
    from kembed.bench import tune_steps
    from kembed.runs import write_atomic, write_json
    from kembed.schedule import execute
    from kembed.train import prepare_config
    from kembed.tune import TuneSpec, summary_lines

    def scales(text: str, name: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise KembedError(f"{name} must be numbers separated by commas, got '{text}'") from None

    if selection not in ("validation-taught", "validation"):
        raise KembedError(f"unknown --selection '{selection}' (choose from validation-taught, validation)")
    spec = TuneSpec(lr_scales=scales(lr_scales, "--lr-scales"), epoch_scales=scales(epoch_scales, "--epoch-scales"),
                    selection=selection)
    run_cfg, _, _ = prepare_config(method, recipe, overrides or [], domain=domain, data_dir=data_dir)
    out = out or Path("runs") / "tune"
    steps, select = tune_steps(method, recipe, list(overrides or []), spec, run_cfg.domain, out, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    failures = execute(steps, console, out, jobs)
    result = select()
    text = "\n".join(summary_lines(method, result))
    write_json(out / run_cfg.domain / f"{method}-tune.json", result)
    write_atomic(out / run_cfg.domain / f"{method}-tune.md", text + "\n")
    console.print(text)
    console.print(f"train it: kembed train {method} {' '.join(result['overrides'])}")
    if failures:
        raise typer.Exit(1)


@config_app.command("check")
@handle_errors
def config_check(method: str = typer.Argument(..., help="Method name."),
                 overrides: Optional[list[str]] = typer.Argument(None, help="key=value recipe overrides."),
                 recipe: Optional[str] = typer.Option(None, help="Recipe file or name (default: recipes/<method>.yaml)."),
                 domain: Optional[str] = typer.Option(None, help="Domain (default: the recipe's)."),
                 limit: Optional[int] = typer.Option(None, help="Training records."),
                 data_dir: Optional[str] = DataDir):
    """Validate a recipe with overrides and print the resolved config, without running anything."""
    import yaml

    from kembed.train import prepare_config

    _, _, resolved = prepare_config(method, recipe, overrides or [], domain=domain, limit=limit, data_dir=data_dir)
    print(yaml.safe_dump(resolved, sort_keys=False).rstrip())
    err_console.print(f"[green]ok[/]: {method} config is valid")


@app.command()
@handle_errors
def results(paths: list[Path] = typer.Argument(..., help="results.json files or directories holding one."),
            markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table.")):
    """Show saved evaluation results side by side."""
    from kembed.evaluate import results_markdown, results_table

    rows = []
    for p in paths:
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise KembedError(f"{f}: no such results file")
        try:
            rows.append(json.loads(f.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KembedError(f"{f}: not a kembed results file ({e})") from None
    if markdown:
        print(results_markdown(rows))
    else:
        console.print(results_table(rows))


@app.command("ls")
@handle_errors
def list_things(data_dir: Optional[str] = DataDir):
    """List domains (built-in and imported), methods, recipes and built-in models."""
    from rich.table import Table

    from kembed.config import RECIPES_DIR
    from kembed.data import list_domains
    from kembed.methods import available
    from kembed.models import BUILTIN_MODELS, DEFAULT_MODEL

    table = Table(title="kembed")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("details")
    for name, spec in list_domains(data_dir).items():
        user = " (user domain)" if spec.user else ""
        table.add_row("domain", name, f"{spec.folder}: {', '.join(spec.splits)}{user}")
    for name, module in available().items():
        table.add_row("method", name, module)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        table.add_row("recipe", path.stem, str(path))
    for name, (package, filename) in BUILTIN_MODELS.items():
        table.add_row("model", name + (" (default)" if name == DEFAULT_MODEL else ""), f"{filename} from {package}")
    console.print(table)


@data_app.command("validate")
@handle_errors
def data_validate(domain: str = typer.Option(..., help="Domain to check."),
                  data_dir: Optional[str] = DataDir):
    """Load every split of a domain and report read, kept and dropped records."""
    from kembed.data import get_domain, load_split, validation_tables

    reports = [load_split(domain, split, data_dir)[1] for split in get_domain(domain, data_dir).splits]
    for table in validation_tables(reports):
        console.print(table)


@data_app.command("coverage")
@handle_errors
def data_coverage(domain: str = typer.Option(..., help="Domain to check."),
                  limit: Optional[int] = typer.Option(None, help="Training records (a seeded sample; default: all)."),
                  seed: Optional[int] = typer.Option(None, help="Seed of the sample (default: a recipe's default seed)."),
                  validation: Optional[int] = typer.Option(None, help="Train records held out as the validation split "
                                                                      "(default: 20 percent of the train split, at most 100)."),
                  data_dir: Optional[str] = DataDir):
    """How many held-out questions have their knowledge snippets (and gold answer) in the training records."""
    from kembed.config import RunConfig
    from kembed.data import coverage_table, held_out_splits, knowledge_coverage, load_records, training_sample

    defaults = RunConfig.model_fields
    seed = defaults["data_seed"].default if seed is None else seed
    validation = defaults["validation"].default if validation is None else validation

    sample = training_sample(load_records(domain, "train", data_dir), limit=limit, validation=validation, seed=seed)
    coverage = {split: knowledge_coverage(sample.train, records)
                for split, records in held_out_splits(domain, data_dir, sample).items()}
    console.print(coverage_table(coverage, f"{domain}: knowledge coverage by {len(sample.train)} training records "
                                           f"(seed {seed}, {len(sample.validation)} held out for validation)"))


@data_app.command("fetch")
@handle_errors
def data_fetch(source: Optional[Path] = typer.Option(None, "--from", help="Copy from a local folder laid out like upstream data/."),
               dest: Optional[Path] = typer.Option(None, help="Destination (default: kembed's user data dir).")):
    """Download the RLAG datasets (or copy them from a local folder)."""
    from kembed.data import fetch_data

    path = fetch_data(dest, source)
    console.print(f"data ready in {path}")


@data_app.command("import")
@handle_errors
def data_import(name: str = typer.Argument(..., help="Name of the new domain: lowercase letters, digits, - and _."),
                qa: Path = typer.Option(..., "--qa",
                                        help="Questions (JSON array or JSONL, RLAG schema): the train split."),
                test: Optional[Path] = typer.Option(None, "--test",
                                                    help="Test questions (default: hold out a seeded 20 percent of --qa)."),
                corpus: Optional[Path] = typer.Option(None, "--corpus",
                                                      help="Knowledge documents for records without ctx: .txt (one per "
                                                           "line), .jsonl (a text field) or a folder of .txt/.md files."),
                replace: bool = typer.Option(False, "--replace", help="Replace an existing user domain of that name.")):
    """Register your own domain (kept in kembed's user data dir, or $KEMBED_DOMAINS_DIR); it then works
    wherever a built-in domain does (--domain NAME)."""
    from kembed.data import validation_tables
    from kembed.userdomains import CONTEXT_INDEX, CONTEXT_TOP_K, corpus_table, import_domain

    result = import_domain(name, qa, test, corpus, replace)
    for table in validation_tables(result.reports):
        console.print(table)
    if result.corpus is not None:
        console.print(corpus_table(result.corpus))
    counts = ", ".join(f"{r.split} {r.kept} questions" for r in result.reports)
    console.print(f"imported user domain '{name}' into {result.path}: {counts}"
                  + (" (test held out from --qa)" if result.test_from == "holdout" else ""))
    if result.retrieved:
        console.print(f"{result.retrieved} records had no ctx: knowledge = the top {CONTEXT_TOP_K} "
                      f"{CONTEXT_INDEX} documents of the corpus ({result.retrieved_empty} matched none)")


@data_app.command("export")
@handle_errors
def data_export(run: Path = typer.Argument(..., help="A `kembed train` run directory."),
                fmt: str = typer.Option("trl", "--format",
                                        help="trl: TRL's conversational prompt-completion and preference formats, "
                                             "and its language-modeling format for CPT."),
                output: Optional[Path] = typer.Option(None, "--output",
                                                      help="Folder to write (default: RUN/export-FORMAT).")):
    """Write the examples a run trained on as datasets other tools train from: one JSONL file per
    training stage, loadable with datasets.load_dataset("json", data_files=...)."""
    from kembed.export import export_run

    for f in export_run(run, fmt, output):
        left_out = f" ({f.skipped} pairs whose chosen and rejected answers agree left out)" if f.skipped else ""
        written = f"{f.path}: {f.rows} {f.kind} examples" if f.path else f"{f.source.name}: nothing to export"
        console.print(written + left_out, highlight=False, soft_wrap=True)


@index_app.command("build")
@handle_errors
def index_build(domain: str = typer.Option(..., help="Domain whose knowledge documents to index."),
                kind: str = typer.Option("bm25", help="bm25, dense or hybrid."),
                data_dir: Optional[str] = DataDir):
    """Build (or load from kembed's cache) a domain's retrieval index."""
    from kembed.retrieval import build_index

    built = build_index(domain, kind, data_dir)
    state = "loaded from the cache" if built.from_cache else "built"
    console.print(f"{kind} index of {domain}: {len(built)} documents, {state} ({built.path})")


def run():
    """Console-script entry point (also ``python -m kembed.cli``, as launchers start it). After a
    command that succeeded, a multi-process launch's group is torn down
    (:func:`kembed.distributed.shutdown`) so that every rank exits cleanly."""
    from kembed import distributed

    try:
        app(prog_name="kembed")
    except SystemExit as end:
        if end.code not in (0, None):
            raise
    distributed.shutdown()


if __name__ == "__main__":
    sys.exit(run())
