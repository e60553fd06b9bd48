"""The trainer backend every method trains through: a ``transformers.Trainer`` whose loss a
method supplies, configured from the recipe's ``train`` section.

The backend owns the optimiser (AdamW), the LR schedule, gradient accumulation and clipping,
precision (bf16 autocast when the placement says so, or pure bf16 weights with ``train.weights:
bf16``), optional ``torch.compile``, seeding, progress display and metric logging into the run
directory. A method supplies examples, a collator and a loss function.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from kembed import distributed
from kembed.config import TrainConfig
from kembed.errors import ConfigError, TrainingError
from kembed.models import Placement

#: ``loss_fn(model, batch) -> (loss, metrics)``: a scalar loss tensor and floats to log.
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]

#: ``train.lr_scheduler`` value of the RLAG authors' schedule (their train.py; see :func:`scheduler_arguments`).
COSINE_WARMUP_CONSTANT = "cosine_warmup_constant"


def scheduler_arguments(name: str) -> dict:
    """The ``TrainingArguments`` fields of the ``train.lr_scheduler`` value ``name``: a
    transformers scheduler name as it is, or :data:`COSINE_WARMUP_CONSTANT`, the RLAG authors'
    LR factor ``0.5 * (1 - cos(pi * step / warmup_steps))`` for ``step < warmup_steps`` (0 at
    step 0), then 1 (constant), with ``warmup_steps = ceil(warmup_ratio * total optimiser
    steps)``: transformers' ``warmup_stable_decay`` with a cosine warm-up and no decay."""
    if name == COSINE_WARMUP_CONSTANT:
        return {"lr_scheduler_type": "warmup_stable_decay",
                "lr_scheduler_kwargs": {"warmup_type": "cosine", "num_decay_steps": 0}}
    return {"lr_scheduler_type": name}


def per_device_batch_size(batch_size: int) -> int:
    """Each process's share of ``train.batch_size``, the global micro-batch of one step over
    all processes (so a recipe trains the same batches on 1 or N processes).

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the number of processes.
    """
    world = distributed.world_size()
    if batch_size % world:
        raise ConfigError(f"train.batch_size = {batch_size} is the global batch of one step and must be a multiple "
                          f"of the {world} processes (each trains batch_size / processes examples)")
    return batch_size // world


#: AdamW's beta1: transformers' ``TrainingArguments.adam_beta1`` default, which ``fit`` keeps.
ADAM_BETA1 = 0.9


def check_train_options(cfg: TrainConfig, placement: Placement) -> None:
    """Fail early on ``train.weights``/``train.compile`` settings that cannot run here.

    ``weights: bf16`` is pure bf16 arithmetic, so it needs a bf16 placement: under ``fp32``
    (forced, or ``auto`` on a CPU without native bf16) the two settings contradict each other.
    ``compile`` needs, on CPU, a C++ compiler (inductor builds C++ kernels): ``$CXX``, else ``g++``.

    Raises:
        ConfigError: bf16 weights under an fp32 placement; ``torch-optimi`` missing for bf16
            weights; no C++ compiler (``$CXX``, else ``g++``) for ``compile`` on CPU.
    """
    if cfg.weights == "bf16":
        if placement.precision != "bf16":
            raise ConfigError(f"train.weights = bf16 trains in bf16 arithmetic but the precision is "
                              f"{placement.precision} (no native bf16 here, or forced): set precision=bf16 "
                              f"or train.weights=fp32")
        try:
            import optimi  # noqa: F401
        except ImportError:
            raise ConfigError("train.weights = bf16 needs torch-optimi (Kahan-summed AdamW): "
                              "pip install torch-optimi") from None
    if cfg.compile:
        import os
        import shutil

        compiler = os.environ.get("CXX", "g++")
        if placement.device == "cpu" and shutil.which(compiler) is None:
            raise ConfigError(f"train.compile = true needs a C++ compiler on CPU (inductor builds C++ kernels): "
                              f"'{compiler}' is not on PATH (set $CXX)")


