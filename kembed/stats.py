"""Statistics for comparing evaluation runs question by question.

Offers :func:`bootstrap_ci` (percentile bootstrap interval of one run's accuracy),
:func:`paired_bootstrap_diff` and :func:`mcnemar_exact` (two runs scored on the same
questions), :func:`paired_accuracy` (both, aligning two runs by question id),
:func:`wilson_interval` (interval of a proportion), :func:`sign_test` and :func:`win_rate`
(pairwise win / loss / tie verdicts, e.g. from a judge), and, over several training seeds,
:func:`seeds_bootstrap_diff`, :func:`seeds_accuracy` and :func:`seeds_paired_mean`.

Every interval and p-value here treats the questions as a sample from a larger population of
questions: it covers question sampling only, not the variation between training seeds (or other
sources of run-to-run randomness), but for the ``seeds_*`` functions, which resample the seeds of
several runs too. All accuracies, rates and intervals are fractions in [0, 1], not percent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def bootstrap_ci(correct: list[bool], *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap confidence interval of a mean accuracy, resampling questions.

    Args:
        correct: one bool per question.
        resamples: bootstrap resamples.
        level: coverage (0.95 gives the 2.5th and 97.5th percentiles).

    Returns:
        ``[low, high]`` as fractions in [0, 1]; ``[0, 0]`` for no questions.
    """
    n = len(correct)
    if n == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    values = np.asarray(correct, dtype=float)
    means = values[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def _binom_p(k: int, n: int) -> float:
    """Two-sided exact binomial p of k successes in n trials at p = 0.5; 1.0 when n == 0."""
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(k, n, 0.5).pvalue)


def paired_bootstrap_diff(a: Sequence, b: Sequence, *, resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Paired percentile bootstrap of the difference of two means on the same questions.

    Each resample draws question indices with replacement and uses the same indices for both
    runs, so the interval accounts for the correlation between them (Efron & Tibshirani 1993,
    *An Introduction to the Bootstrap*, percentile interval).

    Args:
        a: one bool (correct) or float score per question for run A.
        b: the same for run B, same questions in the same order.
        resamples: bootstrap resamples.
        seed: seed of the resampling generator (same seed, same interval).
        level: coverage (0.95 gives the 2.5th and 97.5th percentiles).

    Returns:
        ``{"n": questions, "diff": mean(a) - mean(b), "ci95": [low, high]}``, fractions (in
        [-1, 1] for bools); diff 0.0 and ``[0.0, 0.0]`` for no questions.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    n = len(a)
    if len(b) != n:
        raise ValueError(f"paired samples differ in length: {n} vs {len(b)}")
    if n == 0:
        return {"n": 0, "diff": 0.0, "ci95": [0.0, 0.0]}
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    diffs = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"n": n, "diff": float(d.mean()), "ci95": [float(low), float(high)]}


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of two runs' correctness on the same questions.

    The exact form of McNemar's test (McNemar 1947): a two-sided binomial test with p = 0.5 on
    the discordant pairs (questions exactly one run gets right); concordant pairs are ignored.

    Args:
        a: one bool per question, True when run A is correct.
        b: the same for run B, same questions in the same order.

    Returns:
        ``{"a_only": A right and B wrong, "b_only": B right and A wrong, "p_value": two-sided
        p in [0, 1]}``; p_value is 1.0 when there are no discordant pairs.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    return {"a_only": a_only, "b_only": b_only, "p_value": _binom_p(a_only, a_only + b_only)}


def paired_accuracy(a: Mapping[str, bool], b: Mapping[str, bool], *, resamples: int = 2000,
                    seed: int = 0) -> dict:
    """Compare two runs' accuracy on the questions both answered, aligned by question id.

    Combines :func:`paired_bootstrap_diff` (Efron & Tibshirani percentile bootstrap, 95%) and
    :func:`mcnemar_exact` (McNemar 1947, exact binomial form) on the ids present in both runs,
    taken in sorted order so the result does not depend on dict order.

    Args:
        a: question id -> True when run A is correct.
        b: question id -> True when run B is correct.
        resamples: bootstrap resamples.
        seed: seed of the resampling generator.

    Returns:
        ``{"n": shared ids, "accuracy_a", "accuracy_b", "diff": accuracy_a - accuracy_b,
        "ci95": [low, high] of diff, "a_only", "b_only", "p_value", "missing": ids in only one
        of the runs}``; accuracies, diff and interval are fractions (0.0 for no shared ids).
    """
    ids = sorted(set(a) & set(b))
    xs = [bool(a[i]) for i in ids]
    ys = [bool(b[i]) for i in ids]
    n = len(ids)
    boot = paired_bootstrap_diff(xs, ys, resamples=resamples, seed=seed)
    return {"n": n, "accuracy_a": sum(xs) / n if n else 0.0, "accuracy_b": sum(ys) / n if n else 0.0,
            "diff": boot["diff"], "ci95": boot["ci95"], **mcnemar_exact(xs, ys),
            "missing": len(set(a) ^ set(b))}


