"""Parity of kembed's fast inference paths with their references on a CUDA device (or any device).

The unit tests check these parities on CPU with a tiny model built in code. This script checks
them with the default model on the device a run would use, on real test questions:

- the packed option scorer against the reference (one full sequence per option), in fp32:
  the largest difference in summed log-prob (nats) and the share of predictions that agree,
  in the raw and chat formats; and the same in the raw format under bf16, where neither is
  checked (bf16 rounding moves the sums by up to about a nat);
- kembed's batched greedy generation against transformers' ``generate`` in fp32: the prompts
  whose tokens are identical.

    python benchmarks/cuda_check.py --device cuda --out cuda-check.json

Writes a JSON object with one entry per check and exits 1 when an fp32 parity fails
(log-prob difference over ``--atol`` or any differing tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kembed.data import load_records
from kembed.generation import LocalGenerator
from kembed.models import DEFAULT_MODEL, choose_placement, load_model, load_tokenizer
from kembed.scoring import OptionScorer


def scorer_parity(model, tokenizer, placement, records, fmt: str) -> dict:
    """Packed scorer against the reference on ``records`` (closed-book, format ``fmt``)."""
    packed = OptionScorer(model, tokenizer, placement, implementation="packed", fmt=fmt)
    reference = OptionScorer(model, tokenizer, placement, implementation="reference", fmt=fmt)
    none = [None] * len(records)
    t0 = time.perf_counter()
    fast = packed.score_many(records, none)
    t1 = time.perf_counter()
    slow = [reference.score(r) for r in records]
    t2 = time.perf_counter()
    diff = max(abs(a - b) for f, s in zip(fast, slow) for a, b in zip(f.logprob_sum, s.logprob_sum))
    agree = sum(f.predict() == s.predict() for f, s in zip(fast, slow))
    return {"format": fmt, "precision": placement.precision, "questions": len(records),
            "max_abs_logprob_diff": diff, "predictions_agree": agree,
            "packed_s": round(t1 - t0, 3), "reference_s": round(t2 - t1, 3)}


def generation_parity(model, tokenizer, placement, prompts: list[str], max_new_tokens: int) -> dict:
    """kembed's greedy generation against transformers' ``generate``, token by token."""
    out = {}
    for implementation in ("kembed", "transformers"):
        gen = LocalGenerator(model, tokenizer, placement, max_new_tokens=max_new_tokens, batch_size=8,
                             implementation=implementation)
        t0 = time.perf_counter()
        out[implementation] = [o for _, o in gen.generate_ids(prompts)]
        out[implementation + "_s"] = round(time.perf_counter() - t0, 3)
    same = sum(a == b for a, b in zip(out["kembed"], out["transformers"]))
    return {"precision": placement.precision, "prompts": len(prompts), "identical": same,
            "tokens": sum(map(len, out["kembed"])), "kembed_s": out["kembed_s"],
            "transformers_s": out["transformers_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--domain", default="current-events")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--atol", type=float, default=1e-3, help="fp32 log-prob tolerance (nats)")
    parser.add_argument("--out", default="cuda-check.json")
    args = parser.parse_args(argv)

    records = load_records(args.domain, "test")[: args.questions]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    fp32 = choose_placement(args.device, "fp32")
    result = {"model": DEFAULT_MODEL, "device": fp32.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if fp32.device == "cuda" else None, "scoring": [],
              "generation": None}
    model = load_model(DEFAULT_MODEL, fp32)
    for fmt in ("raw", "chat"):
        result["scoring"].append(scorer_parity(model, tokenizer, fp32, records, fmt))
        print(json.dumps(result["scoring"][-1]), flush=True)
    prompts = [r.question for r in records[: args.prompts]]
    result["generation"] = generation_parity(model, tokenizer, fp32, prompts, args.max_new_tokens)
    print(json.dumps(result["generation"]), flush=True)
    bf16 = choose_placement(args.device, "bf16")
    model = load_model(DEFAULT_MODEL, bf16)
    result["scoring"].append(scorer_parity(model, tokenizer, bf16, records, "raw"))
    print(json.dumps(result["scoring"][-1]), flush=True)

    fp32_scoring = [s for s in result["scoring"] if s["precision"] == "fp32"]
    ok = (all(s["max_abs_logprob_diff"] <= args.atol for s in fp32_scoring)
          and result["generation"]["identical"] == result["generation"]["prompts"])
    result["fp32_parity"] = ok
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"fp32 parity: {'ok' if ok else 'FAILED'} ({args.out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