def weights_dtype(weights: str) -> torch.dtype:
    """The torch dtype of a ``train.weights`` value (``"fp32"`` or ``"bf16"``)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[weights]


def cast_for_training(model, weights: str) -> dict:
    """Put ``model``'s weights in the dtype ``train.weights`` asks for, in place.

    ``bf16`` casts the whole model (base and LoRA adapters) to bf16. ``fp32`` leaves an fp32
    model as it is and casts one whose trainable weights are not fp32 (a model saved by a bf16
    run, which transformers loads in bf16) up to fp32: AdamW steps on bf16 weights without
    compensation lose most small updates.

    Returns:
        For a cast from fp32 to bf16, ``{parameter: w - bf16(w)}`` over the trainable
        parameters: what the cast rounded away, in bf16, to seed the Kahan compensation with
        (:func:`seed_kahan_compensation`). Otherwise ``{}``.
    """
    dtype = weights_dtype(weights)
    if not any(p.requires_grad and p.dtype != dtype for p in model.parameters()):
        return {}
    residuals = {}
    if dtype == torch.bfloat16:
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float32:
                residuals[p] = (p.detach() - p.detach().to(dtype).float()).to(dtype)
    model.to(dtype)  # in place: the same Parameter objects, now bf16
    return residuals


def seed_kahan_compensation(optimizer, residuals: dict) -> None:
    """Start optimi's Kahan compensation of each parameter in ``residuals`` at what the cast to
    bf16 rounded away (:func:`cast_for_training`), so that weight + compensation is the fp32
    weight (to about 16 significant bits) from the first step.

    Without it every compensation starts at 0 and every weight exactly on a bf16 value, so an
    update smaller than half a bf16 step moves no weight until the compensations fill up: on
    SmolLM2-135M at lr 1e-5 (weights around 0.1, bf16 step 5e-4) the loss then lagged the fp32
    master weights by 1 nat after 5 steps and 2.7 nats after 20; seeded, it stayed within 0.03
    of them over the 6 steps measured. It relies on the state layout of torch-optimi 0.3
    (``exp_avg``, ``exp_avg_sq``, ``kahan_comp``, which optimi creates only for a parameter
    without ``kahan_comp``); a parameter the optimiser does not hold, or not bf16, is left alone.
    """
    for group in optimizer.param_groups:
        if not group.get("kahan_sum"):
            continue
        for p in group["params"]:
            residual = residuals.get(p)
            if residual is not None and p.dtype == torch.bfloat16 and residual.shape == p.shape:
                optimizer.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                          kahan_comp=residual.to(p.device))


def optimizer_spec(cfg: TrainConfig, *, kahan_sum: bool = True) -> tuple[type, dict]:
    """The AdamW class and keyword arguments ``fit`` trains ``cfg.weights`` with (lr, betas =
    (0.9, ``adam_beta2``), eps and weight decay from the recipe).

    ``fp32``: ``torch.optim.AdamW(fused=True)``, what transformers' ``adamw_torch_fused`` builds.
    ``bf16``: torch-optimi's ``AdamW`` (decoupled weight decay as torch's: ``lr * weight_decay``)
    with Kahan summation (``kahan_sum``; False only to measure what it buys): its state is bf16
    and a bf16 compensation buffer keeps the low bits that a bf16 weight update rounds away
    (optimi docs, "Low Precision Training with Kahan Summation"). transformers' own optimi
    integration (``optim="stable_adamw"``) is StableAdamW, whose update clipping is not AdamW.
    """
    kwargs = {"lr": cfg.learning_rate, "betas": (ADAM_BETA1, cfg.adam_beta2), "eps": cfg.adam_epsilon,
              "weight_decay": cfg.weight_decay}
    if cfg.weights == "fp32":
        return torch.optim.AdamW, {**kwargs, "fused": True}
    from optimi import AdamW

    return AdamW, {**kwargs, "kahan_sum": kahan_sum}


def make_optimizer(params, cfg: TrainConfig, *, kahan_sum: bool = True,
                   residuals: dict | None = None) -> torch.optim.Optimizer:
    """The optimiser ``fit`` uses for ``cfg.weights`` (:func:`optimizer_spec`) over ``params``, for
    benchmarks and tests that step a model themselves; ``residuals`` (from
    :func:`cast_for_training`) seed its Kahan compensation as ``fit`` does. Unlike ``fit``,
    weight decay applies to every parameter given (the Trainer exempts biases and norm weights)."""
    cls, kwargs = optimizer_spec(cfg, kahan_sum=kahan_sum)
    optimizer = cls(params, **kwargs)
    if residuals:
        seed_kahan_compensation(optimizer, residuals)
    return optimizer


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list of already-tokenized examples."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class MethodTrainer(Trainer):
    """A ``Trainer`` whose loss comes from the method (``loss_fn``); the floats the loss
    function returns are averaged between logging steps and logged next to the loss."""

    def __init__(self, *args, loss_fn: LossFn, kahan_residuals: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.kahan_residuals = kahan_residuals  # seeds the bf16 optimiser's compensation once
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: scale it for GA
        self._pending = defaultdict(list)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.kahan_residuals:  # before a resumed checkpoint's state, which replaces it
            seed_kahan_compensation(optimizer, self.kahan_residuals)
            self.kahan_residuals = None
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.loss_fn(model, inputs)
        for key, value in metrics.items():
            self._pending[key].append(value)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a step's log: on every rank at once, so the gather below is safe
            merged = defaultdict(list)
            for rank_values in distributed.per_rank(dict(self._pending)):  # every rank's micro-batches
                for key, values in rank_values.items():
                    merged[key].extend(values)
            logs.update({k: sum(v) / len(v) for k, v in merged.items()})
            self._pending.clear()
        super().log(logs, *args, **kwargs)


class _RunLogger(TrainerCallback):
    """Sends each training log to ``on_log(step, logs)`` and advances a progress callback.

    Raises:
        TrainingError: a logged loss or gradient norm is not finite (checked after the log is
            sent, so the run's metrics keep the step).
    """

    def __init__(self, log_fn, step_fn):
        self.log_fn, self.step_fn = log_fn, step_fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log_fn and logs:
            self.log_fn(state.global_step, dict(logs))
        bad = {k: logs[k] for k in ("loss", "grad_norm") if k in (logs or {}) and not math.isfinite(logs[k])}
        if bad:
            raise TrainingError(
                f"training diverged at optimizer step {state.global_step}: "
                + ", ".join(f"{k} {v}" for k, v in bad.items())
                + "; the weights are not saved (precision=fp32 or a lower train.learning_rate may help)")

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_fn:
            self.step_fn(state.global_step, state.max_steps)


def release_freed_memory() -> bool:
    """Hand the free pages of glibc's heaps back to the OS (``malloc_trim(0)``). On CPU, batches
    of varying length allocate activations of ever new sizes, which glibc serves from heaps
    that fragment: without it, the resident memory of a RAFT training on medical grew from 9.3
    to 16.6 GB over 31 steps, until the out-of-memory killer ended it. :func:`fit` calls it
    after every optimiser step on CPU; ``python benchmarks/fragmentation.py`` measures it
    against glibc's default.

    Returns:
        Whether memory was released (False where the C library is not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim(0) == 1
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False


class _ReleaseFreedMemory(TrainerCallback):
    """Calls :func:`release_freed_memory` after every optimiser step."""

    def on_step_end(self, args, state, control, **kwargs):
        release_freed_memory()


def fit(model, examples: list[dict], collate: Callable[[list[dict]], dict], loss_fn: LossFn,
        cfg: TrainConfig, placement: Placement, *, epochs: float, seed: int,
        checkpoint_dir: Path | None = None,
        on_log: Callable[[int, dict], None] | None = None,
        on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train ``model`` in place on ``examples`` with a fresh optimiser and LR schedule.

    Args:
        model: the policy (HF or peft model) on ``placement.device``.
        examples: tokenized examples; ``collate`` turns a list of them into a batch dict.
        loss_fn: the method's loss (see ``LossFn``).
        cfg: the recipe's ``train`` section; ``batch_size`` is the global micro-batch, split
            evenly over the processes of a multi-process launch (DDP through accelerate).
        placement: device and precision.
        epochs: passes over ``examples``.
        seed: seeds the shuffling and any randomness of the step.
        checkpoint_dir: when given, a checkpoint (weights, optimiser, scheduler, RNG) is kept
            there after every epoch, and a later call with the same directory resumes from it.
        on_log: called with (global step, logged values) at every optimiser step.
        on_step: called with (global step, total steps) for progress display.

    Precision: ``cfg.weights`` ``fp32`` trains fp32 weights with fused AdamW, under bf16
    autocast when ``placement.precision`` is bf16; ``bf16`` casts ``model`` to bf16 in place
    (it stays bf16 afterwards, and saves as bf16) and trains it without autocast with optimi's
    Kahan-summed AdamW (:func:`optimizer_spec`), its compensation seeded with what the cast
    rounded away (:func:`seed_kahan_compensation`). ``cfg.compile`` compiles the model with
    ``torch.compile`` (inductor, through transformers' ``torch_compile``): the first steps, and
    any step with a new shape, include the compilation. On CPU, freed heap memory goes back to
    the OS after every step (:func:`release_freed_memory`).

    Returns:
        The final ``TrainOutput.metrics`` (train_loss, train_runtime, ...).

    Raises:
        ConfigError: ``cfg.batch_size`` is not a multiple of the number of processes; the
            options cannot run here (:func:`check_train_options`).
        TrainingError: a step's loss or gradient norm is not finite (nothing of that step is
            checkpointed).
    """
    per_device = per_device_batch_size(cfg.batch_size)
    check_train_options(cfg, placement)
    residuals = cast_for_training(model, cfg.weights)
    with tempfile.TemporaryDirectory(prefix="kembed-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=str(checkpoint_dir or scratch),
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate,
            **scheduler_arguments(cfg.lr_scheduler),
            warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
            max_grad_norm=cfg.max_grad_norm,
            weight_decay=cfg.weight_decay,
            optim="adamw_torch_fused",  # one fused kernel per step; make perf measured it faster than for-each
            # (bf16 weights: replaced by optimi's Kahan-summed AdamW, optimizer_cls_and_kwargs below)
            adam_beta2=cfg.adam_beta2,
            adam_epsilon=cfg.adam_epsilon,
            num_train_epochs=epochs,
            seed=seed,
            data_seed=seed,
            bf16=placement.precision == "bf16" and cfg.weights == "fp32",  # autocast over fp32 weights only
            torch_compile=cfg.compile,
            use_cpu=placement.device == "cpu",
            logging_steps=1,
            logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and stops the run: _RunLogger)
            save_strategy="epoch" if checkpoint_dir else "no",
            save_total_limit=1,
            save_only_model=False,
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            # every trainable weight gets a gradient at every step, and a method's loss may run
            # several forward passes per step (RLAG): DDP must not search for unused parameters
            ddp_find_unused_parameters=False,
        )
        trainer = MethodTrainer(model=model, args=args, train_dataset=ListDataset(examples),
                                data_collator=collate, loss_fn=loss_fn,
                                optimizer_cls_and_kwargs=optimizer_spec(cfg) if cfg.weights == "bf16" else None,
                                kahan_residuals=residuals,
                                callbacks=[_RunLogger(on_log, on_step),
                                           *([_ReleaseFreedMemory()] if placement.device == "cpu" else [])])
        # the trainer's default console printer duplicates our own logging
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        resume = checkpoint_dir is not None and any(Path(checkpoint_dir).glob("checkpoint-*"))
        return trainer.train(resume_from_checkpoint=True if resume else None).metrics
