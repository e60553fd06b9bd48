"""Tuning with the same budget for every method: one grid shape around each method's recipe,
each configuration trained on the same sample and selected on held-out questions, never on test.

The grid scales the recipe's learning rate (``lr_scales``, default x0.5, x1, x2) and, where the
budget allows, every ``epochs`` field of the method's section (``epoch_scales``), so that every
method gets the same number of configurations, whatever its own settings are. Each
configuration is an ordinary training run with closed-book accuracy on the validation split
after every iteration (:meth:`kembed.train.TrainContext.dev_accuracy`); the selection signal
is the accuracy of the last iteration on the validation questions whose gold answer is in the
training knowledge ("taught"; the validation split holds it out of the same train split), since
questions the training never teaches cannot tell configurations apart. A grid whose best
configuration does not clear the recipe's own in a paired test on those questions says so: at
that resolution (one question is 1/n of the score) the sweep cannot separate them.

``kembed tune METHOD`` runs one method's grid; a suite's ``tune:`` block (:class:`TuneSpec`)
makes ``kembed bench`` tune every method first and train the selected configuration for test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kembed.config import Strict


class TuneSpec(Strict):
    """The tuning grid of a suite (its ``tune:`` block) or of ``kembed tune``.

    Attributes:
        domain: the domain tuned on (default: the suite's first); the selection applies to
            every domain of the suite.
        lr_scales: multipliers of the recipe's ``train.learning_rate``.
        epoch_scales: multipliers of every ``epochs`` field of the method's recipe section
            (rounded for integer fields, at least 1).
        selection: ``validation-taught`` (the taught validation questions) or ``validation``
            (all of them).
    """

    domain: str | None = None
    lr_scales: list[float] = [0.5, 1.0, 2.0]
    epoch_scales: list[float] = [1.0]
    selection: str = "validation-taught"


@dataclass
class GridPoint:
    """One configuration of a grid: its label (``lr x2, epochs x1``), the ``key=value``
    overrides on top of the recipe's, and the scales."""

    label: str
    overrides: list[str]
    lr_scale: float
    epoch_scale: float

    @property
    def is_recipe(self) -> bool:
        """True for the recipe's own configuration (both scales 1)."""
        return self.lr_scale == 1 and self.epoch_scale == 1


def _epoch_fields(section: dict, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted path, value) of every ``epochs`` field in a method's resolved section."""
    out = []
    for key, value in section.items():
        if isinstance(value, dict):
            out += _epoch_fields(value, f"{prefix}{key}.")
        elif key == "epochs" and isinstance(value, (int, float)):
            out.append((prefix + key, value))
    return out


def grid(method: str, resolved: dict, spec: TuneSpec) -> list[GridPoint]:
    """The configurations of ``method`` around its resolved recipe ``resolved`` (the dict of
    :func:`kembed.config.dump_config`): every learning-rate scale times every epoch scale, the
    recipe's own first.

    Raises:
        ConfigError: a scale is not positive.
    """
    from kembed.errors import ConfigError

    if any(s <= 0 for s in [*spec.lr_scales, *spec.epoch_scales]):
        raise ConfigError(f"tune: scales must be > 0, got lr_scales={spec.lr_scales}, epoch_scales={spec.epoch_scales}")
    lr = resolved["train"]["learning_rate"]
    epochs = _epoch_fields(resolved.get(method) or {})
    points = []
    for es in dict.fromkeys(spec.epoch_scales):
        for ls in dict.fromkeys(spec.lr_scales):
            overrides = [f"train.learning_rate={lr * ls:.4g}"]
            for path, value in epochs:
                scaled = max(1, round(value * es)) if isinstance(value, int) else value * es
                overrides.append(f"{method}.{path}={scaled}")
            points.append(GridPoint(f"lr x{ls:g}, epochs x{es:g}", overrides, ls, es))
    return sorted(points, key=lambda p: not p.is_recipe)


def tune_overrides() -> list[str]:
    """What every configuration of a grid runs with: accuracy on the whole validation split
    after each iteration (the selection signal)."""
    return ["eval.split=validation", "eval.limit=null"]


def run_score(run: Path, selection: str = "validation-taught") -> dict | None:
    """A finished tuning run's selection score: its last ``iteration_end`` event.

    Returns:
        ``{"score", "n", "correct": ids right among the scored ones, "validation": accuracy on
        every validation question}``; None when the run has not finished an iteration with
        validation accuracy.
    """
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    ends = [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == "iteration_end"
            and "dev_correct_ids" in e]
    if not ends:
        return None
    last = ends[-1]
    taught = last.get("dev_taught") or {}
    scored = taught.get("ids") if selection == "validation-taught" and taught.get("n") else None
    correct = set(last["dev_correct_ids"])
    if scored is None:
        return {"score": last["dev_accuracy"]["token_mean"], "n": None, "ids": None, "correct": sorted(correct),
                "validation": last["dev_accuracy"]["token_mean"]}
    hits = sorted(correct & set(scored))
    return {"score": len(hits) / len(scored), "n": len(scored), "ids": scored, "correct": hits,
            "validation": last["dev_accuracy"]["token_mean"]}


def select(points: list[GridPoint], scores: list[dict | None]) -> dict:
    """The selected configuration: the highest score; ties go to the recipe's own, then to the
    cheaper (fewer epochs, then lower learning rate). With it, the paired difference of the
    selected configuration to the recipe's own on the scored questions (McNemar, paired
    bootstrap) and whether the grid separated them.

    Returns:
        ``{"selected": label, "overrides", "scores": [{label, score, n, validation}],
        "vs_recipe": paired stats | None, "separated": bool, "resolution": 1 / n | None,
        "edge": ["largest learning rate", ...]}``: ``edge`` names each scale of the grid whose
        end the selection sits at (the grid cannot tell whether a scale further out scores higher).

    Raises:
        KembedError: no configuration has a score (every run failed).
    """
    from kembed.errors import KembedError
    from kembed.stats import paired_accuracy

    scored = [(p, s) for p, s in zip(points, scores) if s is not None]
    if not scored:
        raise KembedError("tune: no configuration finished with a validation score")
    best, best_score = max(scored, key=lambda ps: (ps[1]["score"], ps[0].is_recipe, -ps[0].epoch_scale,
                                                    -ps[0].lr_scale))
    recipe = next(((p, s) for p, s in scored if p.is_recipe), None)
    vs = None
    if recipe is not None and recipe[0] is not best and best_score["ids"] is not None:
        ids = best_score["ids"]
        vs = paired_accuracy({i: i in best_score["correct"] for i in ids},
                             {i: i in recipe[1]["correct"] for i in ids})
    n = best_score["n"]
    edge = []
    for name, scale in (("learning rate", "lr_scale"), ("epoch count", "epoch_scale")):
        values = sorted({getattr(p, scale) for p in points})
        if len(values) > 1 and getattr(best, scale) in (values[0], values[-1]):
            edge.append(f"{'largest' if getattr(best, scale) == values[-1] else 'smallest'} {name}")
    return {"selected": best.label, "overrides": best.overrides, "lr_scale": best.lr_scale,
            "epoch_scale": best.epoch_scale,
            "scores": [{"label": p.label, "score": s["score"] if s else None, "n": s["n"] if s else None,
                        "validation": s["validation"] if s else None} for p, s in zip(points, scores)],
            "vs_recipe": vs, "separated": bool(vs and vs["p_value"] < 0.05),
            "resolution": 1 / n if n else None, "edge": edge}


def summary_lines(method: str, result: dict) -> list[str]:
    """Markdown lines of one method's grid, every configuration's score (a configuration carried
    over from an earlier report names its commit) and the selection, marked partial while a
    configuration has no score."""
    lines = [f"### {method}", "", "| configuration | taught validation % (n) | all validation % |", "|---|---|---|"]
    for s in result["scores"]:
        mark = " (selected)" if s["label"] == result["selected"] else ""
        if s.get("carried_from"):
            mark += f" (carried over: commit {s['carried_from'].get('commit')})"
        score = "not scored" if s["score"] is None else f"{100 * s['score']:.1f}" + (f" ({s['n']})" if s["n"] else "")
        allv = "-" if s["validation"] is None else f"{100 * s['validation']:.1f}"
        lines.append(f"| {s['label']}{mark} | {score} | {allv} |")
    vs = result["vs_recipe"]
    if result["selected"].startswith("lr x1,") and result["selected"].endswith("epochs x1"):
        verdict = "the recipe's own configuration is selected"
    elif vs is None:
        verdict = "selected without a paired test against the recipe's configuration"
    else:
        verdict = (f"selected over the recipe's configuration by {100 * vs['diff']:+.1f} pp "
                   f"[{100 * vs['ci95'][0]:+.1f}, {100 * vs['ci95'][1]:+.1f}], McNemar p = {vs['p_value']:.3f}: "
                   + ("separated" if result["separated"] else "not separated at this resolution"))
    resolution = f"; one question is {100 * result['resolution']:.1f} pp" if result["resolution"] else ""
    missing = sum(s["score"] is None for s in result["scores"])
    partial = (f" (so far: {missing} of {len(result['scores'])} configurations not scored, still to run or failed)"
               if missing else "")
    edge = (f" It is the grid's {' and '.join(result['edge'])}: the grid cannot tell whether one further out"
            " would score higher." if result.get("edge") else "")
    return lines + ["", f"Selected{partial}: **{result['selected']}** ({verdict}{resolution}).{edge}", ""]
