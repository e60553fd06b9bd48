"""The trainer backend: its LR schedules (the RLAG authors' cosine warm-up then constant
schedule, now transformers' warmup-stable-decay, against the formula kembed used to compute
itself) and its speed options (pure bf16 weights with Kahan-summed AdamW against fp32; compile)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from conftest import interrupt_training_at
from kembed.config import TrainConfig
from kembed.methods.common import lm_loss, make_lm_collate
from kembed.models import Placement
from kembed.trainer import COSINE_WARMUP_CONSTANT, fit


def cosine_warmup_constant_reference(warmup_steps: int):
    """The RLAG authors' LR factor (their train.py), kembed's own code before transformers'
    scheduler: ``0.5 * (1 - cos(pi * step / warmup_steps))`` below ``warmup_steps``, then 1."""
    return lambda step: 0.5 * (1.0 - math.cos(math.pi * step / warmup_steps)) if step < warmup_steps else 1.0


def test_reference_formula_values():
    f = cosine_warmup_constant_reference(4)
    assert [round(f(s), 4) for s in range(6)] == [0.0, 0.1464, 0.5, 0.8536, 1.0, 1.0]


@pytest.mark.parametrize("warmup_ratio, steps", [(0.5, 8), (0.3, 7), (0.0, 5), (0.99, 3)])
def test_cosine_warmup_constant_is_the_reference_at_every_step(tiny_model, warmup_ratio, steps):
    """Every optimiser step of a real ``fit`` logs the LR it used: lr * the reference factor."""
    lr = 1e-3
    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}] * steps  # batch 1: one step each
    cfg = TrainConfig(learning_rate=lr, batch_size=1, warmup_ratio=warmup_ratio, lr_scheduler=COSINE_WARMUP_CONSTANT)
    logged = {}
    fit(tiny_model, examples, make_lm_collate(0), lm_loss, cfg, Placement("cpu", "fp32"), epochs=1, seed=0,
        on_log=lambda step, values: logged.setdefault(step, values["learning_rate"]) if "learning_rate" in values
        else None)
    warmup = math.ceil(warmup_ratio * steps)
    reference = cosine_warmup_constant_reference(warmup)
    assert sorted(logged) == list(range(1, steps + 1))
    for step in range(1, steps + 1):  # the LR of optimiser step `step` is factor(step - 1)
        assert logged[step] == pytest.approx(lr * reference(step - 1), rel=1e-12, abs=1e-18), step
    if warmup:
        assert logged[1] == 0.0  # the warm-up starts at 0


def test_the_scheduler_equals_the_reference_over_long_runs(tmp_path):
    """The transformers scheduler the backend builds, stepped over many runs' lengths."""
    from transformers import TrainingArguments
    from transformers.optimization import get_scheduler

    from kembed.trainer import scheduler_arguments

    for total in (1, 2, 10, 97, 1000):
        for ratio in (0.0, 0.05, 0.1, 0.5):
            args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to="none",
                                     **scheduler_arguments(COSINE_WARMUP_CONSTANT))
            warmup = args.get_warmup_steps(total)
            assert warmup == math.ceil(ratio * total)
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                      num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
            reference = cosine_warmup_constant_reference(warmup)
            for step in range(total):
                assert scheduler.get_last_lr()[0] == pytest.approx(reference(step), rel=1e-12, abs=1e-15), (total, step)
                optimizer.step()
                scheduler.step()


def test_a_non_finite_loss_stops_training_with_a_training_error(tiny_model):
    """A NaN loss at the second step raises TrainingError naming that step, after the first
    step was logged; before, transformers logged the window's mean instead and trained on NaN."""
    from kembed.errors import TrainingError

    calls = []

    def loss_at_step_two(model, batch):
        loss, metrics = lm_loss(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}] * 4
    logged = []
    with pytest.raises(TrainingError, match="optimizer step 2: loss nan"):
        fit(tiny_model, examples, make_lm_collate(0), loss_at_step_two, TrainConfig(batch_size=1, checkpoints=False),
            Placement("cpu", "fp32"), epochs=1, seed=0, on_log=lambda step, values: logged.append(step))
    assert logged == [1, 2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_os_after_every_cpu_step(tiny_model, monkeypatch):
    """Chunks below glibc's mmap threshold, freed behind one still in use, stay resident until
    :func:`release_freed_memory`; :func:`fit` calls it after every optimiser step on CPU."""
    import kembed.trainer as trainer

    def resident_mb():
        return int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    chunks = [bytearray(100_000) for _ in range(2000)]  # 200 MB from the heap
    last = chunks[-1]  # noqa: F841  (keeps the heap's top in use, so free() cannot shrink it)
    del chunks
    before = resident_mb()
    assert trainer.release_freed_memory() and resident_mb() < before - 100

    calls = []
    monkeypatch.setattr(trainer, "release_freed_memory", lambda: calls.append(1))
    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}] * 4
    fit(tiny_model, examples, make_lm_collate(0), lm_loss, TrainConfig(batch_size=1, checkpoints=False),
        Placement("cpu", "fp32"), epochs=1, seed=0)
    assert len(calls) == 4