def wilson_interval(k: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of the proportion k / n (Wilson 1927), without continuity
    correction: scipy's ``binomtest(k, n).proportion_ci(method="wilson")``.

    Args:
        k: successes (int, 0 <= k <= n).
        n: trials (int).
        level: coverage (0.95 uses z = 1.959964).

    Returns:
        ``[low, high]`` as fractions in [0, 1]; ``[0.0, 1.0]`` when n == 0.

    Raises:
        ValueError: k < 0 or k > n.
    """
    if k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return [0.0, 1.0]
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of wins against losses, ties excluded (binomial test, p = 0.5).

    Args:
        wins: questions run A wins (int).
        losses: questions run A loses (int).

    Returns:
        The p-value in [0, 1]; 1.0 when wins + losses == 0.
    """
    return _binom_p(wins, wins + losses)


OUTCOMES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def win_rate(outcomes: Sequence[str], *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Win rate of run A against run B from per-question verdicts, ties counted as half a win.

    The interval is a percentile bootstrap over questions (Efron & Tibshirani 1993); the p-value
    is the exact sign test of wins against losses (:func:`sign_test`).

    Args:
        outcomes: one of ``"win"``, ``"loss"``, ``"tie"`` per question, from A's point of view.
        resamples: bootstrap resamples.
        seed: seed of the resampling generator.
        level: coverage of the interval.

    Returns:
        ``{"n", "wins", "losses", "ties", "win_rate": (W + T/2) / N, "win_share": W / N,
        "loss_share": L / N, "tie_share": T / N, "ci95": [low, high] of win_rate,
        "sign_test_p"}``, rates as fractions in [0, 1]; 0.0 and ``[0.0, 0.0]`` when N == 0.

    Raises:
        ValueError: an outcome is not "win", "loss" or "tie" (the message names it).
    """
    for o in outcomes:
        if o not in OUTCOMES:
            raise ValueError(f"unknown outcome {o!r}: expected 'win', 'loss' or 'tie'")
    n = len(outcomes)
    w, l, t = (sum(1 for o in outcomes if o == k) for k in ("win", "loss", "tie"))
    out = {"n": n, "wins": w, "losses": l, "ties": t, "win_rate": 0.0, "win_share": 0.0,
           "loss_share": 0.0, "tie_share": 0.0, "ci95": [0.0, 0.0], "sign_test_p": sign_test(w, l)}
    if n:
        out.update(win_rate=(w + t / 2) / n, win_share=w / n, loss_share=l / n, tie_share=t / n,
                   ci95=bootstrap_ci([OUTCOMES[o] for o in outcomes], resamples=resamples, seed=seed,
                                     level=level))
    return out


def seeds_bootstrap_diff(a: Sequence[Sequence], b: Sequence[Sequence], *, resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict:
    """Two-level bootstrap of the difference of mean accuracy between two models trained with
    several seeds each (or one model, e.g. the base model, with a single run), on the same
    questions.

    Each resample first draws each model's seeds with replacement (independently: the seeds of
    two methods are unrelated), then one set of question indices with replacement, shared by
    both models (the questions are the same, so the difference stays paired), and takes the
    mean over the drawn seeds and questions (Davison & Hinkley 1997, *Bootstrap Methods and
    their Application*, sec. 3.8, the two-stage bootstrap of a hierarchical sample). With one
    seed per model it is :func:`paired_bootstrap_diff`.

    Args:
        a: model A's runs, ``[K_a][n]``: one bool (correct) or float score per question per seed.
        b: model B's runs, ``[K_b][n]``, the same questions in the same order.
        resamples: bootstrap resamples.
        seed: seed of the resampling generator.
        level: coverage (0.95 gives the 2.5th and 97.5th percentiles).

    Returns:
        ``{"n": questions, "seeds_a": K_a, "seeds_b": K_b, "diff": mean(a) - mean(b), "ci95":
        [low, high]}``, fractions; diff 0.0 and ``[0.0, 0.0]`` for no questions.

    Raises:
        ValueError: no runs on a side, or runs that differ in their number of questions.
    """
    if not len(a) or not len(b):
        raise ValueError("each model needs at least one run")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)  # [K_a, n], [K_b, n]
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"runs differ in their number of questions: {[len(r) for r in a]} vs {[len(r) for r in b]}")
    n = x.shape[1]
    if n == 0:
        return {"n": 0, "seeds_a": len(x), "seeds_b": len(y), "diff": 0.0, "ci95": [0.0, 0.0]}
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for i in range(resamples):
        sa = rng.integers(0, len(x), size=len(x))  # seeds of A
        sb = rng.integers(0, len(y), size=len(y))  # seeds of B
        q = rng.integers(0, n, size=n)  # questions, shared
        diffs[i] = x[sa][:, q].mean() - y[sb][:, q].mean()
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"n": n, "seeds_a": len(x), "seeds_b": len(y), "diff": float(x.mean() - y.mean()),
            "ci95": [float(low), float(high)]}


def seeds_paired_mean(diffs: Sequence[Sequence[float]], *, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Two-level bootstrap of a paired difference whose pairs differ from one training seed to
    the next: e.g. a model's rationality against the base model's, each seed on the questions
    that seed and the base model both answered correctly (each model explains only its own
    correct answers).

    Each resample draws seeds with replacement, then, within each drawn seed, its pairs with
    replacement, and takes the mean over the drawn seeds of their means (each seed weighs the
    same, whatever its number of pairs; Davison & Hinkley 1997, sec. 3.8, as
    :func:`seeds_bootstrap_diff`). With one seed it is :func:`paired_bootstrap_diff` of that
    seed's pairs.

    Args:
        diffs: ``[K][n_k]``: per seed, one difference (A - B) per pair; a seed without pairs is
            left out.
        resamples: bootstrap resamples.
        seed: seed of the resampling generator.
        level: coverage (0.95 gives the 2.5th and 97.5th percentiles).

    Returns:
        ``{"seeds": seeds with pairs, "n": [n_k per seed given], "diff": mean over those seeds of
        their mean difference, "ci95": [low, high]}``; diff 0.0 and ``[0.0, 0.0]`` when no seed
        has pairs.
    """
    runs = [np.asarray(d, dtype=float) for d in diffs if len(d)]
    sizes = [len(d) for d in diffs]
    if not runs:
        return {"seeds": 0, "n": sizes, "diff": 0.0, "ci95": [0.0, 0.0]}
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):
        drawn = rng.integers(0, len(runs), size=len(runs))  # seeds
        means[i] = np.mean([runs[k][rng.integers(0, len(runs[k]), size=len(runs[k]))].mean() for k in drawn])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"seeds": len(runs), "n": sizes, "diff": float(np.mean([r.mean() for r in runs])),
            "ci95": [float(low), float(high)]}


