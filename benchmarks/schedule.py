"""The wall time a bench suite's order of steps gives, simulated from recorded step times.

    python benchmarks/schedule.py [quick] [--jobs 2]

Replays the suite's whole plan under :func:`kembed.schedule.execute`'s rule (each step starts, in
list order, as soon as its needs have finished, a job is free and its expected peak memory fits)
with every step taking the seconds and memory the committed reports recorded for it
(:func:`kembed.schedule.simulate`). Prints the simulated wall time of the plan's order and of the
longest-first order ``kembed bench`` uses with several jobs, and their ratio. The recorded times
carry whatever contention their run had; both orders replay the same times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kembed.bench import BENCH_DIR, load_suite, plan, recorded  # noqa: E402
from kembed.schedule import longest_first, simulate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", default="quick")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    suite = load_suite(args.suite)
    results = BENCH_DIR / "results" / suite.name
    with tempfile.TemporaryDirectory() as out:
        steps, _ = plan(suite, Path(out))
        seconds, memory = recorded(results, Path(out)), recorded(results, Path(out), "max_rss_mb")
    planned = simulate(steps, seconds, memory, suite.domains, args.jobs)
    ordered = simulate(longest_first(steps, seconds, suite.domains), seconds, memory, suite.domains, args.jobs)
    total = sum(seconds.get(s.label, 0.0) for s in steps)
    print(f"suite {suite.name}: {len(steps)} steps, {total / 60:.0f} min of recorded step time, --jobs {args.jobs}")
    print(f"plan order:    {planned / 60:.1f} min")
    print(f"longest first: {ordered / 60:.1f} min ({ordered / planned:.2f} of the plan order)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
