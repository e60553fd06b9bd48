"""The trainer backend's LR schedules: the RLAG authors' cosine warm-up then constant schedule,
now transformers' warmup-stable-decay, against the formula kembed used to compute itself."""

from __future__ import annotations

import math

import pytest
import torch

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