def seeds_accuracy(runs: Sequence[Mapping[str, bool]], reference: Sequence[Mapping[str, bool]], *,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """A model's accuracy over several training seeds, against a reference model (one run or
    several), on the question ids every run shares (sorted).

    Args:
        runs: per seed, question id -> True when correct.
        reference: the same for the reference model (e.g. ``[base]``).

    Returns:
        ``{"n": shared ids, "seeds": K, "accuracies": per-seed accuracy, "mean", "sd" (sample
        standard deviation over seeds, 0.0 for one seed), "diff", "ci95"}`` from
        :func:`seeds_bootstrap_diff` (two-level: seeds, then questions); fractions.

    Raises:
        ValueError: no runs on a side.
    """
    if not runs or not reference:
        raise ValueError("each model needs at least one run")
    ids = sorted(set.intersection(*(set(r) for r in [*runs, *reference])))
    x = [[bool(r[i]) for i in ids] for r in runs]
    y = [[bool(r[i]) for i in ids] for r in reference]
    accs = [sum(row) / len(ids) if ids else 0.0 for row in x]
    boot = seeds_bootstrap_diff(x, y, resamples=resamples, seed=seed)
    return {"n": len(ids), "seeds": len(runs), "accuracies": accs, "mean": float(np.mean(accs)),
            "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, "diff": boot["diff"], "ci95": boot["ci95"]}
