"""The trainer backend every method trains through: a ``transformers.Trainer`` whose loss a
method supplies, configured from the recipe's ``train`` section.

The backend owns the optimiser (AdamW), the LR schedule, gradient accumulation and clipping,
precision (bf16 autocast when the placement says so), seeding, progress display and metric
logging into the run directory. A method supplies examples, a collator and a loss function.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from kembed import distributed
from kembed.config import TrainConfig
from kembed.errors import ConfigError
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

    def __init__(self, *args, loss_fn: LossFn, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: scale it for GA
        self._pending = defaultdict(list)

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
    """Sends each training log to ``on_log(step, logs)`` and advances a progress callback."""

    def __init__(self, log_fn, step_fn):
        self.log_fn, self.step_fn = log_fn, step_fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log_fn and logs:
            self.log_fn(state.global_step, dict(logs))

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_fn:
            self.step_fn(state.global_step, state.max_steps)


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

    Returns:
        The final ``TrainOutput.metrics`` (train_loss, train_runtime, ...).

    Raises:
        ConfigError: ``cfg.batch_size`` is not a multiple of the number of processes.
    """
    per_device = per_device_batch_size(cfg.batch_size)
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
            adam_beta2=cfg.adam_beta2,
            adam_epsilon=cfg.adam_epsilon,
            num_train_epochs=epochs,
            seed=seed,
            data_seed=seed,
            bf16=placement.precision == "bf16",
            use_cpu=placement.device == "cpu",
            logging_steps=1,
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
                                callbacks=[_RunLogger(on_log, on_step)])
        # the trainer's default console printer duplicates our own logging
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        resume = checkpoint_dir is not None and any(Path(checkpoint_dir).glob("checkpoint-*"))
        return trainer.train(resume_from_checkpoint=True if resume else None).metrics
