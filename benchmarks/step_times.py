"""Step times of two bench reports side by side: what a suite's steps cost in one report against
another, on the steps both ran, and what share of a report's step time each kind of step takes.

    python benchmarks/step_times.py BEFORE AFTER
    python benchmarks/step_times.py REPORT

BEFORE and AFTER are ``results.json`` files of ``kembed bench`` or ``REV:PATH`` (a file as a git
revision holds it, e.g. ``31fcb25:benchmarks/results/quick/results.json``). Prints each step both
ran with its seconds in each and their ratio, the totals by kind (train, eval, explain, judge)
over those steps, and each report's share of step time by kind over all its steps (with one
report, only that).

A step's seconds are its wall time as the bench ran it (``--jobs 2``: beside another step), so a
ratio compares code only when both reports ran on the same machine kind with the same jobs and
nothing else beside them; a step whose code did not change between the two (training, when only
evaluation changed) shows how far they did not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import defaultdict
from pathlib import Path


def load(spec: str) -> dict:
    """A report: a file, else ``REV:PATH`` read through ``git show``."""
    if Path(spec).is_file():
        return json.loads(Path(spec).read_text())
    return json.loads(subprocess.run(["git", "show", spec], check=True, capture_output=True, text=True).stdout)


def step_seconds(report: dict) -> dict[str, float]:
    """Step label -> seconds of its last successful run in the report."""
    return {s["step"]: float(s["seconds"]) for s in report.get("steps") or [] if s.get("returncode", 0) == 0}


def kind(label: str) -> str:
    """``train``, ``eval``, ``explain``, ``judge`` or ``retention``: the word after the model."""
    return label.split(": ", 1)[1].split(" ")[0] if ": " in label else label


def shares(seconds: dict[str, float]) -> dict[str, float]:
    """Share of the total step time by kind."""
    total, by = sum(seconds.values()) or 1.0, defaultdict(float)
    for label, s in seconds.items():
        by[kind(label)] += s
    return {k: v / total for k, v in sorted(by.items())}


def summary(report: dict) -> str:
    """The report's commit and machine, its total step time and the share of each kind."""
    seconds = step_seconds(report)
    return (f"{report.get('commit')}, {report.get('machine')}: {sum(seconds.values()):.0f} s of steps; "
            + ", ".join(f"{k} {v:.0%}" for k, v in shares(seconds).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?")
    args = parser.parse_args(argv)
    if args.after is None:
        print(summary(load(args.before)))
        return 0
    reports = [load(args.before), load(args.after)]
    before, after = (step_seconds(r) for r in reports)
    both = [label for label in before if label in after]
    print(f"{'step':72} {'before s':>9} {'after s':>9} {'ratio':>6}")
    for label in both:
        print(f"{label[:72]:72} {before[label]:9.0f} {after[label]:9.0f} {after[label] / before[label]:6.2f}")
    totals = defaultdict(lambda: [0.0, 0.0])
    for label in both:
        totals[kind(label)][0] += before[label]
        totals[kind(label)][1] += after[label]
    print(f"\nsteps both ran: {len(both)} of {len(before)} and {len(after)}")
    for k, (b, a) in sorted(totals.items()):
        print(f"  {k:10} {b:9.0f} s -> {a:9.0f} s  ratio {a / b:.2f}")
    b, a = sum(v[0] for v in totals.values()), sum(v[1] for v in totals.values())
    print(f"  {'all':10} {b:9.0f} s -> {a:9.0f} s  ratio {a / b:.2f}")
    print(f"before: {summary(reports[0])}\nafter: {summary(reports[1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
