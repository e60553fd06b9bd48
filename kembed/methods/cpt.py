"""CPT: continual pre-training, causal-LM loss on every token of the domain knowledge text
(methods.md, "CPT"): each document wrapped BOS + text + EOS, concatenated and cut into
fixed-size token blocks. The text is what the run's ``knowledge`` setting allows
(:meth:`kembed.train.TrainContext.knowledge_documents`): ``records``, the unique knowledge
snippets of the run's training records, the knowledge every method of a comparison sees; or
``knowledge-base``, the domain's knowledge base, as the paper does.
"""

from __future__ import annotations

from pydantic import Field

from kembed.config import Strict
from kembed.methods.common import fit_lm, save_examples

NAME = "cpt"
DESCRIPTION = "CPT: causal-LM loss on the domain knowledge text in fixed-size token blocks"


class Config(Strict):
    """The ``cpt:`` recipe section.

    Attributes:
        block_size: tokens per training block (reference: 256).
        epochs: passes over the blocks.
        max_blocks: use only the first N blocks (``null``: all), for CPU-scale runs.
    """

    block_size: int = Field(256, ge=2)  # a block of one token has no next token to predict
    epochs: float = Field(1, gt=0)
    max_blocks: int | None = Field(None, ge=1)


def token_blocks(tokenizer, documents: list[str], block_size: int) -> list[list[int]]:
    """Concatenate BOS + document + EOS for every document and cut into ``block_size`` blocks;
    the incomplete last block is dropped (as in the reference)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        stream += [bos] + tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def trained_documents(tokenizer, documents: list[str], n_tokens: int) -> list[str]:
    """The documents that start within the first ``n_tokens`` tokens of the :func:`token_blocks`
    stream: those whose text the trained blocks hold (the last one possibly cut)."""
    kept, start = [], 0
    for doc in documents:
        if start >= n_tokens:
            break
        kept.append(doc)
        start += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 2  # BOS + text + EOS
    return kept


def run_stage(ctx, cfg: Config, label: str) -> None:
    """Train CPT on the domain documents through the shared backend (used by ``cpt-sft`` too)."""
    documents = ctx.knowledge_documents()
    blocks = token_blocks(ctx.tokenizer, documents, cfg.block_size)[: cfg.max_blocks]
    ctx.run.log("cpt_corpus", knowledge=ctx.config.knowledge, documents=len(documents), blocks=len(blocks), block_size=cfg.block_size)
    ctx.console.print(f"CPT corpus (knowledge={ctx.config.knowledge}): {len(documents)} documents -> {len(blocks)} blocks of "
                      f"{cfg.block_size} tokens")
    trained = trained_documents(ctx.tokenizer, documents, len(blocks) * cfg.block_size)
    save_examples(ctx, label, [{"text": doc} for doc in trained])
    examples = [{"input_ids": b, "loss_mask": [1] * len(b)} for b in blocks]
    fit_lm(ctx, examples, cfg.epochs, label)


def train(ctx) -> None:
    """One stage: CPT on the domain documents, then save."""
    if ctx.run.state.get("iterations_done", 0) < 1:
        run_stage(ctx, ctx.method_config, "cpt")
        ctx.finish_iteration(1)
