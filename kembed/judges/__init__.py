"""Judges of explanation rationality: what a judge receives, what it returns, where it is kept.

Data flow: ``kembed eval --explain`` (:mod:`kembed.explain`) saves an explanation for each
correctly answered question in the evaluation's ``samples.jsonl``; a judge turns each
:class:`ExplanationItem` into a :class:`Judgment`; :func:`append_judgments` appends them to the
evaluation's ``judgments.jsonl`` (never rewritten), and :func:`summarize_judgments` reduces one
judge's judgments to the run's rationality figures.

Judges (one module each): ``grounded`` (:mod:`kembed.judges.grounded`, no language model),
``rubric`` (:mod:`kembed.judges.rubric`, a language model scores clarity and factual accuracy)
and ``pairwise`` (:mod:`kembed.judges.pairwise`, a language model compares two runs'
explanations; used by ``kembed compare``). :mod:`kembed.judges.client` is the language-model
client (a local model or an OpenAI-compatible endpoint) with its sqlite cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kembed.explain import ExplanationItem  # noqa: F401  (what every judge receives)

JUDGMENTS_FILE = "judgments.jsonl"
# verdict of a judge call whose answer could not be parsed after retries: left out of every
# denominator, never turned into a score
JUDGE_FAILED = "judge_failed"


@dataclass
class Judgment:
    """A judge's verdict on one explanation.

    Attributes:
        id: the question's record id.
        judge: the judge's name (``grounded``, ``rubric``, ...).
        version: the judge's version (bumped whenever its scoring changes).
        settings: the judge's settings (thresholds, judge model, endpoint, prompt version, ...).
        verdict: the judge's label (``grounded``'s: unable, inconsistent, unsupported, partial,
            grounded; :data:`JUDGE_FAILED` when a language-model judge gave no parsable answer).
        score: rationality in [0, 1]; None when the verdict is :data:`JUDGE_FAILED`.
        unable: the explanation is unable to explain the answer (None when failed).
        details: judge-specific evidence (claims and their support, rubric scores, ...).
    """

    id: str
    judge: str
    version: str
    settings: dict
    verdict: str
    score: float | None
    unable: bool | None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def judge_key(judge: str, version: str, settings: dict) -> str:
    """A short stable key of a judge configuration (12 hex digits of a sha256): judgments with
    the same key came from the same judge, version and settings."""
    text = json.dumps({"judge": judge, "version": version, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_judgments(folder: Path, key: str | None = None) -> list[dict]:
    """The judgments saved in ``folder/judgments.jsonl`` (all, or those of one :func:`judge_key`);
    a torn last line from an interrupted write is skipped."""
    path = Path(folder) / JUDGMENTS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key is None or judge_key(row["judge"], row["version"], row["settings"]) == key:
                rows.append(row)
    return rows


def append_judgments(folder: Path, judgments: list[Judgment]) -> None:
    """Append judgments to ``folder/judgments.jsonl`` (earlier lines are never rewritten)."""
    path = Path(folder) / JUDGMENTS_FILE
    with path.open("a") as f:
        for j in judgments:
            f.write(json.dumps(j.to_dict(), ensure_ascii=False) + "\n")
        f.flush()


def summarize_judgments(rows: list[dict]) -> dict:
    """One judge configuration's judgments of a run, reduced to its rationality figures.

    Args:
        rows: judgment dicts (:meth:`Judgment.to_dict`) of one :func:`judge_key`.

    Returns:
        ``n`` (judgments), ``judge_failed`` (left out of every denominator), ``scored`` (with a
        score), ``mean_score`` (mean over scored, in [0, 1]; None when none), ``unable`` and
        ``unable_share`` (among judgments with an unable flag) with its Wilson 95% interval
        ``unable_ci95``, ``verdicts`` (count per verdict), and the judge's name, version and
        settings.
    """
    from collections import Counter

    from kembed.stats import wilson_interval

    scores = [r["score"] for r in rows if r["verdict"] != JUDGE_FAILED and r["score"] is not None]
    flagged = [r["unable"] for r in rows if r["verdict"] != JUDGE_FAILED and r["unable"] is not None]
    first = rows[0] if rows else {}
    return {"judge": first.get("judge"), "version": first.get("version"), "settings": first.get("settings"),
            "n": len(rows), "judge_failed": sum(r["verdict"] == JUDGE_FAILED for r in rows), "scored": len(scores),
            "mean_score": sum(scores) / len(scores) if scores else None,
            "unable": sum(flagged), "unable_share": sum(flagged) / len(flagged) if flagged else 0.0,
            "unable_ci95": wilson_interval(sum(flagged), len(flagged)),
            "verdicts": dict(Counter(r["verdict"] for r in rows))}


def evaluation_folders(paths: list[Path]) -> list[Path]:
    """Evaluation directories with explanations: each path itself, or the ``eval-*`` folders
    inside it (a bench run directory) whose samples hold explanations.

    Raises:
        KembedError: a path holds no evaluation with explanations.
    """
    from kembed.errors import KembedError

    found = []
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            found.append(path)
            continue
        inside = [p.parent for p in sorted(path.glob("eval-*/results.json"))
                  if "explanations" in json.loads(p.read_text())]
        if not inside:
            raise KembedError(f"{path}: no evaluation with explanations (run `kembed explain EVAL_DIR` first)")
        found += inside
    return found


def make_judge(name: str, *, judge_model: str | None = None, judge_url: str | None = None,
               served_model: str | None = None, key_env: str | None = None, generators: list[Path] = (),
               allow_self_judge: bool = False):
    """A judge by name: ``grounded`` (no language model), or ``rubric`` with a language model
    (``judge_model``: a local model; or ``judge_url`` + ``served_model``: an OpenAI-compatible
    endpoint, the API key from the environment variable ``key_env``).

    Raises:
        KembedError: an unknown judge; a language-model judge without a model; a judge of the
            same model family as a generator (``generators``: evaluation folders) unless
            ``allow_self_judge``.
    """
    from kembed.errors import KembedError

    if name == "grounded":
        from kembed.judges.grounded import GroundedJudge

        return GroundedJudge()
    if name == "rubric":
        from kembed.judges.rubric import RubricJudge

        return RubricJudge(make_client(judge_model, judge_url, served_model, key_env, generators, allow_self_judge))
    if name == "pairwise":
        raise KembedError("the pairwise judge compares two runs: use `kembed compare RUN_A RUN_B --judge pairwise`")
    raise KembedError(f"unknown judge '{name}' (grounded, rubric, pairwise)")


def _generator_models(folders: list[Path]) -> list[str]:
    """The model each evaluation folder scored (its ``results.json``), and a kembed run's base model."""
    import yaml

    models = []
    for folder in folders:
        model = json.loads((Path(folder) / "results.json").read_text()).get("model", "")
        models.append(model)
        config = Path(model) / "config.yaml"
        if config.is_file():
            models.append((yaml.safe_load(config.read_text()) or {}).get("model", ""))
    return models


