"""The ``rubric`` judge: a language model scores an explanation's logical clarity and factual
accuracy (1-5 each, against the knowledge snippets and the reference answer) and says whether it
fails to explain the answer at all."""

from __future__ import annotations

from pydantic import BaseModel, Field, ValidationError

from kembed.judges import JUDGE_FAILED, ExplanationItem, Judgment
from kembed.judges.client import LanguageModelJudge, extract_json_object

NAME = "rubric"
VERSION = "1"
#: bumped whenever the prompt text changes (part of the settings and of the cache key)
TEMPLATE_VERSION = "rubric-prompt-1"

TEMPLATE = """You are grading the explanation a student gave for the answer to a multiple-choice question.

Question: {question}

Options:
{options}

Reference answer: {answer}

Reference knowledge (treat it as true):
{knowledge}

Student's explanation:
\"\"\"
{explanation}
\"\"\"

Grade the explanation on two criteria, each from 1 (very poor) to 5 (excellent):
- logical_clarity: the reasoning is coherent, easy to follow, and actually leads to the reference answer.
- factual_accuracy: its claims agree with the reference knowledge and contain no false statements.
Set unable_to_explain to true when the explanation does not explain the answer at all (it is empty,
only restates the answer, refuses, or argues for another option).

Reply with only a JSON object, for example:
{{"logical_clarity": 4, "factual_accuracy": 5, "unable_to_explain": false}}"""


class RubricScores(BaseModel):
    """The judge's answer: two 1-5 scores and the unable flag."""

    logical_clarity: int = Field(ge=1, le=5)
    factual_accuracy: int = Field(ge=1, le=5)
    unable_to_explain: bool


def render(item: ExplanationItem) -> str:
    """The rubric prompt for one explanation."""
    labels = "ABCDEFGHIJ"
    options = "\n".join(f"{labels[i]}. {o}" for i, o in enumerate(item.options))
    knowledge = "\n".join(f"- {k}" for k in item.knowledge) or "(none)"
    return TEMPLATE.format(question=item.question, options=options, answer=f"{labels[item.gold]}. "
                           f"{item.options[item.gold]}", knowledge=knowledge, explanation=item.explanation)


def parse(text: str) -> RubricScores | None:
    """The scores in a raw completion (its first JSON object), or None when absent or invalid."""
    obj = extract_json_object(text)
    if obj is None:
        return None
    try:
        return RubricScores.model_validate(obj)
    except ValidationError:
        return None


class RubricJudge(LanguageModelJudge):
    """Scores explanations with a language model on a 1-5 rubric.

    The score in [0, 1] is the mean of ``(clarity - 1) / 4`` and ``(accuracy - 1) / 4``; the
    verdict is ``unable`` when the judge says the explanation does not explain the answer, else
    ``scored``. An answer that does not parse is asked again (a new cache key) up to
    ``max_attempts`` tries in all, then becomes a :data:`JUDGE_FAILED` judgment (score None).

    Args: see :class:`~kembed.judges.client.LanguageModelJudge` (``max_attempts``: tries per explanation).
    """

    name = NAME
    version = VERSION
    template_version = TEMPLATE_VERSION

    def judge(self, items: list[ExplanationItem], progress=None) -> list[Judgment]:
        """One judgment per item, in order; ``progress`` is called with items finished.

        Raises:
            KembedError: the client failed (endpoint unreachable, retries exhausted, ...).
        """
        results = self.ask([render(it) for it in items], parse, progress)
        return [self._judgment(it.id, scores, raws) for it, (scores, raws) in zip(items, results)]

    def reparse(self, raw_text: str, item_id: str = "") -> Judgment:
        """The judgment a stored raw completion gives (no calls); :data:`JUDGE_FAILED` when it
        does not parse."""
        return self._judgment(item_id, parse(raw_text), [raw_text])

    def _judgment(self, item_id: str, scores: RubricScores | None, raws: list[str]) -> Judgment:
        if scores is None:
            return Judgment(item_id, self.name, self.version, self.settings, JUDGE_FAILED, None, None,
                            {"raw": raws[-1] if raws else "", "attempts": len(raws), "raw_attempts": raws})
        score = ((scores.logical_clarity - 1) / 4 + (scores.factual_accuracy - 1) / 4) / 2
        verdict = "unable" if scores.unable_to_explain else "scored"
        return Judgment(item_id, self.name, self.version, self.settings, verdict, score, scores.unable_to_explain,
                        {"logical_clarity": scores.logical_clarity, "factual_accuracy": scores.factual_accuracy,
                         "raw": raws[-1], "attempts": len(raws)})
