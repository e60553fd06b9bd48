"""Prompt formats shared by evaluation and the methods (domain-neutral, configurable per recipe).

The option-scoring prompts follow the RLAG evaluation protocol (methods.md, "Shared evaluation
protocol"): the scored text is ``prompt + answer_prefix + option`` with no instruction, no chat
template and no special tokens. The chat prompts are the user turns that training methods wrap
in the model's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from kembed.records import QARecord

FORMATS = ("raw", "chat")  # option-scoring formats: the paper's bare text, or the model's chat template


def documents_prompt(question: str, documents: Sequence[str]) -> str:
    """The retrieval-augmented user turn shared by RAFT, SimRAG Stage II and chat-format
    scoring: each document in ``<DOCUMENT>...</DOCUMENT>`` (the RAFT code's layout), one per
    line, a blank line, then ``Question: <question>``. No documents: ``Question: <question>``."""
    docs = "\n".join(f"<DOCUMENT>{d}</DOCUMENT>" for d in documents)
    return f"{docs}\n\nQuestion: {question}" if docs else f"Question: {question}"


class PromptFormat(BaseModel):
    """Templates with ``{question}`` and ``{knowledge}`` (snippets joined by newlines).

    Attributes:
        closed_book: option-scoring prompt without knowledge (paper: the bare question).
        with_knowledge: option-scoring prompt with the knowledge snippets.
        answer_prefix: text between the prompt and the option when scoring.
        chat_closed_book: chat user turn without knowledge (training).
        chat_with_knowledge: chat user turn with knowledge (training).
        knowledge_max_tokens: budget for the knowledge in any prompt; snippets are kept in
            order and the one that crosses the budget is cut (``0`` = no limit).
    """

    model_config = ConfigDict(extra="forbid")

    closed_book: str = "{question}"
    with_knowledge: str = "{knowledge}\n\n{question}"
    answer_prefix: str = " "
    chat_closed_book: str = "{question}"
    chat_with_knowledge: str = "Knowledge:\n{knowledge}\n\nQuestion: {question}"
    knowledge_max_tokens: int = 384

    def scoring_prompt(self, record: QARecord, knowledge: tuple[str, ...] | None) -> str:
        """The option-scoring prompt; ``knowledge=None`` means closed-book."""
        if knowledge is None:
            return self.closed_book.format(question=record.question)
        return self.with_knowledge.format(question=record.question, knowledge="\n".join(knowledge))

    def chat_prompt(self, record: QARecord, knowledge: tuple[str, ...] | None) -> str:
        """The chat user turn; ``knowledge=None`` means closed-book."""
        if knowledge is None:
            return self.chat_closed_book.format(question=record.question)
        return self.chat_with_knowledge.format(question=record.question, knowledge="\n".join(knowledge))


def cut_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (unchanged when shorter or ``max_tokens <= 0``)."""
    if max_tokens <= 0:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def truncate_knowledge(snippets: tuple[str, ...], tokenizer, max_tokens: int) -> tuple[str, ...]:
    """Keep snippets in order within ``max_tokens`` tokens; cut the one that crosses the budget.

    Args:
        snippets: knowledge snippets Z of one question.
        tokenizer: the model's tokenizer (tokens are counted without special tokens).
        max_tokens: the budget; ``0`` or less keeps everything.
    """
    if max_tokens <= 0:
        return tuple(snippets)
    kept, used = [], 0
    for snippet in snippets:
        ids = tokenizer(snippet, add_special_tokens=False)["input_ids"]
        if used + len(ids) <= max_tokens:
            kept.append(snippet)
            used += len(ids)
            continue
        if max_tokens - used > 0:
            kept.append(tokenizer.decode(ids[: max_tokens - used]))
        break
    return tuple(kept)
