"""A small RLAG sweep on the validation split, to choose the CPU recipe (never the test split).

Each configuration is recipes/rlag.yaml plus overrides, trained on a seeded sample of ``--limit``
train records (a subset of the recipe's sample: samples are nested) and scored after every
iteration on the held-out validation records (closed-book, raw, as ``kembed eval`` scores). Runs
that finished are reused, interrupted ones resumed, so the sweep can be re-run to completion.

    python benchmarks/rlag_sweep.py --out runs/rlag-sweep [--limit 30] [--table benchmarks/results/rlag-sweep.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

CONFIGS = {  # name -> overrides of recipes/rlag.yaml
    "recipe (template span, lr 5e-5, T=1)": [],
    "answer_span=answer": ["rlag.answer_span=answer"],
    "lr 2e-5": ["train.learning_rate=2e-5"],
    "T=2": ["rlag.passes=2"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" (")[0]).strip("-").lower()


def finished(run: Path) -> bool:
    return run.joinpath("metrics.jsonl").is_file() and '"event": "end"' in run.joinpath("metrics.jsonl").read_text()


def row(name: str, run: Path) -> dict:
    events = [json.loads(line) for line in run.joinpath("metrics.jsonl").read_text().splitlines()]
    accuracy = [e for e in events if "dev_accuracy" in e]
    last = accuracy[-1]
    return {"config": name, "before": accuracy[0]["dev_accuracy"]["token_mean"],
            "per_iteration": [e["dev_accuracy"]["token_mean"] for e in accuracy[1:]],
            "final": last["dev_accuracy"]["token_mean"], "ci95": last["dev_ci95"]["token_mean"],
            "seconds": sum(e["seconds"] for e in events if e["event"] == "end")}  # resumed runs: every session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/rlag-sweep"))
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--table", type=Path, default=Path("benchmarks/results/rlag-sweep.md"))
    args = parser.parse_args()
    rows = []
    for name, overrides in CONFIGS.items():
        run = args.out / slug(name)
        if not finished(run):
            resume = ["--resume"] if run.joinpath("kembed-run.json").is_file() else []
            cmd = [sys.executable, "-m", "kembed.cli", "train", "rlag", "--output", str(run), *resume]
            subprocess.run(cmd + ([] if resume else [f"limit={args.limit}", *overrides]), check=True)
        rows.append(row(name, run))
    lines = [f"# RLAG sweep on the validation split (current-events, {args.limit} training records)", "",
             f"Command: `python benchmarks/rlag_sweep.py --out {args.out} --limit {args.limit}` "
             f"({date.today()}). Closed-book raw token_mean accuracy on the 100 held-out validation "
             f"records (seed 42) before training, after each iteration, and at the end with its 95% "
             f"bootstrap CI. Training seconds are wall time, validation evaluations included, and depend "
             f"on what else ran on the machine.", "",
             "| config | before % | per iteration % | final % [95% CI] | training s |", "|---|---|---|---|---|"]
    for r in rows:
        its = " -> ".join(f"{100 * a:.1f}" for a in r["per_iteration"])
        lines.append(f"| {r['config']} | {100 * r['before']:.1f} | {its} | {100 * r['final']:.1f} "
                     f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] | {r['seconds']:.0f} |")
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
