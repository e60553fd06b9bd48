"""``make perf``: kembed's speed against the machine's own limit and against straightforward
references, measured in one process on real current-events records with the default model.

    python benchmarks/perf.py [--out benchmarks/results/perf.json] [--quick] [--no-lmeval]
    python benchmarks/perf.py --markdown benchmarks/results/perf.json   # a saved run as Markdown

Lines (each: kembed's path, the reference it is compared with, throughput, their ratio, peak
memory, the share of the measured bf16 matrix-multiply peak, and a check that both compute the
same thing):

- matrix-multiply peak, fp32 and bf16, at 2048^3 and at the model's own shapes;
- option scoring closed-book and oracle-context: the packed scorer (each prompt once with its
  options after it under a 4D mask, questions packed into rows, one forward each) and the
  shared-prefix scorer (kembed's default before it) vs one full sequence per option (the
  reference scorer), all under the run's precision; lm-evaluation-harness on the same prompts when it is installed (``pip
  install -e .[bench]``), under the same bf16 autocast over fp32 weights, batch size 16;
- RLAG sampling: :func:`kembed.methods.rlag.sample_pairs` with the two scorers;
- greedy generation of explanation prompts: kembed's loop vs transformers' ``generate``, under
  the run's precision and fp32 (where the tokens must be identical);
- RLAG, SFT and CPT training steps (one optimizer step of the recipe's batch_size x
  grad_accum examples, AdamW, gradient clipping): kembed's loss (bf16 autocast, logits only
  where a loss looks) vs the fp32 reference with full logits on the same padded batches, and
  under bf16 the ``train.weights: bf16`` option (bf16 weights, no autocast, optimi's
  Kahan-summed AdamW), and, with ``--compile`` where inductor can build kernels,
  ``train.compile: true`` alone and with bf16 weights (the two warm-up steps, compiling, timed
  apart as ``compile_seconds``); each
  option's ``vs_kembed``: its speed over kembed's default path. The training targets take each
  method's fastest path;
- model load: the cached safetensors vs de-quantizing the GGUF file;
- levers: each speed lever switched off against the kembed default.

Useful FLOPs (padding never counted): training ``6 x non-embedding parameters x real tokens +
6 x head parameters x real tokens whose logits are computed + 12 x layers x attention width x
(sum over real tokens of the keys each attends to)``; forward-only the same with 2, 2 and 4.
Peak memory is the rise of the process's resident set (sampled every 5 ms) over its level
at the start of the line on CPU, and ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lmeval_peer beside this file

from kembed.config import TrainConfig  # noqa: E402
from kembed.data import load_records, training_sample  # noqa: E402
from kembed.errors import ConfigError  # noqa: E402
from kembed.evaluate import score_records  # noqa: E402
from kembed.methods import cpt, rlag, sft  # noqa: E402
from kembed.methods.common import lm_loss, lm_loss_reference, make_lm_collate  # noqa: E402
from kembed.models import DEFAULT_MODEL, Placement, choose_placement, load_model, load_tokenizer  # noqa: E402
from kembed.runs import cpu_model  # noqa: E402
from kembed.scoring import OptionScorer, logprob_sums_shared_prefix, token_budget_batches  # noqa: E402
from kembed.train import prepare_config  # noqa: E402
from kembed.trainer import cast_for_training, check_train_options, make_optimizer  # noqa: E402

BF16_TOLERANCE = 0.05  # relative loss difference accepted between bf16 autocast and fp32
FP32_TOLERANCE = 1e-4  # absolute log-prob / loss difference accepted when both run in fp32


# ----------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory (MiB) of a block: CUDA's allocator peak, else the rise of the resident set
    over its level at the start, sampled every 5 ms by a thread."""

    def __init__(self, device: str):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.top = self.process.memory_info().rss

        def sample():
            while not self.stop.wait(0.005):
                self.top = max(self.top, self.process.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.top = max(self.top, self.process.memory_info().rss)
            self.peak_mib = (self.top - self.start) / 2**20


@contextmanager
def measured(device: str):
    """Yields a dict that receives ``seconds`` and ``peak_mib`` of the block."""
    out = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with PeakMemory(device) as memory:
        sync()
        start = time.perf_counter()
        yield out
        sync()
        out["seconds"] = time.perf_counter() - start
    out["peak_mib"] = round(memory.peak_mib, 1)


def matmul_gflops(m: int, k: int, n: int, dtype, device: str, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of ``[m, k] @ [k, n]`` (2mkn FLOPs) in ``dtype``, best of a few timed runs."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync()
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        sync()
        best = max(best, 3 * 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best


class FlopCount:
    """The stated FLOP formula for a decoder-only model (see the module docstring).

    Attributes:
        body: non-embedding parameters (everything but the token embedding and the LM head).
        head: LM-head parameters (hidden x vocab, counted even when tied to the embedding).
        attention: layers x attention width (heads x head dim).
    """

    def __init__(self, model):
        cfg = model.config
        names = {n for n, _ in model.named_parameters()}
        embed = model.get_input_embeddings().weight.numel()
        head = cfg.hidden_size * cfg.vocab_size
        total = sum(p.numel() for p in model.parameters())
        self.body = total - embed - (head if any("lm_head" in n for n in names) else 0)
        self.head = head
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.attention = cfg.num_hidden_layers * cfg.num_attention_heads * head_dim

    def __call__(self, tokens: int, logit_tokens: int, key_pairs: int, train: bool) -> float:
        """FLOPs of ``tokens`` real tokens, ``logit_tokens`` of them through the head, each real
        token attending to its keys (``key_pairs`` summed over tokens)."""
        c = 3 if train else 1
        return c * (2 * self.body * tokens + 2 * self.head * logit_tokens + 4 * self.attention * key_pairs)


def causal_pairs(length: int, offset: int = 0) -> int:
    """Keys attended to by ``length`` tokens placed after ``offset`` cached ones, summed."""
    return sum(offset + t + 1 for t in range(length))


# ----------------------------------------------------------------------------- the lines


def line(name: str, path: str, *, unit: str, items: int, m: dict, flops: float | None = None, reference=None,
         check: str = "", ok: bool | None = None, **extra) -> dict:
    """One row of the results: throughput in ``unit`` per second, and its ratio to ``reference``'s."""
    row = {"line": name, "path": path, "unit": unit, "items": items, "seconds": round(m["seconds"], 3),
           "per_second": round(items / m["seconds"], 3), "peak_mib": m.get("peak_mib"),
           "gflops": round(flops / m["seconds"] / 1e9, 2) if flops else None, "check": check, "ok": ok, **extra}
    if reference is not None:
        row["ratio"] = round(row["per_second"] / reference["per_second"], 2)
    return row


def scoring_tokens(scorer: OptionScorer, records, mode: str, flops: FlopCount, implementation: str) -> float:
    """Forward FLOPs that scoring ``records`` costs in the packed, shared-prefix or reference path
    (the packed row's attention counted over the pairs its mask allows)."""
    tokens = logits = pairs = 0
    for record in records:
        knowledge = scorer.knowledge(record) if mode == "oracle-context" else None
        prefix, options = scorer.encode(record, knowledge)
        P = len(prefix)
        if implementation == "packed":
            tokens += P + sum(len(o) - 1 for o in options)
            logits += 1 + sum(len(o) - 1 for o in options)
            pairs += causal_pairs(P) + sum(causal_pairs(len(o) - 1, P) for o in options)
        elif implementation == "shared_prefix":
            tokens += P + sum(len(o) for o in options)
            logits += 1 + sum(len(o) for o in options)
            pairs += causal_pairs(P) + sum(causal_pairs(len(o), P) for o in options)
        else:
            tokens += sum(P + len(o) for o in options)
            logits += sum(P + len(o) for o in options)
            pairs += sum(causal_pairs(P + len(o)) for o in options)
    return flops(tokens, logits, pairs, train=False)


def compare_samples(a: list[dict], b: list[dict], scorer: str = "token_mean") -> tuple[int, float]:
    """(questions where ``a`` and ``b`` predict the same option, largest |sum log-prob| difference)."""
    same = sum(x["predicted"][scorer] == y["predicted"][scorer] for x, y in zip(a, b))
    diff = max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x["scores"]["sum"], y["scores"]["sum"]))
    return same, diff


def fp32_check(model, tokenizer, records, mode: str, prompts=None, implementation: str = "packed") -> float:
    """Largest |sum log-prob| difference between ``implementation`` and the reference scorer,
    both in fp32, on ``records``."""
    fp32 = Placement(model.device.type, "fp32")
    fast = score_records(OptionScorer(model, tokenizer, fp32, prompts, implementation=implementation), records, mode)
    slow = score_records(OptionScorer(model, tokenizer, fp32, prompts, implementation="reference"), records, mode)
    return compare_samples(fast, slow)[1]


def scoring_lines(model, tokenizer, placement, records, mode: str, flops: FlopCount, lmeval: bool) -> list[dict]:
    """kembed's packed scorer, its shared-prefix scorer (the default before it), the reference
    scorer and (optionally) lm-eval on ``records``."""
    rows = []
    n = len(records)
    results = {}
    paths = {"reference": "reference (one sequence per option)", "shared_prefix": "shared prefix (kembed before)",
             "packed": "kembed"}
    for impl, path in paths.items():
        scorer = OptionScorer(model, tokenizer, placement, implementation=impl)
        score_records(scorer, records[:2], mode)  # warm-up
        with measured(placement.device) as m:
            results[impl] = score_records(scorer, records, mode)
        rows.append(line(f"scoring {mode}", path, unit="questions", items=n, m=m,
                         flops=scoring_tokens(scorer, records, mode, flops, impl)))
    reference, shared, kembed = rows
    for impl, row in (("shared_prefix", shared), ("packed", kembed)):
        row["ratio"] = round(row["per_second"] / reference["per_second"], 2)
        same, diff = compare_samples(results[impl], results["reference"])
        strict = fp32_check(model, tokenizer, records[:8], mode, implementation=impl)
        row["check"] = (f"same option {same}/{n} ({placement.precision}), max |d sum log-prob| {diff:.3f}; "
                        f"fp32 on 8: {strict:.1e}")
        row["ok"] = strict <= FP32_TOLERANCE
    if lmeval:
        import lmeval_peer

        scorer = OptionScorer(model, tokenizer, placement)
        requests, owner = [], []
        for i, record in enumerate(records):
            prompt = scorer.prompt(record, scorer.knowledge(record) if mode == "oracle-context" else None)
            requests += [(prompt.text, prompt.answer_prefix + o) for o in record.options]
            owner += [i] * len(record.options)
        # lm-eval's own bf16 mode (--model_args dtype=bfloat16): the weights in bf16, no autocast
        peer_model = copy.deepcopy(model).to(torch.bfloat16) if placement.precision == "bf16" else model
        lmeval_peer.loglikelihoods(peer_model, tokenizer, requests[:10], 16)  # warm-up
        with measured(placement.device) as m:
            values, _ = lmeval_peer.loglikelihoods(peer_model, tokenizer, requests, 16)
        del peer_model
        per_q = [[v for v, o in zip(values, owner) if o == i] for i in range(n)]
        same = sum(max(range(len(v)), key=v.__getitem__) == s["predicted"]["sum"]
                   for v, s in zip(per_q, results["packed"]))
        peer = line(f"scoring {mode}", f"lm-evaluation-harness 0.4.13 (batch 16, {placement.precision} weights)",
                    unit="questions", items=n, m=m,
                    flops=scoring_tokens(scorer, records, mode, flops, "reference"),
                    check=f"same option (sum, acc) {same}/{n}")
        kembed["vs_lm_eval"] = round(kembed["per_second"] / peer["per_second"], 2)
        rows.append(peer)
    return rows


def sampling_lines(model, tokenizer, placement, records, cfg, prompts) -> list[dict]:
    """RLAG sampling (both prompts of every record) with the two scorers."""
    out = {}
    rows = []
    for impl in ("reference", "packed"):
        scorer = OptionScorer(model, tokenizer, placement, prompts, implementation=impl)
        rlag.sample_pairs(scorer, records[:1], cfg)  # warm-up
        with measured(placement.device) as m:
            out[impl] = rlag.sample_pairs(scorer, records, cfg)[0]
        rows.append(line("RLAG sampling", "kembed" if impl == "packed" else "reference (one sequence per option)",
                         unit="records", items=len(records), m=m, reference=rows[0] if rows else None))
    same = sum((a["chosen_index"], a["rejected_index"]) == (b["chosen_index"], b["rejected_index"])
               for a, b in zip(out["packed"], out["reference"]))
    rows[1]["check"] = f"same chosen/rejected pair {same}/{len(records)} ({placement.precision})"
    rows[1]["ok"] = same >= 0.9 * len(records)
    return rows, out["packed"]


def generation_perf_lines(model, tokenizer, placement, records, max_new_tokens: int = 96) -> list[dict]:
    """Greedy generation of explanation prompts (:func:`kembed.explain.explanation_prompt`) by
    kembed's loop and by transformers' ``generate`` (benchmarks/generation_speed.py), under the
    run's precision and under fp32, where the tokens must be identical."""
    from generation_speed import generation_lines

    from kembed.explain import explanation_prompt

    prompts = [explanation_prompt(r, r.answer_index) for r in records]
    rows = []
    for precision in dict.fromkeys([placement.precision, "fp32"]):
        where = Placement(placement.device, precision)
        peer, kembed = generation_lines(model, tokenizer, where, prompts, max_new_tokens)
        for g in (peer, kembed):
            path = "kembed" if g is kembed else "transformers generate (batches of 8 in input order)"
            rows.append(line(f"generation {precision}", path, unit="tokens", items=g["tokens"],
                             m={"seconds": g["seconds"]}, reference=rows[-1] if g is kembed else None,
                             check="" if g is peer else f"{len(prompts)} prompts, tokens identical: {g['identical']}",
                             ok=g["identical"] if g is kembed and precision == "fp32" else None))
    return rows


def real_tokens(batch: dict) -> int:
    """Real (not padding) tokens an LM batch, or an RLAG batch's three groups, run through the model
    (RLAG's chosen and rejected rows only for examples whose answer terms are computed)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    answered = batch["beta_A"] != 0
    return int(batch["chosen_attention"][answered].sum() + batch["rejected_attention"][answered].sum()
               + batch["knowledge_attention"].sum())


def lm_step_flops(batches: list[dict], flops: FlopCount, full_logits: bool) -> float:
    """Training FLOPs of LM batches: every real token; logits from the first labelled column
    (kembed) or at every real token (reference)."""
    total = 0.0
    for b in batches:
        lengths = b["attention_mask"].sum(1).tolist()
        s = b["input_ids"].shape[1]
        first = int((b["labels"] != -100).float().argmax(1).min())
        keep = min(s, s - first + 1)
        logits = sum(min(n, keep) for n in lengths) if not full_logits else sum(lengths)
        total += flops(sum(lengths), logits, sum(causal_pairs(n) for n in lengths), train=True)
    return total


def rlag_step_flops(batches: list[dict], flops: FlopCount, full_logits: bool) -> float:
    """Training FLOPs of RLAG batches (chosen, rejected and knowledge groups)."""
    total = 0.0
    for b in batches:
        answered = b["beta_A"] != 0
        for side in ("chosen", "rejected", "knowledge"):
            attention, mask = b[f"{side}_attention"], b[f"{side}_mask"]
            if side != "knowledge":
                attention, mask = attention[answered], mask[answered]
            if not len(attention):
                continue
            lengths = attention.sum(1).tolist()
            s = attention.shape[1]
            keep = min(s, s - int(mask.float().argmax(1).min()) + 1)
            logits = sum(lengths) if full_logits else sum(min(n, keep) for n in lengths)
            total += flops(sum(lengths), logits, sum(causal_pairs(n) for n in lengths), train=True)
    return total


def train_steps(model, batches: list[dict], loss_fn, placement: Placement, grad_accum: int,
                fused: bool = True, optimizer=None, warm_up: int = 1) -> tuple[list[float], dict]:
    """Optimizer steps over ``batches`` (``grad_accum`` micro-batches each): AdamW (fused, as
    the trainer backend's ``adamw_torch_fused``, or for-each; or ``optimizer``), clipping at
    1.0. Returns the micro-batch losses and the measurement of all steps but the first
    ``warm_up``."""
    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)
    losses = []

    def step(group):
        for batch in group:
            with placement.autocast():
                loss = loss_fn(model, batch)[0]
            (loss / grad_accum).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    groups = [batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum)]
    for group in groups[:warm_up]:
        step(group)
    with measured(placement.device) as m:
        for group in groups[warm_up:]:
            step(group)
    return losses, m


def train_lines(name: str, base_model, batches: list[dict], loss_fn, reference_fn, placement: Placement,
                grad_accum: int, step_flops, flops: FlopCount, compiled_lines: bool = False) -> list[dict]:
    """kembed's training steps vs the fp32 full-logits reference on the same batches and weights."""
    timed = batches[grad_accum:]
    tokens = sum(real_tokens(b) for b in timed)
    rows, first = [], {}
    fp32 = Placement(placement.device, "fp32")
    for label, fn, where in (("reference (fp32, full logits)", reference_fn, fp32), ("kembed", loss_fn, placement)):
        model = copy.deepcopy(base_model)
        losses, m = train_steps(model, batches, fn, where, grad_accum, fused=label == "kembed")
        first[label] = losses[0]
        del model
        rows.append(line(f"{name} training step", label, unit="optimizer steps", items=len(timed) // grad_accum, m=m,
                         flops=step_flops(timed, flops, label != "kembed"), reference=rows[0] if rows else None,
                         tokens_per_second=round(tokens / m["seconds"], 1)))
    with torch.no_grad():
        strict = abs(loss_fn(base_model, batches[0])[0].item() - reference_fn(base_model, batches[0])[0].item())
    a, b = first["kembed"], first["reference (fp32, full logits)"]
    rows[1]["check"] = (f"first loss {a:.4f} vs {b:.4f} (rel {abs(a - b) / abs(b):.1e}); "
                        f"kembed loss in fp32 vs reference {strict:.1e}")
    rows[1]["ok"] = abs(a - b) <= BF16_TOLERANCE * abs(b) and strict <= FP32_TOLERANCE
    for label, bf16, compiled in (("train.weights: bf16 (optimi Kahan AdamW)", True, False),
                                  ("train.compile: true (inductor)", False, True),
                                  ("train.weights: bf16 + train.compile: true", True, True)):
        if (bf16 and placement.precision != "bf16") or (compiled and (not compiled_lines or not can_compile(placement)
                                                                     or len(batches) // grad_accum < 3)):
            continue  # a compiled line needs a timed step after its two warm-up steps
        model = copy.deepcopy(base_model)
        optimizer, where = None, placement
        if bf16:  # no autocast: the weights are bf16, the optimizer keeps Kahan compensation
            residuals = cast_for_training(model, "bf16")
            optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                                       TrainConfig(learning_rate=1e-5, weights="bf16"), residuals=residuals)
            where = Placement(placement.device, "fp32")
        # compiled: two warm-up steps, the first compiling for its shapes, the second once more for
        # dynamic sequence lengths; the timed steps then reuse the compiled code
        warm = 2 if compiled else 1
        start = time.perf_counter()
        losses, m = train_steps(torch.compile(model) if compiled else model, batches, loss_fn, where, grad_accum,
                                optimizer=optimizer, warm_up=warm)
        warm_up = time.perf_counter() - start - m["seconds"]
        del model
        if compiled:
            torch._dynamo.reset()
        steps_timed = batches[grad_accum * warm:]
        rows.append(line(f"{name} training step", label, unit="optimizer steps", items=len(steps_timed) // grad_accum,
                         m=m, flops=step_flops(steps_timed, flops, False), reference=rows[0],
                         tokens_per_second=round(sum(real_tokens(b) for b in steps_timed) / m["seconds"], 1),
                         **({"compile_seconds": round(warm_up, 1)} if compiled else {}),
                         check=f"first loss {losses[0]:.4f} vs {b:.4f} (rel {abs(losses[0] - b) / abs(b):.1e})"
                         + (f"; two warm-up steps, compiling, {warm_up:.0f} s (not timed)" if compiled else ""),
                         ok=abs(losses[0] - b) <= BF16_TOLERANCE * abs(b)))
        rows[-1]["vs_kembed"] = round(rows[-1]["per_second"] / rows[1]["per_second"], 2)
    return rows


def can_compile(placement: Placement) -> bool:
    """Whether ``train.compile`` can run here (:func:`kembed.trainer.check_train_options`: on CPU
    inductor needs a C++ compiler)."""
    try:
        check_train_options(TrainConfig(compile=True), placement)
    except ConfigError:
        return False
    return True


def batches_of(examples: list[dict], collate, size: int, count: int, device: str) -> list[dict]:
    """``count`` collated batches of ``size`` examples in order (cycling if needed), on ``device``."""
    rows = (examples * (1 + size * count // max(len(examples), 1)))[: size * count]
    return [{k: v.to(device) for k, v in collate(rows[i:i + size]).items()} for i in range(0, len(rows), size)]


def load_lines(placement: Placement) -> list[dict]:
    """Model load: cached safetensors vs de-quantizing the built-in GGUF file."""
    from transformers import AutoModelForCausalLM

    from kembed.models import BUILTIN_MODELS, _builtin_gguf, materialize_builtin

    materialize_builtin(DEFAULT_MODEL)
    rows = []
    gguf = _builtin_gguf(DEFAULT_MODEL)
    with measured("cpu") as m:
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rows.append(line("model load", f"de-quantize {BUILTIN_MODELS[DEFAULT_MODEL][1]}", unit="loads", items=1, m=m))
    with measured("cpu") as m:
        load_model(DEFAULT_MODEL, placement)
    rows.append(line("model load", "kembed (cached safetensors)", unit="loads", items=1, m=m, reference=rows[0]))
    return rows


# ----------------------------------------------------------------------------- levers


def shared_prefix_seconds(model, scorer: OptionScorer, records, mode: str, context) -> tuple[float, list]:
    """Seconds of the shared-prefix scorer's forward passes (the lever is measured on the path it
    was chosen for) over ``records`` with ``model`` run
    in ``context``, and the per-question option sums (for a lever that bypasses the scorer's
    choice of weights)."""
    encoded = [scorer.encode(r, scorer.knowledge(r) if mode == "oracle-context" else None) for r in records]
    batches = token_budget_batches(encoded, scorer.batch_tokens)
    sums = [None] * len(records)
    with torch.no_grad(), context:
        logprob_sums_shared_prefix(model, [encoded[i] for i in batches[0][:2]], model.device)  # warm-up
        start = time.perf_counter()
        for batch in batches:
            for i, values in zip(batch, logprob_sums_shared_prefix(model, [encoded[i] for i in batch], model.device)):
                sums[i] = values
    return time.perf_counter() - start, sums


def lever_lines(model, tokenizer, placement, test, sft_batches, rlag_batches, rlag_cfg, pairs, by_id, prompts,
                collate_rlag) -> list[dict]:
    """Each speed lever off against the kembed default, on the same work."""
    rows = []

    def pair(name, off_label, on_label, off_m, on_m, unit, items, check="", ok=None):
        off = line(name, off_label, unit=unit, items=items, m=off_m)
        return [off, line(name, on_label, unit=unit, items=items, m=on_m, reference=off, check=check, ok=ok)]

    oracle = test[: max(8, len(test) // 3)]
    # 1. several questions per shared-prefix batch vs one question at a time
    for mode, subset in (("closed-book", test), ("oracle-context", oracle)):
        ms = []
        for budget in (1, OptionScorer(model, tokenizer, placement).batch_tokens):
            scorer = OptionScorer(model, tokenizer, placement, batch_tokens=budget)
            score_records(scorer, subset[:2], mode)
            with measured(placement.device) as m:
                score_records(scorer, subset, mode)
            ms.append(m)
        rows += pair(f"lever: batch questions ({mode})", "one question per row", "kembed (rows under the token budget)", *ms,
                     "questions", len(subset))
    # 2. a bf16 copy of the weights for inference vs bf16 autocast over the fp32 weights
    if placement.precision == "bf16":
        scorer = OptionScorer(model, tokenizer, placement)
        model.eval()
        auto_s, auto = shared_prefix_seconds(model, scorer, oracle, "oracle-context", placement.autocast())
        half = copy.deepcopy(model).to(torch.bfloat16)
        half_s, pure = shared_prefix_seconds(half, scorer, oracle, "oracle-context", contextlib.nullcontext())
        del half
        same = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
                   for a, b in zip(auto, pure))
        diff = max(abs(x - y) for a, b in zip(auto, pure) for x, y in zip(a, b))
        rows += pair("lever: bf16 weights (oracle-context scoring)", "bf16 autocast over fp32 weights",
                     "kembed (bf16 copy of the weights)", {"seconds": auto_s}, {"seconds": half_s}, "questions",
                     len(oracle), f"same option (sum) {same}/{len(oracle)}, max |d sum log-prob| {diff:.3f}")
    # 3. logits only where the loss looks vs full logits (SFT steps, both bf16)
    ms = [train_steps(copy.deepcopy(model), sft_batches, fn, placement, 1)[1] for fn in (lm_loss_reference, lm_loss)]
    rows += pair("lever: LM-head logits (SFT steps)", "full logits", "kembed (from the first labelled column)", *ms,
                 "optimizer steps", len(sft_batches) - 1)
    # 4. fused AdamW vs for-each AdamW: the optimizer step alone, on the model's weights
    ms = []
    for fused in (False, True):
        work = copy.deepcopy(model)
        for w in work.parameters():
            w.grad = torch.randn_like(w) * 1e-3
        optimizer = torch.optim.AdamW(work.parameters(), lr=1e-5, fused=fused)
        optimizer.step()
        with measured(placement.device) as m:
            for _ in range(3):
                optimizer.step()
        ms.append(m)
        del work, optimizer
    rows += pair("lever: fused AdamW (optimizer step)", "for-each AdamW", "kembed (fused AdamW)", *ms, "steps", 3)
    # 5. RLAG's per-term gradient-norm diagnostic (three extra backward passes when it fires)
    ms = []
    for every in (1, 0):
        cfg = rlag_cfg.model_copy(update={"grad_norm_every": every})
        ms.append(train_steps(copy.deepcopy(model), rlag_batches[:3], rlag.make_loss_fn(cfg), placement, 1)[1])
    rows += pair("lever: RLAG grad-norm diagnostic", "every micro-batch", "kembed (off by default)", *ms,
                 "optimizer steps", 2)
    # 6. length-grouped RLAG batches: padding share with and without grouping (no timing: the
    #    order of examples is part of the method, so grouping would change what is trained)
    examples = [rlag.build_example(tokenizer, by_id[p["id"]], p, prompts, rlag_cfg) for p in pairs]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["chosen_ids"]))
    for label, rows_in in (("kembed (sampled order)", examples), ("length-grouped", [examples[i] for i in order])):
        batches = [collate_rlag(rows_in[i:i + 4]) for i in range(0, len(rows_in), 4)]
        real = sum(int(b[f"{k}_attention"].sum()) for b in batches for k in ("chosen", "rejected", "knowledge"))
        slots = sum(b[f"{k}_attention"].numel() for b in batches for k in ("chosen", "rejected", "knowledge"))
        rows.append({"line": "lever: length grouping (RLAG batches of 4)", "path": label, "unit": "", "items": 0,
                     "padding": round(1 - real / slots, 4),
                     "check": f"padding {100 * (1 - real / slots):.1f}% of {slots} token slots", "ok": None})
    # 7. tokenizing a chunk's RLAG examples (what caching across iterations would save)
    with measured("cpu") as m:
        for p in pairs:
            rlag.build_example(tokenizer, by_id[p["id"]], p, prompts, rlag_cfg)
    rows.append(line("lever: cache RLAG tokenization", "tokenize the sampled examples (not cached)",
                     unit="examples", items=len(pairs), m=m))
    return rows


def profile_line(name: str, model, batches: list[dict], loss_fn, placement: Placement, grad_accum: int) -> dict:
    """Where one kembed optimizer step spends its time (torch.profiler, self CPU/CUDA time per
    operator, grouped): the measured bound on the share of the matmul peak a step can reach."""
    from torch.profiler import ProfilerActivity, profile

    groups = {"matrix multiply": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
              "attention": ("scaled_dot_product",), "dtype casts": ("aten::copy_", "aten::_to_copy"),
              "optimizer": ("adam",)}
    work = copy.deepcopy(model)
    train_steps(work, batches[:grad_accum], loss_fn, placement, grad_accum)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if placement.device == "cuda" else [])
    with profile(activities=activities) as prof:
        train_steps(work, batches[: 2 * grad_accum], loss_fn, placement, grad_accum)
    del work
    totals = dict.fromkeys([*groups, "other"], 0.0)
    for event in prof.key_averages():
        t = event.self_device_time_total if placement.device == "cuda" else event.self_cpu_time_total
        group = next((g for g, keys in groups.items() if any(k in event.key.lower() for k in keys)), "other")
        totals[group] += t
    whole = sum(totals.values()) or 1.0
    shares = {g: round(t / whole, 3) for g, t in totals.items()}
    return {"line": f"profile: {name} training step", "path": "kembed", "unit": "", "items": 0, "shares": shares,
            "check": ", ".join(f"{g} {100 * v:.0f}%" for g, v in shares.items()), "ok": None}


# ----------------------------------------------------------------------------- main


def amx_cpu() -> bool:
    """Whether this CPU has AMX bf16 tiles (``amx_bf16`` in /proc/cpuinfo): the issue's
    training targets differ by CPU kind."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def targets(rows: list[dict], peak: float) -> list[dict]:
    """The issue's targets on this machine, each with the measured value and whether it is met."""
    find = {(r["line"], r["path"]): r for r in rows}
    out = []

    def add(name, value, goal, met):
        out.append({"target": name, "measured": value, "goal": goal, "met": met})

    for mode in ("closed-book", "oracle-context"):
        kembed = find.get((f"scoring {mode}", "kembed"))
        if kembed and kembed.get("vs_lm_eval") is not None:
            add(f"scoring {mode} vs lm-evaluation-harness", f"{kembed['vs_lm_eval']:.2f}x", ">= 2x",
                kembed["vs_lm_eval"] >= 2)
    oracle = find.get(("scoring oracle-context", "kembed"))
    if oracle:
        add("scoring oracle-context vs one sequence per option", f"{oracle['ratio']:.2f}x", ">= 8x", oracle["ratio"] >= 8)
    amx = amx_cpu()
    for method in ("RLAG", "SFT", "CPT"):
        paths = [r for r in rows if r["line"] == f"{method} training step" and not r["path"].startswith("reference")]
        if not paths:
            continue
        best = max(paths, key=lambda r: r["ratio"])
        share = best["gflops"] / peak
        add(f"{method} training step, share of the bf16 peak ({best['path']})", f"{100 * share:.0f}%", ">= 60%",
            share >= 0.6)
        add(f"{method} training step vs fp32 full-logits reference ({best['path']})", f"{best['ratio']:.2f}x",
            ">= 2x", best["ratio"] >= 2)
        if best.get("vs_kembed") is not None:
            goal = 1.5 if amx else 1.2
            add(f"{method} training step vs kembed's bf16-autocast path ({best['path']})",
                f"{best['vs_kembed']:.2f}x", f">= {goal}x ({'AMX' if amx else 'no AMX'})", best["vs_kembed"] >= goal)
    for precision in ("bf16", "fp32"):
        r = find.get((f"generation {precision}", "kembed"))
        if r:
            add(f"generation {precision} vs transformers generate", f"{r['ratio']:.2f}x", ">= 2x", r["ratio"] >= 2)
    load = find.get(("model load", "kembed (cached safetensors)"))
    if load:
        add("cached model load vs de-quantizing", f"{load['ratio']:.1f}x", ">= 5x", load["ratio"] >= 5)
    return out


def cells(r: dict, peak: float) -> list[str]:
    """A result line as table cells: line, path, per second, ratio, peak MiB, % of bf16 peak, check."""
    rate = f"{r['per_second']:.2f} {r['unit']}" if r.get("unit") else ""
    if r.get("tokens_per_second"):
        rate += f" ({r['tokens_per_second']:.0f} tok/s)"
    ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
    if r.get("vs_lm_eval") is not None:
        ratio += f" ({r['vs_lm_eval']:.2f}x lm-eval)"
    share = f"{100 * r['gflops'] / peak:.0f}%" if r.get("gflops") else ""
    memory = "" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
    check = (r.get("check") or "") + ("" if r.get("ok") is None else (" [ok]" if r["ok"] else " [FAIL]"))
    return [r["line"], r["path"], rate, ratio, memory, share, check]


HEADER = ("line", "path", "per second", "ratio", "peak MiB", "% of bf16 peak", "check")


def markdown(result: dict) -> str:
    """A saved perf.json as Markdown: the measured lines, then the targets."""
    peak = result["bf16_peak_gflops"]
    machine = result["machine"]
    lines = [f"bf16 matmul peak {peak:.0f} GFLOP/s ({machine['processor']}, {machine['threads']} threads, "
             f"{machine['precision']})", "", "| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r, peak)) + " |" for r in result["lines"]]
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
              for t in result.get("targets", [])]
    return "\n".join(lines)


def render(rows: list[dict], peak: float, console) -> None:
    from rich.table import Table

    table = Table(title=f"kembed perf (bf16 matmul peak {peak:.0f} GFLOP/s)")
    for col in HEADER:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*cells(r, peak))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="current-events")
    parser.add_argument("--out", default="benchmarks/results/perf.json")
    parser.add_argument("--questions", type=int, default=162, help="closed-book test questions (default: all 162)")
    parser.add_argument("--oracle-questions", type=int, default=48, help="oracle-context test questions")
    parser.add_argument("--sample-records", type=int, default=24, help="training records for RLAG sampling")
    parser.add_argument("--generation-prompts", type=int, default=24, help="explanation prompts generated")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per training line")
    parser.add_argument("--quick", action="store_true", help="a few items per line (a smoke run)")
    parser.add_argument("--compile", action="store_true",
                        help="also time train.compile: true per training line (on the 2-core AMD EPYC, RLAG's "
                             "training lines had run 16 min, its compiled warm-up over 10 of them, when stopped)")
    parser.add_argument("--no-lmeval", action="store_true", help="skip lm-evaluation-harness even when installed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", metavar="PERF_JSON", help="print a saved perf.json as Markdown and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.quick:
        args.questions, args.oracle_questions, args.sample_records, args.steps, args.generation_prompts = 12, 6, 4, 1, 4

    from rich.console import Console

    console = Console(width=200)
    placement = choose_placement(args.device)
    tokenizer, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL, placement)
    flops = FlopCount(model)
    threads = torch.get_num_threads()
    console.print(f"kembed perf: {DEFAULT_MODEL} on {placement.device}/{placement.precision}, {threads} threads")

    rows = []
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        hidden, inter, vocab = model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size
        for shape_name, shape in (("2048^3", (2048, 2048, 2048)), ("model MLP 512x576x1536", (512, hidden, inter)),
                                  ("model head 512x576x49152", (512, hidden, vocab))):
            g = matmul_gflops(*shape, dtype, placement.device)
            peaks[(name, shape_name)] = g
            rows.append({"line": f"matmul peak {name}", "path": shape_name, "unit": "", "items": 0,
                         "gflops": round(g, 1), "check": f"{g:.0f} GFLOP/s", "ok": None})
    peak = max(g for (name, _), g in peaks.items() if name == "bfloat16")
    console.print(f"bf16 matmul peak {peak:.0f} GFLOP/s")

    test = load_records(args.domain, "test")
    lmeval = not args.no_lmeval
    if lmeval:
        import lmeval_peer

        lmeval = lmeval_peer.available()
        if not lmeval:
            console.print("[yellow]lm-evaluation-harness is not installed (pip install -e .[bench]): no peer lines[/]")
    rows += scoring_lines(model, tokenizer, placement, test[: args.questions], "closed-book", flops, lmeval)
    console.print("scoring closed-book done")
    rows += scoring_lines(model, tokenizer, placement, test[: args.oracle_questions], "oracle-context", flops, lmeval)
    console.print("scoring oracle-context done")

    run_cfg, rlag_cfg, _ = prepare_config("rlag", None, [f"domain={args.domain}"])
    rlag_cfg = rlag_cfg.model_copy(update={"grad_norm_every": 0})  # the diagnostic is a lever line of its own
    train_records = training_sample(load_records(args.domain, "train"), limit=run_cfg.limit,
                                    validation=run_cfg.validation, seed=run_cfg.seed).train
    sampled = train_records[: args.sample_records]
    sampling, pairs = sampling_lines(model, tokenizer, placement, sampled, rlag_cfg, run_cfg.prompts)
    rows += sampling
    console.print("RLAG sampling done")

    rows += generation_perf_lines(model, tokenizer, placement, test[: args.generation_prompts])
    console.print("generation done")

    # training steps, each on the recipe's batch size and gradient accumulation
    g, bs = run_cfg.train.grad_accum, run_cfg.train.batch_size
    by_id = {r.id: r for r in train_records}
    examples = [rlag.build_example(tokenizer, by_id[p["id"]], p, run_cfg.prompts, rlag_cfg) for p in pairs]
    collate_rlag = rlag.make_collate(tokenizer.pad_token_id)
    rlag_batches = batches_of(examples, collate_rlag, bs, g * (args.steps + 1), placement.device)
    rows += train_lines("RLAG", model, rlag_batches, rlag.make_loss_fn(rlag_cfg),
                        rlag.make_loss_fn(rlag_cfg, rlag.mean_logprobs_reference), placement, g, rlag_step_flops, flops,
                        args.compile)
    console.print("RLAG steps done")

    sft_run, sft_cfg, _ = prepare_config("sft", None, [f"domain={args.domain}"])
    sft_examples = [sft.build_example(tokenizer, r, sft_run.prompts, sft_cfg) for r in train_records]
    lm_collate = make_lm_collate(tokenizer.pad_token_id)
    g, bs = sft_run.train.grad_accum, sft_run.train.batch_size
    sft_batches = batches_of(sft_examples, lm_collate, bs, g * (args.steps + 1), placement.device)
    rows += train_lines("SFT", model, sft_batches, lm_loss, lm_loss_reference, placement, g, lm_step_flops, flops,
                        args.compile)
    console.print("SFT steps done")

    cpt_run, cpt_cfg, _ = prepare_config("cpt", None, [f"domain={args.domain}"])
    documents = list(dict.fromkeys(z for r in train_records for z in r.knowledge))
    blocks = cpt.token_blocks(tokenizer, documents, cpt_cfg.block_size)
    g, bs = cpt_run.train.grad_accum, cpt_run.train.batch_size
    cpt_batches = batches_of([{"input_ids": b, "loss_mask": [1] * len(b)} for b in blocks], lm_collate, bs,
                             g * (args.steps + 1), placement.device)
    rows += train_lines("CPT", model, cpt_batches, lm_loss, lm_loss_reference, placement, g, lm_step_flops, flops,
                        args.compile)
    console.print("CPT steps done")

    rows += load_lines(placement)
    rows += [profile_line("RLAG", model, rlag_batches, rlag.make_loss_fn(rlag_cfg), placement, run_cfg.train.grad_accum),
             profile_line("CPT", model, cpt_batches, lm_loss, placement, cpt_run.train.grad_accum)]
    console.print("profiles done")
    rows += lever_lines(model, tokenizer, placement, test[: args.questions], sft_batches[: args.steps + 1],
                        rlag_batches, rlag_cfg, pairs, by_id, run_cfg.prompts, collate_rlag)

    render(rows, peak, console)
    goals = targets(rows, peak)
    for t in goals:
        console.print(f"{'[green]met[/]' if t['met'] else '[red]not met[/]'}  {t['target']}: {t['measured']} "
                      f"(target {t['goal']})")
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/perf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": _git_commit(),
        "machine": {"platform": platform.platform(), "processor": cpu_model(), "threads": threads,
                    "device": placement.device, "precision": placement.precision, "torch": torch.__version__},
        "model": DEFAULT_MODEL, "domain": args.domain,
        "flops": {"body_params": flops.body, "head_params": flops.head, "layers_x_attention_width": flops.attention},
        "bf16_peak_gflops": round(peak, 1),
        "lines": rows,
        "targets": goals,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None



if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
