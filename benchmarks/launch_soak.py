"""Soak test of clean exits under a launcher: runs the 2-process test
(``tests/test_distributed.py::test_two_cpu_processes_train_like_one``: ``train rlag``, ``train sft``
and ``eval`` in one ``accelerate launch`` of 2 CPU processes) N times in a row, each in a fresh
pytest, and counts the runs where a rank aborted at exit ("terminate called without an active
exception", SIGABRT) apart from other failures.

    python benchmarks/launch_soak.py [-n 30] [--log-dir DIR]

Prints one line per run and a summary; exits 1 when any run failed. The output of each failed
run is kept in ``--log-dir`` (default: a temporary directory, printed). A script, not a test:
30 runs take about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_distributed.py::test_two_cpu_processes_train_like_one"
#: What an abort at exit leaves in the launcher's output (the test quotes its stdout and stderr).
ABORT_SIGNS = ("terminate called", "SIGABRT", "Signals.SIGABRT", "exitcode  : -6")


def run_once(log: Path) -> tuple[str, float]:
    """One pytest run of the test: ``("passed" | "aborted" | "failed", seconds)``; the output of
    a failed run is written to ``log``."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return "passed", seconds
    output = proc.stdout + proc.stderr
    log.write_text(output)
    return ("aborted" if any(sign in output for sign in ABORT_SIGNS) else "failed"), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=30, help="runs (default 30)")
    parser.add_argument("--log-dir", type=Path, default=None, help="where failed runs' output goes")
    args = parser.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="kembed-launch-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.n} runs of {TEST}; failed runs' output in {log_dir}", flush=True)
    counts = {"passed": 0, "aborted": 0, "failed": 0}
    total = 0.0
    for i in range(1, args.n + 1):
        status, seconds = run_once(log_dir / f"run-{i:03d}.log")
        counts[status] += 1
        total += seconds
        print(f"run {i:3d}/{args.n}: {status:7s} {seconds:6.1f} s", flush=True)
    print(f"{args.n} runs: {counts['passed']} passed, {counts['aborted']} aborted at exit, "
          f"{counts['failed']} failed otherwise; {total / args.n:.1f} s per run", flush=True)
    return 0 if counts["passed"] == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
