"""Resident memory of CPU training on batches of varying length: glibc's default malloc against
kembed's trainer, which hands freed heap pages back after every optimiser step
(:func:`kembed.trainer.release_freed_memory`), in the same run.

    python benchmarks/fragmentation.py [--steps 20] [--model MODEL]

Two subprocesses run at once, one thread each, the same seeded steps: forward and backward of
the model (fp32 weights under bf16 autocast, as the CPU recipes train) on a batch of 4
sequences of a random length in [200, 900) tokens, then a fused AdamW step, and in kembed's
process :func:`kembed.trainer.release_freed_memory`, as the trainer's callback calls it. Each prints its resident memory after every fifth step
and its peak; the script prints the ratios (kembed / reference) of the peak, of the resident
memory after the last step, and of the wall time.

Record the CPU model with the numbers (the script prints it): the two share the machine's
memory bandwidth, so the time ratio holds for this machine kind only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, random, resource, sys, time
import torch
from kembed.models import choose_placement, load_model
from kembed.trainer import release_freed_memory
torch.set_num_threads(1)
model = load_model(sys.argv[1], choose_placement("cpu", "bf16"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
rng = random.Random(0)
rss = lambda: int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
start, trace = time.time(), []
for i in range(int(sys.argv[2])):
    x = torch.randint(0, model.config.vocab_size, (4, rng.randrange(200, 900)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sys.argv[3] == "kembed":
        release_freed_memory()
    if (i + 1) % 5 == 0:
        trace.append(round(rss(), 2))
        print(sys.argv[3], "step", i + 1, "resident GiB", trace[-1], file=sys.stderr, flush=True)
print(json.dumps({"seconds": time.time() - start, "resident_gib": trace,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    from kembed.models import DEFAULT_MODEL
    from kembed.runs import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    procs = {}
    for mode in ("kembed", "reference"):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs[mode] = subprocess.Popen([sys.executable, "-c", CHILD, args.model, str(args.steps), mode], env=env,
                                       stdout=subprocess.PIPE, text=True)
    out = {mode: json.loads(p.communicate()[0].strip().splitlines()[-1]) for mode, p in procs.items()}
    print(f"machine: {cpu_model()}; {args.steps} steps of batch 4, lengths 200-899, one thread each, side by side")
    for mode, r in out.items():
        print(f"{mode:>9}: resident GiB every 5 steps {r['resident_gib']}, peak {r['peak_gib']:.2f}, {r['seconds']:.0f} s")
    k, ref = out["kembed"], out["reference"]
    print(f"kembed / reference: peak {k['peak_gib'] / ref['peak_gib']:.2f}, "
          f"resident at the end {k['resident_gib'][-1] / ref['resident_gib'][-1]:.2f}, "
          f"time {k['seconds'] / ref['seconds']:.2f}")


if __name__ == "__main__":
    main()
