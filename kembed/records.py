"""The canonical QA record every domain loader produces and every method consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class QARecord:
    """One multiple-choice question with its knowledge snippets.

    Attributes:
        id: stable id, unique within a domain and split (``"<split>-<source idx>"``).
        domain: domain name (``"medical"``, ``"current-events"``, ...).
        split: ``"train"``, ``"dev"`` or ``"test"``.
        question: the question text (for BarExam dev: fact pattern + question).
        options: option texts in label order.
        labels: option labels in the same order (``("A", "B", ...)``).
        answer_index: index of the gold option in ``options``.
        knowledge: knowledge snippets Z for the question (the source ``ctx`` split on
            newlines, empty lines removed); empty when the source has none.
    """

    id: str
    domain: str
    split: str
    question: str
    options: tuple[str, ...]
    labels: tuple[str, ...]
    answer_index: int
    knowledge: tuple[str, ...] = ()

    @property
    def answer(self) -> str:
        """The gold option's text."""
        return self.options[self.answer_index]

    @property
    def answer_label(self) -> str:
        """The gold option's label (``"A"``...)."""
        return self.labels[self.answer_index]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return asdict(self)
