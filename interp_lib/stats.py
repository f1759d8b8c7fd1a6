"""Statistics for checking claims: cluster bootstrap, debiased calibration error, seed-level
aggregation, permutation baselines and multiple-comparison control.

- :func:`cluster_bootstrap`: confidence interval of any per-example metric, resampling whole
  clusters (sequences / windows / prompts) with replacement, through ``scipy.stats.bootstrap``
  over cluster indices (percentile, basic or BCa; BCa's jackknife then leaves out one cluster
  at a time). Tokens of one window are correlated, so resampling tokens understates the
  uncertainty; :func:`ci_width_comparison` measures by how much.
- :func:`debiased_calibration_error`: the debiased L2 calibration error of Kumar, Liang & Ma
  (2019, "Verified uncertainty calibration"), next to the plug-in binned L1 / L2 ECE. The
  plug-in estimate is biased upwards when bins hold few samples; the debiased one subtracts
  each bin's sampling variance of the accuracy.
- :func:`seed_summary`: mean, sample std, coefficient of variation and a Student-t interval of
  a metric across seeds (what "reproduces across 10 runs with < 2% variance" can be checked on).
- :func:`permutation_pvalue` / :func:`random_unit_baseline`: p-value of an observed statistic
  against a null distribution, e.g. the same score for random sets of heads of the same size.
- :func:`holm` and :func:`benjamini_hochberg`: adjusted p-values and rejections when many heads
  (units) are tested at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from .calibration import (ArrayLike, BootstrapCI, _check_alpha, _float_array, _unit_interval,  # noqa: F401
                          cluster_bootstrap, confidence_and_correct)

__all__ = [
    "BootstrapCI", "PermutationResult", "SeedSummary", "benjamini_hochberg", "binned_calibration_error",
    "ci_width_comparison", "cluster_bootstrap", "debiased_calibration_error", "holm", "permutation_pvalue",
    "random_unit_baseline", "seed_summary",
]

# --------------------------------------------------------------------------------------------
# Cluster bootstrap: lives next to the token bootstrap in calibration (which uses it); re-exported
# --------------------------------------------------------------------------------------------

def ci_width_comparison(metric_fn: Callable[..., float], *arrays: ArrayLike, groups: ArrayLike, n_boot: int = 500,
                        alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """The same metric's percentile interval resampling tokens (rows) and resampling clusters.

    Returns rows ``token`` and ``cluster`` with ``estimate, lower, upper, width, std`` and a
    ``width_ratio`` column (cluster width / token width on both rows).
    """
    from .calibration import bootstrap_ci

    token = bootstrap_ci(metric_fn, *arrays, n_boot=n_boot, alpha=alpha, seed=seed, resample="token")
    cluster = bootstrap_ci(metric_fn, *arrays, groups=groups, n_boot=n_boot, alpha=alpha, seed=seed,
                           resample="cluster")
    frame = pd.DataFrame({name: {"estimate": ci.estimate, "lower": ci.lower, "upper": ci.upper,
                                 "width": ci.upper - ci.lower, "std": ci.std}
                          for name, ci in (("token", token), ("cluster", cluster))}).T
    frame["width_ratio"] = frame.loc["cluster", "width"] / frame.loc["token", "width"]
    return frame


# --------------------------------------------------------------------------------------------
# Calibration error: binned plug-in and debiased
# --------------------------------------------------------------------------------------------

def _equal_mass_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each sample: ``n_bins`` bins of (nearly) equal count, ordered by confidence."""
    order = np.argsort(confidence, kind="stable")
    index = np.empty(len(confidence), dtype=np.int64)
    index[order] = np.minimum(np.arange(len(confidence)) * n_bins // len(confidence), n_bins - 1)
    return index


def _bin_index(confidence: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r}: expected a positive integer")
    if strategy == "quantile":
        return _equal_mass_bins(confidence, int(n_bins))
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
        return np.searchsorted(edges[1:-1], confidence, side="left")  # right-closed, as calibration
    raise ValueError(f"strategy={strategy!r}: expected 'quantile' or 'uniform'")


def _bin_stats(confidence: np.ndarray, correct: np.ndarray, n_bins: int, strategy: str):
    index = _bin_index(confidence, n_bins, strategy)
    size = int(index.max()) + 1
    count = np.bincount(index, minlength=size).astype(np.float64)
    filled = count > 0
    conf = np.bincount(index, weights=confidence, minlength=size)[filled] / count[filled]
    acc = np.bincount(index, weights=correct.astype(np.float64), minlength=size)[filled] / count[filled]
    return count[filled], conf, acc


def binned_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                             strategy: Literal["quantile", "uniform"] = "quantile", p: int = 1) -> float:
    """Plug-in binned calibration error ``(sum_b w_b |acc_b - conf_b|^p)^(1/p)`` (``p`` 1 or 2).

    ``probs``/``labels`` as :func:`interp_lib.calibration.expected_calibration_error`. Equal-mass
    bins here are exact-count bins (ties split by order), as Kumar et al.'s reference code."""
    if p not in (1, 2):
        raise ValueError(f"p={p!r}: expected 1 (ECE) or 2 (L2 calibration error)")
    confidence, correct = confidence_and_correct(probs, labels)
    count, conf, acc = _bin_stats(confidence, correct, n_bins, strategy)
    weights = count / count.sum()
    return float(np.sum(weights * np.abs(acc - conf) ** p) ** (1 / p))


