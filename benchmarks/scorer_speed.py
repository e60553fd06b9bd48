"""Scorer speed: shared-prefix option scoring against the straightforward one (one full
sequence per option), on the same questions in the same run.

    python benchmarks/scorer_speed.py [--domain current-events] [--mode oracle-context] [--limit N]

Prints questions per second of each, their ratio, how often they pick the same option and the
largest log-prob difference (bf16 autocast makes the two differ slightly; in fp32 they agree
to 1e-4, which tests/test_scoring.py checks).
"""

from __future__ import annotations

import argparse
import time

from kembed.data import load_records
from kembed.evaluate import score_records
from kembed.models import DEFAULT_MODEL, choose_placement, load_model, load_tokenizer
from kembed.scoring import OptionScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="current-events")
    parser.add_argument("--split", default="test")
    parser.add_argument("--mode", default="oracle-context")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    records = load_records(args.domain, args.split, limit=args.limit)
    placement = choose_placement("auto", args.precision)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, placement)
    results = {}
    for impl in ("reference", "shared_prefix"):
        scorer = OptionScorer(model, tokenizer, placement, implementation=impl)
        score_records(scorer, records[:2], args.mode)  # warm-up
        start = time.perf_counter()
        samples = score_records(scorer, records, args.mode)
        results[impl] = (time.perf_counter() - start, samples)
    (t_ref, ref), (t_fast, fast) = results["reference"], results["shared_prefix"]
    same = sum(a["predicted"]["token_mean"] == b["predicted"]["token_mean"] for a, b in zip(ref, fast))
    diff = max(abs(x - y) for a, b in zip(ref, fast) for x, y in zip(a["scores"]["sum"], b["scores"]["sum"]))
    n = len(records)
    print(f"{args.domain}/{args.split} {args.mode}, {n} questions, {placement.device}/{placement.precision}")
    print(f"reference      {n / t_ref:8.2f} questions/s")
    print(f"shared_prefix  {n / t_fast:8.2f} questions/s")
    print(f"speed-up       {t_ref / t_fast:8.2f}x")
    print(f"same prediction (token_mean) on {same}/{n} questions; max |sum log-prob difference| {diff:.2e}")


if __name__ == "__main__":
    main()
