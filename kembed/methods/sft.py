"""SFT: supervised fine-tuning on question -> gold answer in the chat template, loss on the
answer tokens only (methods.md, "SFT"; the reference shows the question without its options).
"""

from __future__ import annotations

from pydantic import Field

from kembed.config import Strict
from kembed.methods.common import chat_answer_ids, fit_lm, save_examples
from kembed.records import QARecord

NAME = "sft"
DESCRIPTION = "SFT: question -> gold answer in the chat template, loss on the answer tokens"


class Config(Strict):
    """The ``sft:`` recipe section.

    Attributes:
        epochs: passes over the training records (reference: 15 at lr 5e-6).
        show_options: list the options in the prompt (the reference does not).
    """

    epochs: float = Field(3, gt=0)
    show_options: bool = False


def user_prompt(record: QARecord, prompts, show_options: bool) -> str:
    """The user turn: the closed-book chat prompt, optionally followed by the labelled options."""
    text = prompts.chat_prompt(record, None)
    if show_options:
        text += "\n" + "\n".join(f"{label}. {option}" for label, option in zip(record.labels, record.options))
    return text


def build_example(tokenizer, record: QARecord, prompts, cfg: Config) -> dict:
    """``{"input_ids", "loss_mask"}``: the chat with the gold answer; the mask covers the answer."""
    ids, mask = chat_answer_ids(tokenizer, user_prompt(record, prompts, cfg.show_options), record.answer, "answer")
    return {"input_ids": ids, "loss_mask": mask}


def run_stage(ctx, cfg: Config, label: str) -> None:
    """Train SFT on ``ctx.records`` through the shared backend (used by ``cpt-sft`` too)."""
    save_examples(ctx, label, [{"prompt": user_prompt(r, ctx.config.prompts, cfg.show_options), "completion": r.answer}
                               for r in ctx.records])
    examples = [build_example(ctx.tokenizer, r, ctx.config.prompts, cfg) for r in ctx.records]
    fit_lm(ctx, examples, cfg.epochs, label)


def train(ctx) -> None:
    """One stage: SFT on the training records, then save (skipped when resuming a finished run)."""
    if ctx.run.state.get("iterations_done", 0) < 1:
        run_stage(ctx, ctx.method_config, "sft")
        ctx.finish_iteration(1)
