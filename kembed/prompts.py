"""Prompt formats shared by evaluation and the methods (domain-neutral, configurable per recipe).

The raw option-scoring prompts follow the RLAG evaluation protocol (methods.md, "Shared
evaluation protocol"): the scored text is ``prompt + answer_prefix + option`` with no
instruction, no chat template and no special tokens. The chat prompts are the user turns that
training methods (and chat-format scoring, :mod:`kembed.scoring`) wrap in the model's chat
template. :data:`PRESETS` holds named template sets (``bare``, ``reference``).
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kembed.records import QARecord

#: Option-scoring formats: the paper's bare text, the model's chat template, or RAFT's (the chat
#: template with RAFT's instruction; the model writes its reasoning and the options are scored
#: after ``<ANSWER>:``, :mod:`kembed.scoring`).
FORMATS = ("raw", "chat", "raft")

#: RAFT's markers (Zhang et al. 2024, the gorilla raft/ code): quotes from the documents go between
#: ``QUOTE_BEGIN`` and ``QUOTE_END``; the final answer follows ``ANSWER_MARK``.
QUOTE_BEGIN, QUOTE_END, ANSWER_MARK = "##begin_quote##", "##end_quote##", "<ANSWER>:"
RAFT_INSTRUCTION = (f"Answer using the documents: quote what supports the answer between {QUOTE_BEGIN} and "
                    f"{QUOTE_END}, then give the final answer after '{ANSWER_MARK}'.")


def documents_prompt(question: str, documents: Sequence[str]) -> str:
    """The retrieval-augmented user turn shared by RAFT, SimRAG Stage II and chat-format
    scoring: each document in ``<DOCUMENT>...</DOCUMENT>`` (the RAFT code's layout), one per
    line, a blank line, then ``Question: <question>``. No documents: ``Question: <question>``."""
    docs = "\n".join(f"<DOCUMENT>{d}</DOCUMENT>" for d in documents)
    return f"{docs}\n\nQuestion: {question}" if docs else f"Question: {question}"


def raft_prompt(question: str, documents: Sequence[str]) -> str:
    """RAFT's user turn, in training and in ``raft``-format scoring: :func:`documents_prompt`,
    then :data:`RAFT_INSTRUCTION` on its own line."""
    return f"{documents_prompt(question, documents)}\n{RAFT_INSTRUCTION}"


def answer_stem(reasoning: str) -> str:
    """The model's RAFT-format reasoning up to and including ``<ANSWER>:``, where the options are
    scored; reasoning that never wrote the marker gets it on a line of its own after it."""
    cut = reasoning.find(ANSWER_MARK)
    if cut >= 0:
        return reasoning[: cut + len(ANSWER_MARK)]
    return f"{reasoning.rstrip()}\n{ANSWER_MARK}".lstrip()


_REFERENCE_SAMPLING = "Answer the following question directly, without explaining your answer.\n"
_REFERENCE_CHAT = (
    "You answer single-choice questions by picking one of the given options. The options are separated "
    "by semicolons (;). Reply with the exact text of the one correct option and nothing else.\n"
    "Example:\nQuestion: Which planet is closest to the Sun?\nOptions: Venus; Mercury; Earth; Mars\n"
    "Answer: Mercury\nNow answer this question:\n")

#: Named template sets (``prompts.preset`` in a recipe). ``bare``: the field defaults below.
#: ``reference``: the structure of the RLAG authors' prompts (template.py of their code), in
#: kembed's own words and domain-neutral: the sampling prompts put an instruction before the
#: (knowledge and) question; the training chat prompts carry an instruction with a worked
#: example, the knowledge, the question and the options separated by semicolons (the authors'
#: code lists the option texts without letters), ending in "Answer:".
PRESETS: dict[str, dict[str, str]] = {
    "bare": {},
    "reference": {
        "closed_book": _REFERENCE_SAMPLING + "Question: {question}",
        "with_knowledge": _REFERENCE_SAMPLING + "Relevant knowledge: {knowledge}\nQuestion: {question}",
        "chat_closed_book": _REFERENCE_CHAT + "Question: {question}\nOptions: {options}\nAnswer:",
        "chat_with_knowledge": _REFERENCE_CHAT + "Relevant knowledge: {knowledge}\nQuestion: {question}\n"
                                                 "Options: {options}\nAnswer:",
    },
}


class PromptFormat(BaseModel):
    """Templates with ``{question}``, ``{knowledge}`` (snippets joined by newlines) and
    ``{options}`` (option texts joined by ``"; "``).

    Attributes:
        preset: a named template set from :data:`PRESETS` (``bare`` or ``reference``); templates
            given next to it override the preset's.
        closed_book: option-scoring prompt without knowledge (paper: the bare question).
        with_knowledge: option-scoring prompt with the knowledge snippets.
        answer_prefix: text between the prompt and the option when scoring.
        chat_closed_book: chat user turn without knowledge (training, and the closed-book user
            turn of chat-format scoring).
        chat_with_knowledge: chat user turn with knowledge (RLAG training; chat-format scoring
            with documents uses :func:`documents_prompt`).
        knowledge_max_tokens: budget for the knowledge in any prompt; snippets are kept in
            order and the one that crosses the budget is cut (``0`` = no limit).
    """

    model_config = ConfigDict(extra="forbid")

    preset: Literal["bare", "reference"] = "bare"
    closed_book: str = "{question}"
    with_knowledge: str = "{knowledge}\n\n{question}"
    answer_prefix: str = " "
    chat_closed_book: str = "{question}"
    chat_with_knowledge: str = "Knowledge:\n{knowledge}\n\nQuestion: {question}"
    knowledge_max_tokens: int = Field(384, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = {**PRESETS[data["preset"]], **data}
        return data

    @staticmethod
    def _fill(template: str, record: QARecord, knowledge: tuple[str, ...] | None) -> str:
        return template.format(question=record.question, knowledge="\n".join(knowledge or ()),
                               options="; ".join(record.options))

    def scoring_prompt(self, record: QARecord, knowledge: tuple[str, ...] | None) -> str:
        """The option-scoring prompt; ``knowledge=None`` means closed-book."""
        return self._fill(self.closed_book if knowledge is None else self.with_knowledge, record, knowledge)

    def chat_prompt(self, record: QARecord, knowledge: tuple[str, ...] | None) -> str:
        """The chat user turn; ``knowledge=None`` means closed-book."""
        return self._fill(self.chat_closed_book if knowledge is None else self.chat_with_knowledge, record, knowledge)


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
