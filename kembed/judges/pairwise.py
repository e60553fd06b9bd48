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
from kembed.judges.client import LanguageModelJudge, extract_json_object

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


class PairwiseJudge(LanguageModelJudge):
    """Compares two runs' explanations question by question.

    Each question answered correctly by both runs is judged twice: run a's explanation as
    "Explanation A" (first order), then swapped (second order). Run a wins the question only when
    both orders prefer it, loses only when both prefer run b, and ties otherwise. A question where
    either order gave no parsable answer after ``max_attempts`` tries is ``judge_failed`` and left
    out of every count.

    Args: see :class:`~kembed.judges.client.LanguageModelJudge` (``max_attempts``: tries per prompt).
    """

    name = NAME
    version = VERSION
    template_version = TEMPLATE_VERSION

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
        results = self.ask(prompts, parse, progress)
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


def run_pairwise(rows: list[dict], *, judge_model: str | None, judge_url: str | None, served_model: str | None,
                 key_env: str | None, allow_self_judge: bool, data_dir, output: Path) -> list[dict]:
    """``kembed compare ... --judge pairwise``: each run against the reference (the first row of
    :func:`kembed.results.compare_entries`), on the first evaluation both have explanations for;
    each result (:meth:`PairwiseJudge.compare`, from the run's point of view) is written to
    ``output/pairwise-<run>-vs-<reference>.json``.

    Raises:
        KembedError: fewer than two runs; no evaluation both explained; see :func:`make_client`.
    """
    from kembed.errors import KembedError
    from kembed.explain import load_explanations
    from kembed.judges import make_client
    from kembed.runs import write_json

    if len(rows) < 2:
        raise KembedError("the pairwise judge needs at least two runs")
    reference = rows[0]

    def explained(row, label):
        cell = row["evals"].get(label)
        return cell and "explanations" in json.loads((Path(cell["folder"]) / "results.json").read_text())

    folders = [Path(c["folder"]) for r in rows for c in r["evals"].values() if c]
    client = make_client(judge_model, judge_url, served_model, key_env, folders, allow_self_judge)
    judge = PairwiseJudge(client)
    results = []
    for row in rows[1:]:
        label = next((lab for lab in row["evals"] if explained(row, lab) and explained(reference, lab)), None)
        if label is None:
            raise KembedError(f"{row['name']} and {reference['name']}: no evaluation with explanations in both "
                              "(run `kembed explain EVAL_DIR`)")
        top_k = judge.settings["retrieved_top_k"]
        result = judge.compare(load_explanations(Path(row["evals"][label]["folder"]), data_dir, top_k),
                               load_explanations(Path(reference["evals"][label]["folder"]), data_dir, top_k))
        result = {"run": row["name"], "reference": reference["name"], "evaluation": label, **result}
        write_json(Path(output) / f"pairwise-{_slug(row['name'])}-vs-{_slug(reference['name'])}.json", result)
        results.append(result)
    return results


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60]


def pairwise_table(results: list[dict]):
    """The console table of :func:`run_pairwise` results (:class:`kembed.tables.ConsoleTables`):
    wins, losses, ties, win rate (W + T/2)/N with its paired bootstrap 95% CI, the sign test on
    wins vs losses, the order-flip rate, the failed judge calls and the tokens used."""
    from kembed.tables import ConsoleTables

    header = ["run", "vs", "n", "W", "L", "T", "win rate %", "sign p", "flips %", "failed", "tokens"]
    body = []
    for r in results:
        s = r["stats"]
        flips = "-" if r["order_flip_rate"] is None else f"{100 * r['order_flip_rate']:.0f}"
        tokens = r["usage"].get("prompt_tokens", 0) + r["usage"].get("completion_tokens", 0)
        body.append([r["run"], r["reference"], str(s["n"]), str(s["wins"]), str(s["losses"]), str(s["ties"]),
                     f"{100 * s['win_rate']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]",
                     f"{s['sign_test_p']:.3f}", flips, str(r["judge_failed"]), str(tokens)])
    legend = ["W, L, T: wins, losses, ties of the run; win rate %: (W + T/2) / n [paired bootstrap 95% CI]; "
              "sign p: sign test on wins vs losses; "
              "flips %: judged questions whose two orders disagree; failed: questions a judge call failed on; "
              "tokens: prompt + completion tokens"]
    return ConsoleTables("pairwise explanation judge (run vs reference, both orders must agree)", header, body,
                         numbers=range(2, len(header)), key=2, groups=[[2, 3, 4, 5], [6, 7], [8, 9, 10]],
                         legend=legend)
