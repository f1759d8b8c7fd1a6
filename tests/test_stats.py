"""interp_lib.stats against scipy and planted truths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from interp_lib import calibration as cal
from interp_lib import stats


def clustered_sample(n_clusters: int, per_cluster: int, sd_between: float, seed: int):
    """Values with a cluster random effect: tokens of one cluster share ``sd_between`` noise."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(0, sd_between, n_clusters)
    groups = np.repeat(np.arange(n_clusters), per_cluster)
    return effect[groups] + rng.normal(0, 1, len(groups)), groups


# --------------------------------------------------------------------------------------------
# cluster bootstrap
# --------------------------------------------------------------------------------------------

def test_cluster_bootstrap_with_singleton_clusters_is_scipys_bootstrap():
    x = np.random.default_rng(0).exponential(size=300)
    for method in ("percentile", "bca"):
        ours = stats.cluster_bootstrap(np.mean, x, groups=np.arange(len(x)), n_boot=400, method=method, seed=3)
        ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=400, method=method, vectorized=False,
                                    random_state=np.random.default_rng(3)).confidence_interval
        # same resamples (same generator, same draws over indices): the same interval
        assert ours.lower == pytest.approx(ref.low, rel=1e-9) and ours.upper == pytest.approx(ref.high, rel=1e-9)
        assert ours.estimate == pytest.approx(x.mean()) and ours.n_clusters == 300 and ours.resample == "cluster"


def test_cluster_bootstrap_resamples_whole_clusters():
    # a metric that sees each resample's rows: the number of distinct clusters present must
    # come in whole clusters (every row of a drawn cluster is there)
    groups = np.repeat(np.arange(10), 7)
    seen = []

    def metric(g):
        values, counts = np.unique(g, return_counts=True)
        seen.append(counts)
        return float(len(g))

    ci = stats.cluster_bootstrap(metric, groups, groups=groups, n_boot=20, seed=0)
    assert all(np.all(c % 7 == 0) for c in seen)
    assert ci.lower == ci.upper == 70  # always 10 clusters of 7 rows


def test_cluster_interval_covers_where_the_token_interval_does_not():
    """Planted truth: mean 0, strong within-cluster correlation. Over repeated samples the
    cluster interval covers 0 about 95% of the time; the token-level interval far less."""
    covered = {"cluster": 0, "token": 0}
    widths = {"cluster": [], "token": []}
    n_rep = 60
    for rep in range(n_rep):
        x, groups = clustered_sample(30, 20, sd_between=1.0, seed=rep)
        for resample in covered:
            ci = cal.bootstrap_ci(np.mean, x, groups=groups, resample=resample, n_boot=200, seed=rep)
            covered[resample] += ci.lower <= 0 <= ci.upper
            widths[resample].append(ci.width)
    assert covered["cluster"] / n_rep >= 0.85
    assert covered["token"] / n_rep <= 0.6
    # design effect 1 + (m - 1) rho = 1 + 19 * 0.5 = 10.5 -> width ratio about sqrt(10.5) = 3.2
    assert 2.4 < np.mean(widths["cluster"]) / np.mean(widths["token"]) < 4.2


def test_bootstrap_ci_keeps_the_token_level_behaviour_and_checks_arguments():
    x, groups = clustered_sample(8, 5, 1.0, seed=1)
    old = cal.bootstrap_ci(np.mean, x, n_boot=100, seed=2)
    explicit = cal.bootstrap_ci(np.mean, x, groups=groups, resample="token", n_boot=100, seed=2)
    assert (old.lower, old.upper, old.resample) == (explicit.lower, explicit.upper, "token")
    assert cal.bootstrap_ci(np.mean, x, groups=groups, n_boot=100).resample == "cluster"
    with pytest.raises(ValueError, match="needs groups"):
        cal.bootstrap_ci(np.mean, x, resample="cluster")
    with pytest.raises(ValueError, match="resample="):
        cal.bootstrap_ci(np.mean, x, resample="rows")
    with pytest.raises(ValueError, match="at least 2 clusters"):
        stats.cluster_bootstrap(np.mean, x, groups=np.zeros(len(x)))
    with pytest.raises(ValueError, match="but groups has 3"):
        stats.cluster_bootstrap(np.mean, x, groups=np.arange(3))
    with pytest.raises(ValueError, match="method="):
        stats.cluster_bootstrap(np.mean, x, groups=groups, method="studentized")