def debiased_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                               strategy: Literal["quantile", "uniform"] = "quantile") -> float:
    """Debiased L2 calibration error of Kumar, Liang & Ma (2019).

    Per bin, the plug-in squared gap ``(acc_b - conf_b)^2`` overestimates the true squared gap
    by the sampling variance of ``acc_b``; its unbiased estimate ``acc_b (1 - acc_b) / (n_b - 1)``
    is subtracted (bins with one sample contribute 0). The weighted sum estimates the squared
    L2 calibration error of the binned model; the result is ``sqrt(max(sum, 0))``, so a
    calibrated model scores close to 0 at any sample size.
    """
    confidence, correct = confidence_and_correct(probs, labels)
    count, conf, acc = _bin_stats(confidence, correct, n_bins, strategy)
    weights = count / count.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = np.where(count > 1, acc * (1 - acc) / np.maximum(count - 1, 1), 0.0)
    per_bin = np.where(count > 1, (acc - conf) ** 2 - variance, 0.0)
    return float(math.sqrt(max(float(np.sum(weights * per_bin)), 0.0)))


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedSummary:
    """A metric across independent runs (seeds)."""

    n: int
    mean: float
    std: float
    """sample standard deviation (ddof=1; NaN for one run)"""
    cv: float
    """coefficient of variation ``std / |mean|`` (NaN for one run or a zero mean)"""
    ci_low: float
    """Student-t interval of the mean at ``confidence``"""
    ci_high: float
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def seed_summary(values: ArrayLike, confidence: float = 0.95) -> SeedSummary:
    """Mean, std, coefficient of variation and Student-t interval of ``values`` (one per seed)."""
    from scipy import stats as scipy_stats

    x = _float_array(values, "values", 1, "a 1-D array [n_seeds] of metric values")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: expected a number in (0, 1)")
    n, mean = len(x), float(x.mean())
    if n < 2:
        return SeedSummary(n, mean, math.nan, math.nan, math.nan, math.nan, float(confidence))
    std = float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    cv = std / abs(mean) if mean != 0 else math.nan
    return SeedSummary(n, mean, std, cv, mean - half, mean + half, float(confidence))


# --------------------------------------------------------------------------------------------
# Permutation baselines
# --------------------------------------------------------------------------------------------

@dataclass
class PermutationResult:
    """An observed statistic against a null distribution of the same statistic."""

    observed: float
    null: np.ndarray
    p_value: float
    """``(1 + #{null >= observed}) / (1 + n)`` for ``alternative="greater"`` (mirrored for "less")"""
    alternative: str

    @property
    def null_mean(self) -> float:
        return float(np.mean(self.null))

    def as_dict(self) -> dict[str, float]:
        return {"observed": self.observed, "null_mean": self.null_mean,
                "null_q95": float(np.quantile(self.null, 0.95)), "p_value": self.p_value, "n_null": len(self.null)}


