"""The ``pairwise`` judge: a language model compares two runs' explanations of the same
correctly answered question, in both orders, to cancel position bias."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError, field_validator

from kembed.errors import KembedError
from kembed.judges import JUDGE_FAILED, ExplanationItem
from kembed.judges.client import JudgeClient, ask, extract_json_object

NAME = "pairwise"
VERSION = "1"
#: bumped whenever the prompt text changes (part of the settings and of the cache key)
TEMPLATE_VERSION = "pairwise-prompt-1"

TEMPLATE = """Two students explained why the reference answer to a multiple-choice question is correct.
Decide which explanation is better.

Question: {question}

Options:
{options}

Reference answer: {answer}

Reference knowledge (treat it as true):
{knowledge}

Explanation A:
\"\"\"
{a}
\"\"\"

Explanation B:
\"\"\"
{b}
\"\"\"

Judge on logical clarity (coherent reasoning that leads to the reference answer) and factual
accuracy (claims that agree with the reference knowledge). Ignore length and style.
Reply with only a JSON object: {{"better": "A"}}, {{"better": "B"}} or {{"better": "tie"}}."""


class PairwiseAnswer(BaseModel):
    """The judge's answer: which explanation is better (A, B or tie; case-insensitive)."""

    better: Literal["A", "B", "tie"]

    @field_validator("better", mode="before")
    @classmethod
    def _normalize(cls, v):
        if isinstance(v, str):
            v = v.strip()
            return "tie" if v.lower() == "tie" else v.upper()
        return v


def render(item: ExplanationItem, a: str, b: str) -> str:
    """The pairwise prompt for one question with explanations ``a`` (shown first) and ``b``."""
    labels = "ABCDEFGHIJ"
    options = "\n".join(f"{labels[i]}. {o}" for i, o in enumerate(item.options))
    knowledge = "\n".join(f"- {k}" for k in item.knowledge) or "(none)"
    return TEMPLATE.format(question=item.question, options=options,
                           answer=f"{labels[item.gold]}. {item.options[item.gold]}", knowledge=knowledge, a=a, b=b)


