"""CPT+SFT: SFT started from the CPT model (methods.md, "SFT"), as two stages of one run:
stage 1 trains CPT with the ``cpt-sft.cpt`` settings, stage 2 SFT with ``cpt-sft.sft``.
A run interrupted in stage 2 resumes there. (``--init-from RUN`` on ``sft`` does the same from
a separate CPT run.)"""

from __future__ import annotations

from pydantic import Field

from kembed.config import Strict
from kembed.methods import cpt as cpt_method
from kembed.methods import sft as sft_method

NAME = "cpt-sft"
DESCRIPTION = "CPT then SFT in one run (SFT started from the CPT weights)"


class Config(Strict):
    """The ``cpt-sft:`` recipe section: a ``cpt:`` and an ``sft:`` subsection."""

    cpt: cpt_method.Config = Field(default_factory=cpt_method.Config)
    sft: sft_method.Config = Field(default_factory=sft_method.Config)


def train(ctx) -> None:
    """Stage 1 (CPT) then stage 2 (SFT), each saved when done."""
    done = ctx.run.state.get("iterations_done", 0)
    if done < 1:
        cpt_method.run_stage(ctx, ctx.method_config.cpt, "stage 1 cpt")
        ctx.finish_iteration(1)
    if done < 2:
        sft_method.run_stage(ctx, ctx.method_config.sft, "stage 2 sft")
        ctx.finish_iteration(2)
