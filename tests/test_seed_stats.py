"""The two-level bootstrap (seeds, then questions) against a direct computation."""

import numpy as np
import pytest

from kembed.stats import paired_bootstrap_diff, seeds_accuracy, seeds_bootstrap_diff, seeds_paired_mean


def direct_two_level(a, b, resamples, seed, level=0.95):
    """The same resampling written with plain loops: draw A's seeds, B's seeds, then questions."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        sa = rng.integers(0, len(a), size=len(a))
        sb = rng.integers(0, len(b), size=len(b))
        q = rng.integers(0, len(a[0]), size=len(a[0]))
        mean_a = sum(a[s][j] for s in sa for j in q) / (len(sa) * len(q))
        mean_b = sum(b[s][j] for s in sb for j in q) / (len(sb) * len(q))
        diffs.append(mean_a - mean_b)
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(diffs, [tail, 100 - tail])]


def test_two_level_matches_direct_computation():
    rng = np.random.default_rng(1)
    a = (rng.random((3, 40)) < 0.6).tolist()
    b = (rng.random((2, 40)) < 0.4).tolist()
    out = seeds_bootstrap_diff(a, b, resamples=300, seed=7)
    assert out["ci95"] == pytest.approx(direct_two_level(a, b, 300, 7), abs=1e-12)
    assert out["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert (out["n"], out["seeds_a"], out["seeds_b"]) == (40, 3, 2)


def test_identical_seeds_give_the_paired_question_interval():
    rng = np.random.default_rng(2)
    a, b = (rng.random(200) < 0.6).tolist(), (rng.random(200) < 0.5).tolist()
    two = seeds_bootstrap_diff([a, a, a], [b], resamples=4000, seed=3)["ci95"]
    one = paired_bootstrap_diff(a, b, resamples=4000, seed=3)["ci95"]
    assert two == pytest.approx(one, abs=0.015)


def test_seed_variation_widens_the_interval():
    # every seed answers a different block of questions: across seeds accuracy swings 0.2 .. 0.8
    n = 100
    runs = [[j < 20 + 30 * s for j in range(n)] for s in range(3)]  # 20%, 50%, 80%
    base = [[j < 50 for j in range(n)]]
    wide = seeds_bootstrap_diff(runs, base, resamples=2000, seed=0)["ci95"]
    narrow = seeds_bootstrap_diff([runs[1]], base, resamples=2000, seed=0)["ci95"]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    assert wide[0] < 0 < wide[1]


def test_seeds_accuracy_aligns_ids_and_reports_mean_and_sd():
    runs = [{"q1": True, "q2": False, "q3": True}, {"q1": True, "q2": True, "q3": False, "q4": True}]
    base = [{"q1": False, "q2": False, "q3": True}]
    out = seeds_accuracy(runs, base, resamples=200)
    assert out["n"] == 3 and out["seeds"] == 2
    assert out["accuracies"] == pytest.approx([2 / 3, 2 / 3])
    assert out["sd"] == 0.0 and out["diff"] == pytest.approx(2 / 3 - 1 / 3)


def test_two_level_rejects_mismatched_runs():
    with pytest.raises(ValueError):
        seeds_bootstrap_diff([[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError):
        seeds_bootstrap_diff([], [[1]])


def direct_paired_mean(diffs, resamples, seed, level=0.95):
    """seeds_paired_mean's resampling with plain loops: draw seeds, then each drawn seed's pairs."""
    rng = np.random.default_rng(seed)
    runs = [d for d in diffs if d]
    means = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(runs), size=len(runs))
        per_seed = []
        for k in drawn:
            picks = rng.integers(0, len(runs[k]), size=len(runs[k]))
            per_seed.append(sum(runs[k][j] for j in picks) / len(picks))
        means.append(sum(per_seed) / len(per_seed))
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(means, [tail, 100 - tail])]


def test_paired_mean_over_seeds_matches_direct_computation():
    rng = np.random.default_rng(4)
    diffs = [rng.normal(0.2, 0.3, size=n).tolist() for n in (25, 31, 0, 18)]  # a seed without pairs
    out = seeds_paired_mean(diffs, resamples=300, seed=5)
    assert out["ci95"] == pytest.approx(direct_paired_mean(diffs, 300, 5), abs=1e-12)
    assert out["diff"] == pytest.approx(np.mean([np.mean(d) for d in diffs if d]))  # each seed weighs the same
    assert out["seeds"] == 3 and out["n"] == [25, 31, 0, 18]
    assert seeds_paired_mean([[], []]) == {"seeds": 0, "n": [0, 0], "diff": 0.0, "ci95": [0.0, 0.0]}


def test_paired_mean_over_seeds_sees_the_seeds_disagree():
    # two seeds, each sure of itself (+0.5 and -0.5 on every pair): one seed's interval is a
    # point, the two seeds' interval spans both
    one = seeds_paired_mean([[0.5] * 30], resamples=500)
    assert one["ci95"] == pytest.approx([0.5, 0.5])
    two = seeds_paired_mean([[0.5] * 30, [-0.5] * 30], resamples=500)
    assert two["diff"] == pytest.approx(0.0) and two["ci95"] == pytest.approx([-0.5, 0.5])
    rng = np.random.default_rng(6)
    d = rng.normal(0.1, 0.4, size=200).tolist()
    assert seeds_paired_mean([d], resamples=4000, seed=1)["ci95"] == pytest.approx(
        paired_bootstrap_diff(d, [0.0] * 200, resamples=4000, seed=1)["ci95"], abs=0.01)
