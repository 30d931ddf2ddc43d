"""Interval estimates and paired tests for per-item benchmark scores.

Pure functions over numpy arrays. Conventions used throughout the report:

- A metric is *binary* when every item score is 0 or 1 (exact match, pass@1 with one sample, IFEval
  prompt-level); then a cell's interval is Wilson's and a paired comparison is McNemar's exact test.
- Anything else (IFEval instruction-level fractions, pass@1 over several samples) gets a percentile
  bootstrap over items; a paired comparison is a paired bootstrap of the mean difference, significant
  when its interval excludes 0.

Bootstraps are seeded and exact in distribution but cheap: resampling n items with replacement only
matters through how often each *distinct* value is drawn, so with few distinct values (0/1 scores,
instruction fractions) the resampled mean is drawn as ``multinomial(n, value frequencies) @ values / n`` —
O(resamples x distinct values), not O(resamples x n). Mostly-distinct values resample item indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

_CHUNK_ELEMENTS = 4_000_000  # bound on the (resamples x categories) array built per chunk


def is_binary(values: np.ndarray | list[float]) -> bool:
    """True when every value is exactly 0 or 1 (an empty array is not binary)."""
    array = np.asarray(values, dtype=float)
    return array.size > 0 and bool(np.all((array == 0.0) | (array == 1.0)))


def z_value(confidence: float) -> float:
    """Two-sided normal quantile for a confidence level (0.95 -> 1.959964)."""
    _check_confidence(confidence)
    return float(sps.norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    Closed form (Wilson 1927; Newcombe 1998, method 3, no continuity correction). ``n == 0`` gives (0, 1).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges (rounding would miss them)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def bootstrap_means(values: np.ndarray, *, n_bootstrap: int, seed: int) -> np.ndarray:
    """``n_bootstrap`` means of resamples (with replacement, size n) of ``values``; seeded, deterministic."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-d array")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    distinct, counts = np.unique(array, return_counts=True)
    n = array.size
    if distinct.size == 1:
        return np.full(n_bootstrap, distinct[0])
    means = np.empty(n_bootstrap)
    if distinct.size * 4 <= n:  # few distinct values (0/1, fractions): draw how often each value is resampled
        probabilities = counts / n
        per_chunk = max(1, _CHUNK_ELEMENTS // distinct.size)
        for start in range(0, n_bootstrap, per_chunk):
            stop = min(n_bootstrap, start + per_chunk)
            means[start:stop] = rng.multinomial(n, probabilities, size=stop - start) @ distinct / n
    else:  # mostly distinct values: resample item indices
        per_chunk = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n_bootstrap, per_chunk):
            stop = min(n_bootstrap, start + per_chunk)
            means[start:stop] = array[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of bootstrap samples."""
    _check_confidence(confidence)
    alpha = 1.0 - confidence
    low, high = np.quantile(np.asarray(samples, dtype=float), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_mean_interval(
    values: np.ndarray, *, confidence: float = 0.95, n_bootstrap: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling items)."""
    return percentile_interval(bootstrap_means(values, n_bootstrap=n_bootstrap, seed=seed), confidence)


@dataclass(frozen=True)
class CellEstimate:
    """One table cell: mean over n items with its interval and the method that produced it."""

    value: float
    n: int
    ci_low: float
    ci_high: float
    method: str  # "wilson" | "bootstrap"


def estimate_cell(
    values: np.ndarray, *, confidence: float = 0.95, n_bootstrap: int = 10_000, seed: int = 0
) -> CellEstimate:
    """Mean and interval of item scores: Wilson for binary scores, percentile bootstrap otherwise."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("a cell needs at least one item")
    mean = float(array.mean())
    if is_binary(array):
        low, high = wilson_interval(int(array.sum()), int(array.size), confidence)
        return CellEstimate(mean, int(array.size), low, high, "wilson")
    low, high = bootstrap_mean_interval(array, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
    return CellEstimate(mean, int(array.size), low, high, "bootstrap")


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test: ``a_only`` items right only under A, ``b_only`` only under B."""

    a_only: int
    b_only: int
    p_value: float

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only


def mcnemar_exact_counts(a_only: int, b_only: int) -> McNemarResult:
    """Two-sided exact McNemar test from the discordant counts (binomial test, p=1/2; no pairs -> p=1)."""
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be non-negative")
    total = a_only + b_only
    p_value = 1.0 if total == 0 else float(sps.binomtest(a_only, total, 0.5, alternative="two-sided").pvalue)
    return McNemarResult(a_only, b_only, min(1.0, p_value))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> McNemarResult:
    """Exact McNemar test on paired binary scores of the same items under two arms."""
    left, right = _paired(a, b)
    if not (is_binary(left) and is_binary(right)):
        raise ValueError("McNemar's test needs binary (0/1) scores")
    a_only = int(np.sum((left == 1.0) & (right == 0.0)))
    b_only = int(np.sum((left == 0.0) & (right == 1.0)))
    return mcnemar_exact_counts(a_only, b_only)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of A - B over paired items, its bootstrap interval, and a test p-value."""

    diff: float
    n: int
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool
    test: str  # "mcnemar" | "bootstrap"
    discordant: int | None = None


def paired_bootstrap_difference(
    a: np.ndarray, b: np.ndarray, *, confidence: float = 0.95, n_bootstrap: int = 10_000, seed: int = 0
) -> tuple[float, float, float, np.ndarray]:
    """(mean difference, ci_low, ci_high, bootstrap samples) of A - B, resampling items jointly."""
    left, right = _paired(a, b)
    differences = left - right
    samples = bootstrap_means(differences, n_bootstrap=n_bootstrap, seed=seed)
    low, high = percentile_interval(samples, confidence)
    return float(differences.mean()), low, high, samples


def bootstrap_p_value(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value for "mean difference = 0": twice the smaller tail mass at 0, capped at 1.

    It agrees with the percentile interval: p < 1 - confidence exactly when that interval excludes 0
    (up to ties at 0). All samples equal to 0 give p = 1.
    """
    array = np.asarray(samples, dtype=float)
    if np.all(array == 0.0):
        return 1.0
    tail = min(float(np.mean(array <= 0.0)), float(np.mean(array >= 0.0)))
    return min(1.0, 2.0 * tail)


def compare_paired(
    a: np.ndarray,
    b: np.ndarray,
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Paired comparison of two arms on the same items (A - B).

    Always a paired bootstrap interval of the mean difference. Binary scores: McNemar's exact test,
    significant when p < 1 - confidence. Otherwise: significant when the bootstrap interval excludes 0,
    with the matching bootstrap p-value.
    """
    diff, low, high, samples = paired_bootstrap_difference(
        a, b, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed
    )
    left, right = _paired(a, b)
    alpha = 1.0 - confidence
    if is_binary(left) and is_binary(right):
        test = mcnemar_exact(left, right)
        return PairedDifference(
            diff, left.size, low, high, test.p_value, test.p_value < alpha, "mcnemar", test.discordant
        )
    significant = bool(low > 0.0 or high < 0.0)
    return PairedDifference(diff, left.size, low, high, bootstrap_p_value(samples), significant, "bootstrap")


@dataclass(frozen=True)
class StratifiedPairs:
    """Paired binary comparison of A and B pooled over strata (seeds), each stratum paired on its own items."""

    n: int  # pairs over all strata
    a_only: int  # pairs right only under A, summed over strata
    b_only: int
    diff: float  # (a_only - b_only) / n: the pooled mean of A - B
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool


def stratified_mcnemar(strata: list[tuple[int, int, int]], *, confidence: float = 0.95) -> StratifiedPairs:
    """Pool paired comparisons over strata given as ``(n, a_only, b_only)`` each.

    Test: the exact McNemar test on the discordant pairs summed over strata (the Mantel-Haenszel test for matched
    pairs). Under "A and B are equally good in every stratum" each discordant pair goes either way with
    probability 1/2 whatever its stratum, so the pooled count is binomial; strata may differ in accuracy and in
    how many pairs they hold. Interval: normal approximation to the pooled mean difference, with each stratum's
    variance of the per-item difference (strata are fixed, items random: seed-to-seed spread is not in it).
    """
    _check_confidence(confidence)
    if not strata:
        raise ValueError("stratified_mcnemar needs at least one stratum")
    for n, a_only, b_only in strata:
        if n <= 0 or a_only < 0 or b_only < 0 or a_only + b_only > n:
            raise ValueError(f"stratum (n={n}, a_only={a_only}, b_only={b_only}) is not a paired table")
    total = sum(n for n, _, _ in strata)
    a_total = sum(a for _, a, _ in strata)
    b_total = sum(b for _, _, b in strata)
    diff = (a_total - b_total) / total
    # variance of the sum of per-item differences (+1, -1, 0) in one stratum: n * (E[d^2] - E[d]^2)
    variance = sum(n * ((a + b) / n - ((a - b) / n) ** 2) for n, a, b in strata) / total**2
    half = z_value(confidence) * math.sqrt(variance)
    p_value = mcnemar_exact_counts(a_total, b_total).p_value
    return StratifiedPairs(total, a_total, b_total, diff, max(-1.0, diff - half), min(1.0, diff + half), p_value,
                           p_value < 1.0 - confidence)


def mcnemar_min_net_gain(discordant: int, alpha: float = 0.05) -> int | None:
    """Smallest net item gain |A_only - B_only| McNemar calls significant given ``discordant`` pairs.

    None when even all discordant pairs in one direction are not enough (too few discordant pairs).
    """
    if discordant < 0:
        raise ValueError("discordant must be non-negative")
    for a_only in range((discordant + 1) // 2, discordant + 1):
        if mcnemar_exact_counts(a_only, discordant - a_only).p_value < alpha:
            return 2 * a_only - discordant
    return None


def mcnemar_floor(alpha: float = 0.05) -> int:
    """Fewest items by which one arm must beat the other with no item going the other way (6 at 0.05)."""
    k = 1
    while mcnemar_exact_counts(k, 0).p_value >= alpha:
        k += 1
    return k


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    left = np.asarray(a, dtype=float)
    right = np.asarray(b, dtype=float)
    if left.shape != right.shape or left.ndim != 1 or left.size == 0:
        raise ValueError(f"paired scores need equal non-empty 1-d shapes, got {left.shape} and {right.shape}")
    return left, right


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
