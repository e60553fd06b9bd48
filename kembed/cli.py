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
data_app = typer.Typer(help="Domain data: fetch, validate and import your own.", no_args_is_help=True)
app.add_typer(data_app, name="data")
index_app = typer.Typer(help="Retrieval indexes over a domain's knowledge documents.", no_args_is_help=True)
app.add_typer(index_app, name="index")

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
             output: Optional[str] = typer.Option(None, help="Output directory (default: runs/eval-<domain>-<split>-<mode>[-chat]-<time>)."),
             fmt: str = typer.Option("raw", "--format", help="Scoring format: raw (the paper's protocol, no chat "
                                                             "template) or chat (the model's chat template)."),
             scorer: str = typer.Option("shared_prefix", help="Scorer implementation: shared_prefix or reference."),
             device: str = typer.Option("auto", help="auto, cpu or cuda."),
             precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
             overwrite: bool = typer.Option(False, help="Replace results already in --output."),
             data_dir: Optional[str] = DataDir):
    """Accuracy by option scoring (token_mean, sum, char_norm) with 95% bootstrap CIs."""
    from rich.progress import Progress

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
    if mode == "oracle-context" and not any(r.knowledge for r in records):
        raise KembedError(f"{domain}/{split} has no knowledge snippets: oracle-context needs them")
    retriever = build_index(domain, index, data_dir) if mode == "retrieved-context" else None
    placement = choose_placement(device, precision)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"scoring {domain}/{split} ({mode}, {fmt})", total=len(records))
        summary, samples = run_eval(model, records, mode=mode, placement=placement, implementation=scorer,
                                    progress=lambda: progress.advance(task), index=retriever, top_k=top_k, fmt=fmt)
    from kembed.evaluate import run_coverage, run_training

    summary = {"domain": domain, "split": split, **summary, "coverage": run_coverage(model, records, data_dir),
               "trained_on": run_training(model)}
    write_results(out, summary, samples)
    console.print(results_table([summary]))
    console.print(f"{summary['questions_per_second']} questions/s; results in {out}")


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
                                                                      "(default: a recipe's default)."),
                  data_dir: Optional[str] = DataDir):
    """How many held-out questions have their knowledge snippets (and gold answer) in the training records."""
    from kembed.config import RunConfig
    from kembed.data import coverage_table, held_out_splits, knowledge_coverage, load_records, training_sample

    defaults = RunConfig.model_fields
    seed = defaults["seed"].default if seed is None else seed
    validation = defaults["validation"].default if validation is None else validation

    sample = training_sample(load_records(domain, "train", data_dir), limit=limit, validation=validation, seed=seed)
    coverage = {split: knowledge_coverage(sample.train, records)
                for split, records in held_out_splits(domain, data_dir, sample).items()}
    console.print(coverage_table(coverage, f"{domain}: knowledge coverage by {len(sample.train)} training records "
                                           f"(seed {seed}, {validation} held out for validation)"))


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
                replace: bool = typer.Option(False, "--replace", help="Replace an existing user domain of that name."),
                data_dir: Optional[str] = DataDir):
    """Register your own domain; it then works wherever a built-in domain does (--domain NAME)."""
    from kembed.data import validation_tables
    from kembed.userdomains import CONTEXT_INDEX, CONTEXT_TOP_K, corpus_table, import_domain

    result = import_domain(name, qa, test, corpus, data_dir, replace)
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
    """Console-script entry point."""
    app(prog_name="kembed")


if __name__ == "__main__":
    sys.exit(run())
