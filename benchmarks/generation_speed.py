"""Generation speed: kembed's greedy decoding (:func:`kembed.generation.greedy_decode`: prompts
by length, continuous batching of at most 8, the shared system turn run once, bf16 weights under
bf16) against transformers' ``model.generate`` as LocalGenerator called it before (batches of 8
in input order, autocast under bf16), on the same prompts in the same run.

    python benchmarks/generation_speed.py [--n 32] [--max-new-tokens 96] [--precisions fp32,bf16]
        [--threads T] [--repeats R]

The prompts are explanation prompts (:func:`kembed.explain.explanation_prompt`, gold answer) of
current-events test questions. Prints generated tokens per second of each (tokens up to and
including the first eos), their ratio, and whether kembed's tokens equal transformers' (expected
under fp32; under bf16 kembed runs bf16 weights and transformers bf16 autocast, so they differ).
On a CPU shared with other work, ``--threads 1`` gives steadier timings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kembed.generation import LocalGenerator
from kembed.runs import cpu_model


def generation_lines(model, tokenizer, placement, prompts: list[str], max_new_tokens: int,
                     repeats: int = 1) -> list[dict]:
    """Time greedy generation of ``prompts`` by transformers (``implementation="transformers"``,
    the path LocalGenerator took before) and by kembed, under ``placement``, after a short
    warm-up of each; with ``repeats`` > 1 the two alternate and each keeps its fastest run
    (the least disturbed by other load).

    Returns:
        Two dicts ``{name, seconds, tokens, tokens_per_second, identical}``: ``tokens`` counts
        generated tokens up to and including each reply's first eos; ``identical`` is None for
        transformers and, for kembed, whether every prompt's generated ids equal transformers'.
    """
    runs = {}
    for implementation in ("transformers", "kembed"):
        LocalGenerator(model, tokenizer, placement, max_new_tokens=4, implementation=implementation
                       ).generate_ids(prompts[:2])  # warm-up
    for _ in range(repeats):
        for implementation in ("transformers", "kembed"):
            generator = LocalGenerator(model, tokenizer, placement, max_new_tokens=max_new_tokens,
                                       implementation=implementation)
            start = time.perf_counter()
            outs = [out for _, out in generator.generate_ids(prompts)]
            seconds = time.perf_counter() - start
            runs[implementation] = (min(seconds, runs.get(implementation, (seconds,))[0]), outs)
    lines = []
    for implementation, (seconds, outs) in runs.items():
        tokens = sum(len(out) for out in outs)
        identical = None if implementation == "transformers" else outs == runs["transformers"][1]
        lines.append({"name": f"generate {placement.precision} {implementation}", "seconds": round(seconds, 2),
                      "tokens": tokens, "tokens_per_second": round(tokens / seconds, 1), "identical": identical})
    return lines


def main() -> None:
    from kembed.data import load_records
    from kembed.explain import explanation_prompt
    from kembed.models import DEFAULT_MODEL, choose_placement, load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="prompts")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each; the fastest counts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    records = load_records("current-events", "test", limit=args.n)
    prompts = [explanation_prompt(r, r.answer_index) for r in records]
    tokenizer = load_tokenizer(args.model)
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; {len(prompts)} current-events explanation prompts, "
          f"max_new_tokens {args.max_new_tokens}, model {args.model}")
    for precision in args.precisions.split(","):
        placement = choose_placement("cpu", precision)
        model = load_model(args.model, placement)
        old, new = generation_lines(model, tokenizer, placement, prompts, args.max_new_tokens, args.repeats)
        for line in (old, new):
            print(f"{line['name']:<28} {line['tokens']:6d} tokens {line['seconds']:8.2f} s "
                  f"{line['tokens_per_second']:8.1f} tokens/s")
        print(f"speed-up {precision}: {new['tokens_per_second'] / old['tokens_per_second']:.2f}x; "
              f"kembed tokens identical to transformers: {new['identical']}")


if __name__ == "__main__":
    main()
