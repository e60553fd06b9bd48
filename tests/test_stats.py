"""Tests for kembed.stats against hand-computed values."""

from __future__ import annotations

import math

import pytest

from kembed.evaluate import bootstrap_ci as evaluate_bootstrap_ci
from kembed.stats import (bootstrap_ci, mcnemar_exact, paired_accuracy, paired_bootstrap_diff, sign_test,
                          wilson_interval, win_rate)


def test_bootstrap_ci_still_importable_from_evaluate():
    assert evaluate_bootstrap_ci is bootstrap_ci
    assert bootstrap_ci([]) == [0.0, 0.0]
    assert bootstrap_ci([True] * 5) == [1.0, 1.0]


def test_mcnemar_exact_hand_computed():
    # a_only = 1 (question 0), b_only = 7 (questions 1-7), two concordant pairs that are ignored
    a = [True] + [False] * 7 + [True, False]
    b = [False] + [True] * 7 + [True, False]
    result = mcnemar_exact(a, b)
    assert result["a_only"] == 1 and result["b_only"] == 7
    assert result["p_value"] == pytest.approx(2 * (1 + 8) / 256, abs=1e-12)  # 0.0703125
    assert mcnemar_exact([True, False], [True, False]) == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    assert mcnemar_exact([], [])["p_value"] == 1.0


def test_sign_test_hand_computed():
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024, abs=1e-12)
    assert sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 1024, abs=1e-12)
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == pytest.approx(1.0)


def test_wilson_interval_hand_computed():
    z, k, n = 1.959963984540054, 5, 10
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(center - half, abs=1e-9)
    assert high == pytest.approx(center + half, abs=1e-9)
    assert low == pytest.approx(0.2365931, abs=1e-6)
    assert wilson_interval(0, 0) == [0.0, 1.0]
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and 0 < high < 1


def wilson_reference(k: int, n: int, level: float = 0.95) -> list[float]:
    """The Wilson score interval by its formula (Wilson 1927), kembed's code before scipy's."""
    from scipy.stats import norm

    z = float(norm.ppf((1 + level) / 2))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]


@pytest.mark.parametrize("level", [0.8, 0.95, 0.99])
def test_wilson_interval_equals_the_formula(level):
    for n in (1, 2, 7, 10, 117, 1272):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            assert wilson_interval(k, n, level) == pytest.approx(wilson_reference(k, n, level), abs=1e-12), (k, n)
    assert wilson_interval(0, 0, level) == [0.0, 1.0]


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)


def test_win_rate_hand_computed():
    result = win_rate(["win", "win", "loss", "tie"])
    assert result["win_rate"] == 0.625  # (2 + 1/2) / 4
    assert (result["n"], result["wins"], result["losses"], result["ties"]) == (4, 2, 1, 1)
    assert (result["win_share"], result["loss_share"], result["tie_share"]) == (0.5, 0.25, 0.25)
    assert result["sign_test_p"] == pytest.approx(1.0)  # 2 wins vs 1 loss: 2 * (3 + 1) / 8 = 1
    low, high = result["ci95"]
    assert 0 <= low <= 0.625 <= high <= 1
    assert win_rate(["win"] * 9 + ["loss"])["sign_test_p"] == pytest.approx(22 / 1024, abs=1e-12)


def test_win_rate_empty_and_bad_outcome():
    empty = win_rate([])
    assert empty["n"] == 0 and empty["win_rate"] == 0.0 and empty["ci95"] == [0.0, 0.0]
    assert empty["sign_test_p"] == 1.0
    with pytest.raises(ValueError, match="'draw'"):
        win_rate(["win", "draw"])


def test_paired_bootstrap_diff_identical_and_empty():
    a = [True, False, True, True, False]
    assert paired_bootstrap_diff(a, list(a)) == {"n": 5, "diff": 0.0, "ci95": [0.0, 0.0]}
    assert paired_bootstrap_diff([], []) == {"n": 0, "diff": 0.0, "ci95": [0.0, 0.0]}
    # a always exactly one point above b: every resampled difference is 1
    result = paired_bootstrap_diff([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert result["diff"] == pytest.approx(1.0) and result["ci95"] == pytest.approx([1.0, 1.0])


def test_paired_ci_excludes_zero_where_marginal_cis_overlap():
    a = [i < 120 for i in range(200)]  # right on 120 questions
    b = [i < 104 for i in range(200)]  # right on the same ones minus 16: b_only = 0
    a_low, a_high = bootstrap_ci(a)
    b_low, b_high = bootstrap_ci(b)
    assert a_low < b_high  # the marginal intervals overlap
    paired = paired_bootstrap_diff(a, b)
    assert paired["diff"] == pytest.approx(0.08)
    assert paired["ci95"][0] > 0  # the paired interval excludes 0
    test = mcnemar_exact(a, b)
    assert (test["a_only"], test["b_only"]) == (16, 0)
    assert test["p_value"] == pytest.approx(2 / 2 ** 16, abs=1e-15)


def test_paired_bootstrap_diff_deterministic_and_seeded():
    a = [i % 3 == 0 for i in range(50)]
    b = [i % 2 == 0 for i in range(50)]
    assert paired_bootstrap_diff(a, b, seed=7) == paired_bootstrap_diff(a, b, seed=7)
    assert paired_bootstrap_diff(a, b, seed=7)["ci95"] != paired_bootstrap_diff(a, b, seed=8)["ci95"]
    assert win_rate(["win", "loss", "tie"] * 5, seed=3) == win_rate(["win", "loss", "tie"] * 5, seed=3)


def test_paired_inputs_must_have_equal_length():
    with pytest.raises(ValueError):
        paired_bootstrap_diff([True, False], [True])
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_paired_accuracy_aligns_by_id():
    a = {"q3": True, "q1": True, "q2": False, "q4": True}  # q4 only in a
    b = {"q2": True, "q1": True, "q3": False}
    result = paired_accuracy(a, b)
    assert result["n"] == 3 and result["missing"] == 1
    assert result["accuracy_a"] == pytest.approx(2 / 3) and result["accuracy_b"] == pytest.approx(2 / 3)
    assert result["diff"] == pytest.approx(0.0)
    assert (result["a_only"], result["b_only"]) == (1, 1)  # q3 and q2
    assert result["p_value"] == pytest.approx(1.0)
    low, high = result["ci95"]
    assert -1 <= low <= 0 <= high <= 1
    reordered = paired_accuracy(dict(reversed(list(a.items()))), dict(sorted(b.items())))
    assert reordered == result
    assert paired_accuracy({}, {"x": True}) == {"n": 0, "accuracy_a": 0.0, "accuracy_b": 0.0, "diff": 0.0,
                                                 "ci95": [0.0, 0.0], "a_only": 0, "b_only": 0,
                                                 "p_value": 1.0, "missing": 1}
