"""The wall time a bench suite's order of steps gives, simulated from recorded step times.

    python benchmarks/schedule.py [quick] [--jobs 2]

Replays the suite's plan under :func:`kembed.bench.execute`'s rule (each step starts, in list
order, as soon as its needs have finished and a job is free) with every step taking the
seconds (and peak memory) the committed ``benchmarks/results/<suite>/results.json`` recorded for it (the mean of
its kind where the label was not recorded, :func:`kembed.bench.expected`). Prints the
simulated wall time of the plan's order and of the longest-first order ``kembed bench`` uses
with several jobs, and their ratio. The recorded times carry whatever contention their run had;
both orders replay the same times.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kembed.bench import BENCH_DIR, expected, load_suite, longest_first, plan, recorded  # noqa: E402


def simulate(steps, seconds: dict[str, float], memory: dict[str, float], domains: list[str], jobs: int) -> float:
    """Seconds until every step has finished, starting steps in list order as needs, jobs and
    expected memory allow (90% of this machine's, as :func:`kembed.bench.execute`)."""
    took, rss = expected(steps, seconds, domains), expected(steps, memory, domains)
    limit = 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    pending, running, finished, now = list(steps), [], set(), 0.0
    while pending or running:
        for step in list(pending):
            fits = not running or rss[step.label] + sum(rss[label] for _, label in running) <= limit
            if len(running) < jobs and fits and all(n in finished for n in step.needs):
                pending.remove(step)
                heapq.heappush(running, (now + took[step.label], step.label))
        now, label = heapq.heappop(running)
        finished.add(label)
    return now


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
