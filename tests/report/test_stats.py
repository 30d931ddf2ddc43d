"""Statistics against known values: Wilson (textbook), McNemar (hand-computed), paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mft_bench.report import stats


def test_wilson_textbook_case_newcombe_1998():
    # Newcombe (1998), Stat Med 17:857, example 81/263: Wilson score interval 0.2553 to 0.3662.
    low, high = stats.wilson_interval(81, 263, 0.95)
    assert low == pytest.approx(0.2553, abs=5e-5)
    assert high == pytest.approx(0.3662, abs=5e-5)


def test_wilson_edges_stay_in_unit_interval():
    low, high = stats.wilson_interval(0, 10)
    assert low == 0.0 and 0.0 < high < 0.35  # 0/10 -> [0, 0.2775]
    assert high == pytest.approx(0.2775, abs=5e-4)
    low, high = stats.wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=5e-4)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)


def test_mcnemar_exact_hand_computed_table():
    # a right / b wrong: 8 items, a wrong / b right: 2 items, 90 concordant.
    # Two-sided exact: 2 * P(X <= 2 | X ~ Bin(10, 1/2)) = 2 * (1 + 10 + 45) / 1024 = 0.109375
    a = np.array([1] * 8 + [0] * 2 + [1] * 50 + [0] * 40, dtype=float)
    b = np.array([0] * 8 + [1] * 2 + [1] * 50 + [0] * 40, dtype=float)
    result = stats.mcnemar_exact(a, b)
    assert (result.a_only, result.b_only, result.discordant) == (8, 2, 10)
    assert result.p_value == pytest.approx(112 / 1024, rel=1e-12)
    # 9 vs 1: 2 * (1 + 10) / 1024
    assert stats.mcnemar_exact_counts(9, 1).p_value == pytest.approx(22 / 1024, rel=1e-12)
    assert stats.mcnemar_exact_counts(0, 0).p_value == 1.0
    assert stats.mcnemar_exact_counts(5, 5).p_value == 1.0


def test_mcnemar_rejects_non_binary():
    with pytest.raises(ValueError):
        stats.mcnemar_exact(np.array([0.5, 1.0]), np.array([1.0, 0.0]))


def test_mcnemar_floor_and_min_net_gain():
    assert stats.mcnemar_floor(0.05) == 6  # 2 / 2**6 = 0.031 < 0.05 but 2 / 2**5 = 0.0625
    assert stats.mcnemar_min_net_gain(5, 0.05) is None
    assert stats.mcnemar_min_net_gain(6, 0.05) == 6
    net = stats.mcnemar_min_net_gain(20, 0.05)  # 15 vs 5: p = 0.041; 14 vs 6: p = 0.115
    assert net == 10
    assert stats.mcnemar_exact_counts(15, 5).p_value < 0.05 < stats.mcnemar_exact_counts(14, 6).p_value


def test_paired_bootstrap_identical_arms_gives_zero():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=164).astype(float)
    diff, low, high, _ = stats.paired_bootstrap_difference(a, a.copy(), n_bootstrap=2000, seed=0)
    assert (diff, low, high) == (0.0, 0.0, 0.0)
    result = stats.compare_paired(a, a.copy(), n_bootstrap=2000)
    assert result.p_value == 1.0 and not result.significant and result.test == "mcnemar"


def test_paired_bootstrap_detects_clear_effect_and_is_seeded():
    rng = np.random.default_rng(2)
    b = rng.integers(0, 2, size=500).astype(float)
    a = b.copy()
    flip = np.flatnonzero(b == 0)[:60]  # A right on 60 more items, never worse
    a[flip] = 1.0
    result = stats.compare_paired(a, b, n_bootstrap=5000, seed=3)
    assert result.diff == pytest.approx(60 / 500)
    assert 0.0 < result.ci_low < result.diff < result.ci_high
    assert result.significant and result.p_value < 1e-10
    again = stats.compare_paired(a, b, n_bootstrap=5000, seed=3)
    assert again == result


def test_bootstrap_interval_matches_normal_theory_for_fractions():
    rng = np.random.default_rng(4)
    values = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=2000)
    low, high = stats.bootstrap_mean_interval(values, n_bootstrap=20000, seed=0)
    se = values.std(ddof=0) / math.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.05)
    assert low < values.mean() < high
    cell = stats.estimate_cell(values, n_bootstrap=2000)
    assert cell.method == "bootstrap" and cell.n == 2000


def test_bootstrap_means_continuous_values_chunked():
    rng = np.random.default_rng(5)
    values = rng.normal(size=1000)
    means = stats.bootstrap_means(values, n_bootstrap=5000, seed=1)
    assert means.shape == (5000,)
    assert means.std() == pytest.approx(values.std() / math.sqrt(values.size), rel=0.1)


def test_non_binary_comparison_uses_bootstrap_significance():
    a = np.array([0.5, 1.0, 0.75, 1.0] * 50)
    b = a - 0.25
    result = stats.compare_paired(a, b, n_bootstrap=2000)
    assert result.test == "bootstrap" and result.discordant is None
    assert result.diff == pytest.approx(0.25) and result.ci_low == pytest.approx(0.25)
    assert result.significant and result.p_value == 0.0


def test_is_binary():
    assert stats.is_binary([0, 1, 1.0])
    assert not stats.is_binary([0, 0.5])
    assert not stats.is_binary([])


def test_stratified_mcnemar_pools_discordant_pairs_over_strata():
    from mft_bench.report.stats import mcnemar_exact_counts, stratified_mcnemar

    # one stratum: exactly McNemar's exact test, and the paired difference of that table
    single = stratified_mcnemar([(50, 9, 2)])
    assert single.p_value == mcnemar_exact_counts(9, 2).p_value and single.diff == pytest.approx(7 / 50)
    # three seeds: none significant alone, the summed discordant pairs (24 vs 12) tested once
    strata = [(100, 10, 2), (100, 8, 4), (100, 6, 6)]
    assert all(mcnemar_exact_counts(a, b).p_value > 0.01 for _, a, b in strata[1:])
    pooled = stratified_mcnemar(strata)
    assert (pooled.n, pooled.a_only, pooled.b_only) == (300, 24, 12)
    assert pooled.p_value == mcnemar_exact_counts(24, 12).p_value and pooled.diff == pytest.approx(12 / 300)
    # the interval's variance: each stratum's per-item differences (+1 A only, -1 B only, 0 else) about their
    # own mean, summed over strata: built here from explicit item arrays
    items = [np.concatenate([np.ones(a), -np.ones(b), np.zeros(n - a - b)]) for n, a, b in strata]
    variance = sum(d.size * d.var() for d in items) / 300**2
    half = 1.959964 * np.sqrt(variance)
    assert pooled.ci_low == pytest.approx(12 / 300 - half, rel=1e-5)
    assert pooled.ci_high == pytest.approx(12 / 300 + half, rel=1e-5)
    assert pooled.significant == (pooled.p_value < 0.05)
    with pytest.raises(ValueError, match="not a paired table"):
        stratified_mcnemar([(10, 8, 4)])