def permutation_pvalue(observed: float, null: ArrayLike, alternative: Literal["greater", "less"] = "greater"
                       ) -> PermutationResult:
    """Monte-Carlo p-value of ``observed`` against ``null`` draws, counting the observed value
    as one of the draws (so it is never 0): ``(1 + #{null >= observed}) / (1 + n)``."""
    values = _float_array(null, "null", 1, "a 1-D array of null statistics")
    if not isinstance(observed, (int, float, np.floating, np.integer)) or not math.isfinite(float(observed)):
        raise ValueError(f"observed={observed!r}: expected a finite number")
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative={alternative!r}: expected 'greater' or 'less'")
    observed = float(observed)
    extreme = values >= observed if alternative == "greater" else values <= observed
    p_value = (1 + int(extreme.sum())) / (1 + len(values))
    return PermutationResult(observed, values, float(p_value), alternative)


def random_unit_baseline(score_fn: Callable[[list], float], units: Sequence, selected: Sequence,
                         n_perm: int = 100, seed: int = 0, alternative: Literal["greater", "less"] = "greater",
                         exclude_selected: bool = False, progress: bool = False) -> PermutationResult:
    """Is ``score_fn(selected)`` extreme among random sets of ``len(selected)`` units?

    ``units`` is the population (e.g. every ``(layer, head)``); each null draw is a random subset
    of it of the same size as ``selected`` (without the selected units when
    ``exclude_selected``). When there are at most ``n_perm`` such subsets, every one is scored
    (the exact permutation distribution; the p-value is then the share of subsets scoring at
    least as high, the selected one included, so it cannot fall below ``1 / n_subsets``).
    Returns a :class:`PermutationResult` with the p-value.
    """
    population = list(units)
    chosen = list(selected)
    if not chosen:
        raise ValueError("selected: expected at least one unit")
    missing = [u for u in chosen if u not in population]
    if missing:
        raise ValueError(f"selected contains {missing[:3]} not in units; expected a subset of units")
    pool = [u for u in population if u not in chosen] if exclude_selected else population
    if len(pool) < len(chosen):
        raise ValueError(f"units: {len(pool)} units to draw from, fewer than the {len(chosen)} selected")
    if isinstance(n_perm, bool) or not isinstance(n_perm, int) or n_perm < 1:
        raise ValueError(f"n_perm={n_perm!r}: expected a positive integer")
    observed = float(score_fn(chosen))
    if math.comb(len(pool), len(chosen)) <= n_perm:
        # few enough sets to score every one: the exact permutation distribution
        import itertools

        sets = [list(c) for c in itertools.combinations(pool, len(chosen))]
        exact = True
    else:
        rng = np.random.default_rng(seed)
        sets = [[pool[i] for i in rng.choice(len(pool), len(chosen), replace=False)] for _ in range(n_perm)]
        exact = False
    if progress:
        from tqdm.auto import tqdm

        sets = tqdm(sets, desc="random unit sets", leave=False)
    null = np.array([float(score_fn(units)) for units in sets])
    if not exact:
        return permutation_pvalue(observed, null, alternative)
    # every set (the selected one included, unless excluded) is in the null: p = share at least as extreme
    extreme = null >= observed - 1e-12 if alternative == "greater" else null <= observed + 1e-12
    p_value = max(float(extreme.mean()), 1 / len(null)) if not exclude_selected else \
        (1 + int(extreme.sum())) / (1 + len(null))
    return PermutationResult(observed, null, float(p_value), alternative)


# --------------------------------------------------------------------------------------------
# Multiple comparisons
# --------------------------------------------------------------------------------------------

def _pvalues(pvalues: ArrayLike) -> np.ndarray:
    p = _float_array(pvalues, "pvalues", 1, "a 1-D array of p-values")
    _unit_interval(p, "pvalues", "p-values")
    return np.minimum(p, 1.0)


def holm(pvalues: ArrayLike, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down adjustment (family-wise error rate ``alpha``).

    Returns ``(adjusted, reject)`` in the input order: ``adjusted_(i) = max_{j <= i} min(1,
    (m - j + 1) p_(j))`` over the sorted p-values; ``reject = adjusted <= alpha``."""
    p = _pvalues(pvalues)
    alpha = _check_alpha(alpha)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted, adjusted <= alpha


def benjamini_hochberg(pvalues: ArrayLike, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg step-up adjustment (false discovery rate ``alpha``).

    Returns ``(adjusted, reject)`` in the input order: ``adjusted_(i) = min_{j >= i} min(1,
    m p_(j) / j)``; ``reject = adjusted <= alpha``."""
    p = _pvalues(pvalues)
    alpha = _check_alpha(alpha)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * m / np.arange(1, m + 1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum.accumulate(scaled[::-1])[::-1]
    return adjusted, adjusted <= alpha