def test_a_padded_batch_under_ddp_gets_the_loss_it_gets_alone(tiny_model, tmp_path):
    """A multi-process trainer hands the loss a DistributedDataParallel wrapper, which does not
    forward ``config``: the padded-batch mask must see through it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    batch = make_lm_collate(0)([{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 1, 1, 1, 1]},
                                {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}])
    assert not batch["attention_mask"].all()
    alone = lm_loss(tiny_model, batch)[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = lm_loss(DistributedDataParallel(tiny_model), batch)[0]
    finally:
        dist.destroy_process_group()
    assert wrapped.item() == pytest.approx(alone.item(), abs=1e-6)


# ----------------------------------------------------------------------------- weights: bf16, compile


def corpus_examples(tokenizer) -> list[dict]:
    """The conftest corpus as LM examples: every token but the first is scored."""
    from conftest import CORPUS

    rows = [tokenizer(text)["input_ids"] for text in CORPUS]
    return [{"input_ids": r, "loss_mask": [0] + [1] * (len(r) - 1)} for r in rows]


def train_curve(tokenizer, cfg: TrainConfig, placement: Placement, steps: int, loss_fn=lm_loss):
    """Losses of ``steps`` optimiser steps of a fresh tiny model, each on the whole corpus."""
    from conftest import build_tiny_model

    model = build_tiny_model(tokenizer)
    examples = corpus_examples(tokenizer)
    losses = []
    fit(model, examples * steps, make_lm_collate(tokenizer.pad_token_id), loss_fn,
        cfg.model_copy(update={"batch_size": len(examples), "warmup_ratio": 0.0, "checkpoints": False}), placement,
        epochs=1, seed=0, on_log=lambda step, values: losses.append(values["loss"]) if "loss" in values else None)
    return model, losses


def test_bf16_weights_with_kahan_adamw_track_fp32_where_plain_bf16_adamw_stalls(tiny_tokenizer, monkeypatch):
    """At a learning rate whose AdamW updates are below a bf16 weight's resolution, pure bf16
    training with optimi's Kahan-summed AdamW follows the fp32 loss curve; without Kahan
    summation the updates round away (lr 3e-5, 20 steps: fp32 drops 0.03 nats, Kahan stays
    within 0.0002 of it (0.0016 with an unseeded compensation), plain bf16 AdamW ends 0.02 off;
    plain was 0.018-0.022 off over 3 initialisations)."""
    import kembed.trainer

    steps, cfg = 20, TrainConfig(learning_rate=3e-5)
    _, reference = train_curve(tiny_tokenizer, cfg, Placement("cpu", "fp32"), steps)
    seen = []

    def watched_loss(model, batch):  # what the weights and the arithmetic are inside a step
        seen.append((next(model.parameters()).dtype, torch.is_autocast_enabled("cpu")))
        return lm_loss(model, batch)

    bf16 = cfg.model_copy(update={"weights": "bf16"})
    model, kahan = train_curve(tiny_tokenizer, bf16, Placement("cpu", "bf16"), steps, watched_loss)
    spec = kembed.trainer.optimizer_spec
    monkeypatch.setattr(kembed.trainer, "optimizer_spec", lambda c, kahan_sum=True: spec(c, kahan_sum=False))
    _, plain = train_curve(tiny_tokenizer, bf16, Placement("cpu", "bf16"), steps)

    assert set(seen) == {(torch.bfloat16, False)} and len(seen) == steps  # bf16 weights, no autocast
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # and they stay bf16 (saved as bf16)
    assert len(reference) == len(kahan) == len(plain) == steps
    assert reference[0] - reference[-1] > 0.02  # fp32 learns at this rate
    kahan_off = max(abs(a - b) for a, b in zip(kahan, reference))
    plain_off = max(abs(a - b) for a, b in zip(plain, reference))
    assert kahan_off < 0.002, kahan_off
    assert plain_off > 5 * kahan_off, (plain_off, kahan_off)


def test_the_seeded_kahan_compensation_keeps_the_bits_the_cast_rounded_away():
    """One weight vector stepped by fp32 AdamW and by bf16 Kahan AdamW on the same gradients
    (10 steps, lr 1e-5, weights ~0.1 whose bf16 step is ~5e-4): with the compensation seeded
    (:func:`kembed.trainer.seed_kahan_compensation`) the bf16 weight is the fp32 one rounded
    (measured 99.8% of entries) and weight + compensation is within 9e-6 of it; unseeded, what
    the cast rounded away is lost (88%, 1e-3 off)."""
    from kembed.trainer import make_optimizer

    torch.manual_seed(0)
    w0 = torch.randn(4096) * 0.1  # [4096]
    grads = [torch.randn(4096) * 1e-3 for _ in range(10)]
    cfg = TrainConfig(learning_rate=1e-5)

    def train(param, optimizer):
        for g in grads:
            param.grad = g.to(param.dtype)
            optimizer.step()
        return param.detach()

    fp32 = torch.nn.Parameter(w0.clone())
    reference = train(fp32, make_optimizer([fp32], cfg))
    result = {}
    for seeded in (True, False):
        p = torch.nn.Parameter(w0.to(torch.bfloat16))
        residuals = {p: (w0 - w0.to(torch.bfloat16).float()).to(torch.bfloat16)} if seeded else None
        optimizer = make_optimizer([p], cfg.model_copy(update={"weights": "bf16"}), residuals=residuals)
        trained = train(p, optimizer)
        agree = (trained == reference.to(torch.bfloat16)).float().mean().item()
        off = (trained.float() + optimizer.state[p]["kahan_comp"].float() - reference).abs().max().item()
        result[seeded] = agree, off
    assert result[True][0] > 0.99 and result[True][1] < 2e-5, result
    assert result[False][0] < 0.95 and result[False][1] > 1e-4, result


def test_fit_seeds_the_compensation_of_every_trainable_weight(tiny_model, monkeypatch):
    import kembed.trainer

    original, seeded = kembed.trainer.seed_kahan_compensation, []

    def recording(optimizer, residuals):
        original(optimizer, residuals)
        seeded.extend(optimizer.state[p]["kahan_comp"] for group in optimizer.param_groups for p in group["params"])

    monkeypatch.setattr(kembed.trainer, "seed_kahan_compensation", recording)
    fp32 = {id(p): p.detach().clone() for p in tiny_model.parameters()}
    trainable = sum(p.requires_grad for p in tiny_model.parameters())
    cfg = TrainConfig(learning_rate=1e-5, batch_size=1, warmup_ratio=0.0, weights="bf16", checkpoints=False)
    fit(tiny_model, [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}], make_lm_collate(0), lm_loss, cfg,
        Placement("cpu", "bf16"), epochs=1, seed=0)
    assert len(seeded) == trainable and all(c.dtype == torch.bfloat16 and c.abs().max() > 0 for c in seeded)
    p = next(tiny_model.parameters())  # after one step of 1e-5 the weight + compensation is still ~the fp32 one
    comp = next(c for c in seeded if c.shape == p.shape)
    assert (p.detach().float() + comp.float() - fp32[id(p)]).abs().max() < 3e-5


def test_bf16_weights_train_a_lora_adapter(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}] * 3
    cfg = TrainConfig(learning_rate=1e-2, batch_size=1, warmup_ratio=0.0, weights="bf16", checkpoints=False)
    fit(model, examples, make_lm_collate(0), lm_loss, cfg, Placement("cpu", "bf16"), epochs=1, seed=0)
    after = dict(model.named_parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(not torch.equal(before[n], after[n].detach().to(before[n].dtype)) for n in before if "lora_B" in n)


def test_a_bf16_run_saves_bf16_and_an_fp32_recipe_trains_it_in_fp32(tiny_model, tmp_path):
    """transformers loads a saved bf16 model in bf16; ``weights: fp32`` casts it back up before
    training, so SFT after a bf16 CPT run (``init_from``) does not step bf16 weights uncompensated."""
    from kembed.models import load_model
    from kembed.trainer import cast_for_training

    cast_for_training(tiny_model, "bf16")
    tiny_model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), Placement("cpu", "bf16"), trainable=True)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    cast_for_training(loaded, "fp32")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_option_errors_are_one_line(monkeypatch):
    from kembed.errors import ConfigError
    from kembed.trainer import check_train_options

    check_train_options(TrainConfig(weights="bf16", compile=True), Placement("cpu", "bf16"))  # both can run here
    with pytest.raises(ConfigError, match="train.weights = bf16 .* precision is fp32") as err:
        check_train_options(TrainConfig(weights="bf16"), Placement("cpu", "fp32"))
    assert "\n" not in str(err.value)
    monkeypatch.setenv("CXX", "kembed-no-such-compiler")
    with pytest.raises(ConfigError, match="train.compile = true needs .* C\\+\\+ compiler") as err:
        check_train_options(TrainConfig(compile=True), Placement("cpu", "fp32"))
    assert "\n" not in str(err.value)


def test_the_fp32_optimizer_spec_is_what_the_trainer_builds(tmp_path):
    """:func:`kembed.trainer.optimizer_spec` (what benchmarks step with) against transformers'
    ``adamw_torch_fused``, which ``fit`` asks for under fp32 weights."""
    from transformers import Trainer, TrainingArguments

    from kembed.trainer import ADAM_BETA1, optimizer_spec

    cfg = TrainConfig(learning_rate=3e-4, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch_fused", learning_rate=cfg.learning_rate,
                             adam_beta1=ADAM_BETA1, adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.adam_epsilon,
                             weight_decay=cfg.weight_decay, report_to="none", use_cpu=True)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    ours_cls, ours = optimizer_spec(cfg)
    assert ours_cls is cls
    assert {k: v for k, v in ours.items() if k != "weight_decay"} == kwargs  # the Trainer's groups set the decay
    bf16_cls, bf16 = optimizer_spec(cfg.model_copy(update={"weights": "bf16"}))
    assert bf16_cls.__module__.startswith("optimi") and bf16["kahan_sum"] is True
    assert bf16["betas"] == (ADAM_BETA1, 0.95) and bf16["eps"] == 1e-6 and bf16["weight_decay"] == 0.1


@pytest.mark.slow  # inductor compiles the forward and backward graphs: 35-80 s on 2 contended cores
def test_compiled_training_matches_eager(tiny_tokenizer):
    cfg = TrainConfig(learning_rate=1e-3)
    _, eager = train_curve(tiny_tokenizer, cfg, Placement("cpu", "fp32"), 3)
    _, compiled = train_curve(tiny_tokenizer, cfg.model_copy(update={"compile": True}), Placement("cpu", "fp32"), 3)
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_a_bf16_weights_run_saves_evaluates_and_resumes_exactly(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    """``kembed train sft train.weights=bf16``: the saved model is bf16, ``kembed eval`` reads it,
    and a run interrupted in its second epoch resumes (weights and optimi's state, Kahan
    compensation included, from the checkpoint) to the uninterrupted run's weights exactly."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from kembed.cli import app

    def train(out, *extra):
        args = ["train", "sft", "--output", out, f"model={tiny_model_dir}", "limit=4", "validation=2",
                "precision=bf16", "train.weights=bf16", "train.batch_size=2", "train.learning_rate=1e-3",
                "train.warmup_ratio=0", "eval.limit=2", "sft.epochs=2", *extra]
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a).exit_code == 0
    weights = load_file(a / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    result = CliRunner().invoke(app, ["eval", "--domain", "current-events", "--model", str(a), "--limit", "2",
                                      "--output", str(tmp_path / "ev")], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    restore = interrupt_training_at(monkeypatch, 3)  # 2 steps per epoch: the first step of epoch 2
    assert train(b).exit_code == 130
    restore()
    result = CliRunner().invoke(app, ["train", "sft", "--output", str(b), "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resumed = load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)

    result = train(tmp_path / "c", "precision=fp32")
    assert result.exit_code == 2 and "train.weights = bf16" in result.output