def test_ci_width_comparison_reports_the_ratio():
    x, groups = clustered_sample(20, 10, 1.0, seed=4)
    frame = stats.ci_width_comparison(np.mean, x, groups=groups, n_boot=200)
    assert list(frame.index) == ["token", "cluster"]
    assert frame.loc["cluster", "width"] > frame.loc["token", "width"]
    assert frame["width_ratio"].iloc[0] == pytest.approx(frame.loc["cluster", "width"] / frame.loc["token", "width"])


def test_temperature_scaling_report_resamples_sequences():
    rng = np.random.default_rng(0)
    n_seq, per = 40, 30
    groups = np.repeat(np.arange(n_seq), per)
    # each sequence has its own difficulty: correctness is correlated within a sequence
    logits = torch.from_numpy(rng.normal(0, 1, (n_seq * per, 5)) + np.repeat(rng.normal(0, 2, n_seq), per)[:, None]
                              * np.eye(5)[0]).float()
    labels = np.where(rng.random(n_seq * per) < np.repeat(rng.random(n_seq), per), 0, rng.integers(1, 5, n_seq * per))
    probs = logits.double().softmax(1)
    pred = probs.argmax(1).numpy()
    predictions = cal.Predictions(prediction=pred, confidence=probs.max(1).values.numpy(), group=groups,
                                  labels=labels, correct=pred == labels, logits=logits)
    val, test = predictions.split(0.5, seed=0)
    cluster = cal.temperature_scaling_report(val, test, n_boot=100)
    token = cal.temperature_scaling_report(val, test, n_boot=100, resample="token")
    assert cluster.ece_ci["before"].resample == "cluster" and cluster.ece_ci["before"].n_clusters == n_seq // 2
    assert token.ece_ci["before"].resample == "token"
    assert cluster.ece_ci["before"].estimate == token.ece_ci["before"].estimate
    assert cluster.ece_ci["before"].width > token.ece_ci["before"].width


# --------------------------------------------------------------------------------------------
# debiased calibration error
# --------------------------------------------------------------------------------------------

