"""CPT: continual pre-training, causal-LM loss on every token of the domain knowledge text
(methods.md, "CPT"): each document wrapped BOS + text + EOS, concatenated and cut into
fixed-size token blocks. The text (``cpt.corpus``) is either ``knowledge-base``, the domain's
knowledge base as the paper does (else the unique train-split snippets,
:func:`kembed.retrieval.domain_documents`), or ``train-snippets``, the unique knowledge snippets
of the run's training records: the same knowledge RLAG, RAFT and SimRAG see. Never the test
split's snippets.
"""

from __future__ import annotations

from typing import Literal

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
        corpus: ``knowledge-base`` (the paper) or ``train-snippets`` (the training records'
            snippets, the knowledge the other methods are given).
    """

    corpus: Literal["knowledge-base", "train-snippets"] = "knowledge-base"

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

    if cfg.corpus == "knowledge-base":
        documents = domain_documents(ctx.config.domain, ctx.config.data_dir)
    else:
        documents = list(dict.fromkeys(z for r in ctx.records for z in r.knowledge))  # unique, first-seen order
    blocks = token_blocks(ctx.tokenizer, documents, cfg.block_size)[: cfg.max_blocks]
    ctx.run.log("cpt_corpus", corpus=cfg.corpus, documents=len(documents), blocks=len(blocks), block_size=cfg.block_size)
    ctx.console.print(f"CPT corpus ({cfg.corpus}): {len(documents)} documents -> {len(blocks)} blocks of "
                      f"{cfg.block_size} tokens")
    examples = [{"input_ids": b, "loss_mask": [1] * len(b)} for b in blocks]
    fit_lm(ctx, examples, cfg.epochs, label)


def train(ctx) -> None:
    """One stage: CPT on the domain documents, then save."""
    if ctx.run.state.get("iterations_done", 0) < 1:
        run_stage(ctx, ctx.method_config, "cpt")
        ctx.finish_iteration(1)
