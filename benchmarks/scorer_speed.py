"""Scorer speed: kembed's option scorers (packed, shared-prefix) against the straightforward one
(one full sequence per option), on the same questions in the same run.

    python benchmarks/scorer_speed.py [--domain current-events] [--mode oracle-context] [--limit N]
        [--threads T] [--row-tokens 512,1024]

Prints questions per second of each, the ratio to the reference, how often each picks the
reference's option and the largest log-prob difference (bf16 makes them differ slightly; in fp32
they agree to 1e-4, which tests/test_scoring.py checks), and the CPU model. ``--row-tokens``
times the packed scorer at each of those row lengths (``kembed eval --batch-tokens``).
"""

from __future__ import annotations

import argparse
import time

import torch

from kembed.data import load_records
from kembed.evaluate import score_records
from kembed.models import DEFAULT_MODEL, choose_placement, load_model, load_tokenizer
from kembed.runs import cpu_model
from kembed.scoring import DEFAULT_BATCH_TOKENS, OptionScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="current-events")
    parser.add_argument("--split", default="test")
    parser.add_argument("--mode", default="oracle-context")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--row-tokens", default=str(DEFAULT_BATCH_TOKENS["packed"]),
                        help="packed row lengths to time, comma-separated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    records = load_records(args.domain, args.split, limit=args.limit)
    placement = choose_placement("auto", args.precision)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, placement)
    runs = [("reference", None), ("shared_prefix", None)] + [("packed", int(n)) for n in args.row_tokens.split(",")]
    results = {}
    for impl, tokens in runs:
        scorer = OptionScorer(model, tokenizer, placement, implementation=impl, batch_tokens=tokens)
        score_records(scorer, records[:2], args.mode)  # warm-up
        start = time.perf_counter()
        samples = score_records(scorer, records, args.mode)
        results[(impl, tokens)] = (time.perf_counter() - start, samples)
    n = len(records)
    print(f"{args.domain}/{args.split} {args.mode}, {n} questions, {placement.device}/{placement.precision}, "
          f"{torch.get_num_threads()} threads, CPU {cpu_model()}")
    t_ref, ref = results[("reference", None)]
    for (impl, tokens), (seconds, samples) in results.items():
        same = sum(a["predicted"]["token_mean"] == b["predicted"]["token_mean"] for a, b in zip(ref, samples))
        diff = max(abs(x - y) for a, b in zip(ref, samples) for x, y in zip(a["scores"]["sum"], b["scores"]["sum"]))
        label = impl + (f" (rows of {tokens})" if tokens else "")
        print(f"{label:<26} {n / seconds:8.2f} questions/s {t_ref / seconds:6.2f}x reference; "
              f"same option {same}/{n}, max |d sum log-prob| {diff:.2e}")


if __name__ == "__main__":
    main()
