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
data_app = typer.Typer(help="Domain data: fetch and validate.", no_args_is_help=True)
app.add_typer(data_app, name="data")

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
          limit: Optional[int] = typer.Option(None, help="Use only the first N training records."),
          resume: bool = typer.Option(False, help="Continue the interrupted run in --output."),
          data_dir: Optional[str] = DataDir):
    """Train a method on a domain; writes a run directory."""
    from kembed.train import train as run_train

    run_train(method, recipe=recipe, overrides=overrides or [], output=output, domain=domain, limit=limit,
              data_dir=data_dir, resume=resume, console=console)


@app.command("eval")
@handle_errors
def evaluate(domain: str = typer.Option(..., help="Domain to evaluate on."),
             model: str = typer.Option("smollm2-135m-instruct", help="Built-in name, HF id, model dir or run dir."),
             split: str = typer.Option("test", help="Split: train, dev or test."),
             mode: str = typer.Option("closed-book", help="closed-book or oracle-context."),
             limit: Optional[int] = typer.Option(None, help="Only the first N questions."),
             output: Optional[str] = typer.Option(None, help="Output directory (default: runs/eval-<domain>-<split>-<mode>-<time>)."),
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

    if mode not in MODES:
        raise KembedError(f"unknown --mode '{mode}' (choose from {', '.join(MODES)})")
    out = Path(output) if output else Path("runs") / f"eval-{domain}-{split}-{mode}-{datetime.now():%Y%m%d-%H%M%S}"
    if (out / "results.json").exists() and not overwrite:
        raise KembedError(f"{out / 'results.json'} exists: pass --overwrite or choose another --output")
    records = load_records(domain, split, data_dir, limit=limit)
    if mode == "oracle-context" and not any(r.knowledge for r in records):
        raise KembedError(f"{domain}/{split} has no knowledge snippets: oracle-context needs them")
    placement = choose_placement(device, precision)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"scoring {domain}/{split} ({mode})", total=len(records))
        summary, samples = run_eval(model, records, mode=mode, placement=placement, implementation=scorer,
                                    progress=lambda: progress.advance(task))
    summary = {"domain": domain, "split": split, **summary}
    write_results(out, summary, samples)
    console.print(results_table([summary]))
    console.print(f"{summary['questions_per_second']} questions/s; results in {out}")


@app.command()
@handle_errors
def results(paths: list[Path] = typer.Argument(..., help="results.json files or directories holding one.")):
    """Show saved evaluation results side by side."""
    from kembed.evaluate import results_table

    rows = []
    for p in paths:
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise KembedError(f"{f}: no such results file")
        rows.append(json.loads(f.read_text()))
    console.print(results_table(rows))


@app.command("ls")
@handle_errors
def list_things():
    """List domains, methods, recipes and built-in models."""
    from rich.table import Table

    from kembed.config import RECIPES_DIR
    from kembed.data import DOMAINS
    from kembed.methods import available
    from kembed.models import BUILTIN_MODELS, DEFAULT_MODEL

    table = Table(title="kembed")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("details")
    for name, spec in DOMAINS.items():
        table.add_row("domain", name, f"{spec.folder}: {', '.join(spec.splits)}")
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

    reports = [load_split(domain, split, data_dir)[1] for split in get_domain(domain).splits]
    for table in validation_tables(reports):
        console.print(table)


@data_app.command("fetch")
@handle_errors
def data_fetch(source: Optional[Path] = typer.Option(None, "--from", help="Copy from a local folder laid out like upstream data/."),
               dest: Optional[Path] = typer.Option(None, help="Destination (default: kembed's user data dir).")):
    """Download the RLAG datasets (or copy them from a local folder)."""
    from kembed.data import fetch_data

    path = fetch_data(dest, source)
    console.print(f"data ready in {path}")


def run():
    """Console-script entry point."""
    app(prog_name="kembed")


if __name__ == "__main__":
    sys.exit(run())