def parse(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a raw completion (its first JSON object), else None."""
    obj = extract_json_object(text)
    if obj is None:
        return None
    try:
        return PairwiseAnswer.model_validate(obj).better
    except ValidationError:
        return None


class PairwiseJudge:
    """Compares two runs' explanations question by question.

    Each question answered correctly by both runs is judged twice: run a's explanation as
    "Explanation A" (first order), then swapped (second order). Run a wins the question only when
    both orders prefer it, loses only when both prefer run b, and ties otherwise. A question where
    either order gave no parsable answer after ``max_attempts`` tries is ``judge_failed`` and left
    out of every count.

    Args:
        client: the judge's language model.
        max_attempts: tries per prompt.
    """

    name = NAME
    version = VERSION

    def __init__(self, client: JudgeClient, *, max_attempts: int = 2):
        self.client, self.max_attempts = client, max_attempts
        self.settings = {"client": client.describe(), "template_version": TEMPLATE_VERSION}

    def compare(self, items_a: list[ExplanationItem], items_b: list[ExplanationItem], progress=None) -> dict:
        """Compare run a's explanations with run b's on the question ids both hold.

        ``progress`` is called with prompts finished (two per question).

        Returns:
            ``{"judge", "version", "settings", "per_question": [{id, first, second, outcome}],
            "outcomes": win/loss/tie per judged question (for run a), "stats":
            kembed.stats.win_rate(outcomes), "order_flip_rate": share of judged questions whose
            two orders disagree (None when none was judged), "judge_failed": count, "usage"}``.
            ``first``/``second`` are the run each order preferred: ``"a"``, ``"b"``, ``"tie"`` or
            None when that order failed.

        Raises:
            KembedError: the client failed.
        """
        from kembed.stats import win_rate

        by_b = {it.id: it for it in items_b}
        pairs = [(a, by_b[a.id]) for a in items_a if a.id in by_b]
        prompts = []
        for a, b in pairs:
            prompts += [render(a, a.explanation, b.explanation), render(a, b.explanation, a.explanation)]
        results = ask(self.client, prompts, parse, max_attempts=self.max_attempts, judge=self.name,
                      template_version=TEMPLATE_VERSION, progress=progress)
        first_map = {"A": "a", "B": "b", "tie": "tie", None: None}
        second_map = {"A": "b", "B": "a", "tie": "tie", None: None}
        per_question, outcomes, flips, failed = [], [], 0, 0
        for k, (a, _) in enumerate(pairs):
            first, second = first_map[results[2 * k][0]], second_map[results[2 * k + 1][0]]
            if first is None or second is None:
                outcome = JUDGE_FAILED
                failed += 1
            else:
                outcome = "win" if first == second == "a" else "loss" if first == second == "b" else "tie"
                outcomes.append(outcome)
                flips += first != second
            per_question.append({"id": a.id, "first": first, "second": second, "outcome": outcome,
                                 "raw": [results[2 * k][1][-1], results[2 * k + 1][1][-1]]})
        return {"judge": self.name, "version": self.version, "settings": self.settings,
                "per_question": per_question, "outcomes": outcomes, "stats": win_rate(outcomes),
                "order_flip_rate": flips / len(outcomes) if outcomes else None,
                "judge_failed": failed, "usage": dict(self.client.usage)}


#: family names recognised anywhere in a model name, most specific first
FAMILIES = ("smollm2", "smollm", "llama", "qwen", "mistral", "mixtral", "gemma", "deepseek", "falcon", "claude")
#: short family names recognised only at the start of a word of the name
SHORT_FAMILIES = ("phi", "gpt", "olmo", "yi")
_GENERIC = re.compile(r"^(model|models|final|merged|adapter|checkpoint[-_]?\d*|snapshots?|[0-9a-f]{40})$")


def _base_model(path: Path) -> str | None:
    """The base model argument a run directory or LoRA adapter directory records, if any."""
    for folder in (path, path.parent):
        cfg = folder / "config.yaml"
        if (folder / "kembed-run.json").is_file() and cfg.is_file():
            import yaml

            try:
                model = (yaml.safe_load(cfg.read_text()) or {}).get("model")
            except (OSError, yaml.YAMLError):
                model = None
            if model:
                return str(model)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            return json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            return None
    return None


def model_family(name: str) -> str:
    """The model family of a model argument, lower case: ``smollm2``, ``llama``, ``qwen``,
    ``gpt``, ... A kembed run directory (or its ``model/`` folder) or a LoRA adapter directory
    gives its base model's family; otherwise the last path component that names a known family
    decides, else the leading letters of the last meaningful component."""
    path = Path(name).expanduser()
    if path.is_dir():
        base = _base_model(path)
        if base and base != name:
            return model_family(base)
    parts = [p.lower() for p in re.split(r"[/\\]", name.strip()) if p and not _GENERIC.match(p.lower())]
    for part in reversed(parts):
        for family in FAMILIES:
            if family in part:
                return family
        for family in SHORT_FAMILIES:
            if re.search(rf"(^|[-_. ]){family}", part):
                return family
        if re.match(r"^(o\d|chatgpt|text-davinci)", part):
            return "gpt"
    last = parts[-1] if parts else name.lower()
    m = re.match(r"[a-z]+", last)
    return m.group(0) if m else last


def check_self_judge(generator_models: list[str], judge_model: str, allow: bool) -> None:
    """Refuse a judge from the same model family as a model whose explanations it judges.

    Raises:
        KembedError: the families match and ``allow`` (``--allow-self-judge``) is false.
    """
    if allow:
        return
    family = model_family(judge_model)
    for model in generator_models:
        if model_family(model) == family:
            raise KembedError(f"judge model '{judge_model}' is of the same family ({family}) as the evaluated "
                              f"model '{model}': a model judging its own family is biased; use another judge "
                              "or pass --allow-self-judge")