def make_client(judge_model, judge_url, served_model, key_env, generators, allow_self_judge):
    """The language-model client of a judge (see :func:`make_judge`), after the self-judge check."""
    from kembed.errors import KembedError
    from kembed.judges.client import JudgeClient
    from kembed.judges.pairwise import check_self_judge

    if bool(judge_model) == bool(judge_url):
        raise KembedError("a language-model judge needs exactly one of --judge-model (local) or --judge-url (endpoint)")
    if judge_url and not served_model:
        raise KembedError("--judge-url needs --judge-name: the model name the endpoint serves")
    check_self_judge(_generator_models(generators), judge_model or served_model, allow_self_judge)
    if judge_model:
        return JudgeClient.local(judge_model)
    return JudgeClient.endpoint(judge_url, served_model, api_key_env=key_env)


def judge_evaluation(folder: Path, judge, *, data_dir=None, reparse: bool = False, progress=None,
                     on_total=None, chunk: int = 32) -> dict:
    """Judge the explanations of an evaluation folder not yet judged by this judge configuration,
    appending to ``judgments.jsonl`` after every ``chunk`` (so an interrupted judge resumes), and
    return :func:`summarize_judgments` over the latest judgment of each explanation.

    Args:
        judge: an object with ``name``, ``version``, ``settings`` and ``judge(items, progress)``.
        reparse: judge every explanation again (a language-model judge answers from its cache,
            so only the parsing runs again); the new judgments are appended and supersede the old.
        progress: callable advanced per explanation; ``on_total``: called once with the count.

    Raises:
        KembedError: see :func:`kembed.explain.load_explanations`.
    """
    from kembed.explain import load_explanations

    items = load_explanations(folder, data_dir, retrieved_top_k=judge.settings.get("retrieved_top_k", 0))
    key = judge_key(judge.name, judge.version, judge.settings)
    done = set() if reparse else {r["id"] for r in read_judgments(folder, key)}
    todo = [item for item in items if item.id not in done]
    if on_total is not None:
        on_total(len(todo))
    for i in range(0, len(todo), chunk):
        append_judgments(folder, judge.judge(todo[i:i + chunk], progress))
    latest = {r["id"]: r for r in read_judgments(folder, key)}
    return summarize_judgments([latest[item.id] for item in items if item.id in latest])
