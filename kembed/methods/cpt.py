"""CPT: continual pre-training, causal-LM loss on every token of the domain knowledge text
(methods.md, "CPT"): each document wrapped BOS + text + EOS, concatenated and cut into
fixed-size token blocks. The text is the domain's knowledge base where it has one, else the
unique train-split knowledge snippets; never the test split's.
"""

from __future__ import annotations

from kembed.config import Strict
from kembed.methods.common import fit_lm

NAME = "cpt"
DESCRIPTION = "CPT: causal-LM loss on the domain knowledge text in fixed-size token blocks"


class Config(Strict):
    """The ``cpt:`` recipe section.

    Attributes:
        block_size: tokens per training block (reference: 256).
        epochs: passes over the blocks.
        max_blocks: use only the first N blocks (``null``: all), for CPU-scale runs.
    """

    block_size: int = 256
    epochs: float = 1
    max_blocks: int | None = None


def token_blocks(tokenizer, documents: list[str], block_size: int) -> list[list[int]]:
    """Concatenate BOS + document + EOS for every document and cut into ``block_size`` blocks;
    the incomplete last block is dropped (as in the reference)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        stream += [bos] + tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def run_stage(ctx, cfg: Config, label: str) -> None:
    """Train CPT on the domain documents through the shared backend (used by ``cpt-sft`` too)."""
    from kembed.retrieval import domain_documents

    documents = domain_documents(ctx.config.domain, ctx.config.data_dir)
    blocks = token_blocks(ctx.tokenizer, documents, cfg.block_size)[: cfg.max_blocks]
    ctx.run.log("cpt_corpus", documents=len(documents), blocks=len(blocks), block_size=cfg.block_size)
    ctx.console.print(f"CPT corpus: {len(documents)} documents -> {len(blocks)} blocks of {cfg.block_size} tokens")
    examples = [{"input_ids": b, "loss_mask": [1] * len(b)} for b in blocks]
    fit_lm(ctx, examples, cfg.epochs, label)


def train(ctx) -> None:
    """One stage: CPT on the domain documents, then save."""
    if ctx.run.state.get("iterations_done", 0) < 1:
        run_stage(ctx, ctx.method_config, "cpt")
        ctx.finish_iteration(1)