def planted(n: int, gap: float, seed: int):
    """Confidences uniform on [0.3, 1]; accuracy = confidence - gap: true L2 / L1 error = gap."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.3, 1.0, n)
    correct = rng.random(n) < confidence - gap
    return confidence, correct


def test_debiased_error_is_near_zero_on_calibrated_data_where_binned_ece_is_not():
    plug, debiased = [], []
    for seed in range(40):
        confidence, correct = planted(300, 0.0, seed)
        plug.append(stats.binned_calibration_error(confidence, correct, n_bins=15, p=2))
        debiased.append(stats.debiased_calibration_error(confidence, correct, n_bins=15) ** 2)
    # squared plug-in error ~ sum_b w_b acc(1-acc)/n_b = 15 * 0.2 / 300 = 0.01: biased up
    assert np.mean(np.square(plug)) > 0.006
    # the debiased squared error is unbiased for the true 0
    assert abs(np.mean(debiased)) < 0.0015


def test_debiased_error_recovers_a_planted_gap():
    estimates = [stats.debiased_calibration_error(*planted(2000, 0.1, seed), n_bins=15) for seed in range(10)]
    plug = [stats.binned_calibration_error(*planted(2000, 0.1, seed), n_bins=15, p=2) for seed in range(10)]
    assert np.mean(estimates) == pytest.approx(0.1, abs=0.01)
    assert abs(np.mean(estimates) - 0.1) < abs(np.mean(plug) - 0.1)


def test_binned_error_matches_the_library_ece_and_a_hand_computation():
    confidence, correct = planted(1000, 0.05, seed=3)
    assert stats.binned_calibration_error(confidence, correct, n_bins=10, strategy="uniform") == pytest.approx(
        cal.expected_calibration_error(confidence, correct, n_bins=10), abs=1e-12)
    # hand: two equal-mass bins
    c = np.array([0.2, 0.4, 0.6, 0.8])
    y = np.array([0, 1, 1, 1], dtype=bool)
    # bins {0.2, 0.4}: conf 0.3 acc 0.5; {0.6, 0.8}: conf 0.7 acc 1.0
    assert stats.binned_calibration_error(c, y, n_bins=2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.3)
    assert stats.debiased_calibration_error(c, y, n_bins=2) == pytest.approx(
        math.sqrt(0.5 * (0.04 - 0.25) + 0.5 * (0.09 - 0.0)) if 0.5 * (0.04 - 0.25) + 0.5 * 0.09 > 0 else 0.0)
    with pytest.raises(ValueError, match="p="):
        stats.binned_calibration_error(c, y, p=3)
    with pytest.raises(ValueError, match="strategy="):
        stats.debiased_calibration_error(c, y, strategy="adaptive")


# --------------------------------------------------------------------------------------------
# seeds, permutations, multiple comparisons
# --------------------------------------------------------------------------------------------

def test_seed_summary_matches_scipy():
    values = np.array([0.31, 0.29, 0.33, 0.30, 0.32])
    summary = stats.seed_summary(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy_stats.sem(values))
    assert (summary.ci_low, summary.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert summary.cv == pytest.approx(values.std(ddof=1) / values.mean())
    one = stats.seed_summary([0.5])
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.ci_low)
    with pytest.raises(ValueError, match="confidence="):
        stats.seed_summary(values, confidence=95)


def test_permutation_pvalue_counts_the_observation():
    result = stats.permutation_pvalue(3.0, [1.0, 2.0, 3.0, 4.0])
    assert result.p_value == pytest.approx((1 + 2) / 5)
    assert stats.permutation_pvalue(3.0, [1.0, 2.0, 3.0, 4.0], alternative="less").p_value == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="alternative="):
        stats.permutation_pvalue(1.0, [1.0], alternative="two-sided")


def test_random_unit_baseline_finds_planted_units():
    value = {unit: 0.0 for unit in range(100)}
    planted_units = [3, 17, 42, 77]
    for unit in planted_units:
        value[unit] = 1.0
    score = lambda units: sum(value[u] for u in units)  # noqa: E731
    strong = stats.random_unit_baseline(score, list(value), planted_units, n_perm=200, seed=0)
    assert strong.observed == 4 and strong.p_value < 0.01
    weak = stats.random_unit_baseline(score, list(value), [0, 1, 2, 4], n_perm=200, seed=0)
    assert weak.p_value > 0.5
    with pytest.raises(ValueError, match="not in units"):
        stats.random_unit_baseline(score, list(value), [1000])


def test_holm_and_bh_against_hand_examples_and_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max
    adjusted, reject = stats.holm(p)
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_array_equal(reject, [True, False, False, True])
    # BH by hand: sorted * 4 / rank: 0.02, 0.02, 0.04, 0.04 -> running min from the top
    adjusted, reject = stats.benjamini_hochberg(p)
    np.testing.assert_allclose(adjusted, [0.02, 0.04, 0.04, 0.02])
    assert reject.all()
    many = np.random.default_rng(0).random(50) ** 3
    np.testing.assert_allclose(stats.benjamini_hochberg(many)[0], scipy_stats.false_discovery_control(many))
    with pytest.raises(ValueError, match="pvalues must lie in"):
        stats.holm([0.5, 1.5])


def test_random_unit_baseline_enumerates_small_populations():
    value = {unit: float(unit) for unit in range(5)}
    score = lambda units: sum(value[u] for u in units)  # noqa: E731
    result = stats.random_unit_baseline(score, list(value), [3, 4], n_perm=100)
    assert len(result.null) == 10  # C(5, 2) subsets, each scored once
    assert result.p_value == pytest.approx(1 / 10)  # the best pair: only itself scores as high
    assert stats.random_unit_baseline(score, list(value), [0, 1], n_perm=100).p_value == pytest.approx(1.0)
