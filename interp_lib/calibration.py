"""Calibration: does a model's confidence match its accuracy?

Metrics work on probabilities ``probs`` [N, C] with class ``labels`` [N] (top-label
confidence = the largest probability, correct = its class is the label), or on ``probs`` [N]
confidences with ``labels`` [N] 0/1 correctness. Binned metrics use equal-width
(``strategy="uniform"``) or equal-mass (``"quantile"``) bins, right-closed: a confidence ``c``
falls in the bin ``(lower, upper]`` (the first bin also holds ``c == lower``), as in Guo et al.'s
temperature-scaling reference code.

Label sources for a language model: :func:`next_token_predictions` (held-out text; correct = the
top token is the true next token) and :func:`classify_with_answer_tokens` (prompts scored by the
logits of one answer token per class). :class:`TemperatureScaler` fits a temperature (or vector
scaling) on a validation split; :func:`compare_models` tabulates ECE / NLL / accuracy before and
after scaling across models, always fitting and evaluating on disjoint splits.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

# "auto" model lists: their home is interp_lib.runtime (re-exported here)
from .runtime import COMPARE_COLAB, COMPARE_OFFLINE, resolve_compare_models
from .streaming import LogitStore, block_rows_for

ArrayLike = Union[np.ndarray, Tensor]
Strategy = Literal["uniform", "quantile"]
STRATEGIES = ("uniform", "quantile")
#: Rows of ``probs`` may deviate from summing to 1 by this much (float32 softmax is ~1e-5 off).
PROB_SUM_ATOL = 1e-3

__all__ = [
    "ArrayLike", "BootstrapCI", "CalibrationReport", "LogitStore", "Predictions", "TemperatureScaler", "ScalingResult",
    "bootstrap_ci", "brier_score", "classify_labelled", "classify_with_answer_tokens", "classwise_ece",
    "compare_models", "confidence_and_correct", "confidence_from_logits", "evaluate_temperature_scaling",
    "expected_calibration_error", "maximum_calibration_error", "negative_log_likelihood",
    "next_token_confidence", "next_token_predictions", "reliability_data", "resolve_compare_models", "softmax",
    "temperature_scaling_report",
]


# --------------------------------------------------------------------------------------------
# Validation at the boundary (shared with interp_lib.selective)
# --------------------------------------------------------------------------------------------

def _to_numpy(x: Any, name: str) -> np.ndarray:
    """``x`` (numpy, torch, list) as a numpy array, without copying when possible."""
    if x is None:
        raise ValueError(f"{name} is None; expected an array")
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} could not be read as an array ({error}); expected numbers") from error
    if array.dtype == object or array.dtype.kind in "USV":
        raise ValueError(f"{name} has dtype {array.dtype}; expected a numeric array")
    return array


def _check_nonempty(array: np.ndarray, name: str) -> None:
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)}); expected at least one sample")


def _check_finite(array: np.ndarray, name: str, what: str = "values") -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = first[0] if len(first) == 1 else first
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf value(s) (first {array[first].item()} at "
                         f"index {where}); expected finite {what}")


def _float_array(x: Any, name: str, ndim: int | tuple[int, ...], what: str, values: str = "values") -> np.ndarray:
    """A finite, non-empty float64 array with ``ndim`` dimensions (``what`` names the expected shape)."""
    array = _to_numpy(x, name)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if array.ndim not in ndims:
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {what}")
    _check_nonempty(array, name)
    if array.dtype.kind == "b":
        array = array.astype(np.float64)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} has dtype {array.dtype}; expected real numbers ({what})")
    array = array.astype(np.float64, copy=False)
    _check_finite(array, name, values)
    return array


def _check_same_length(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} has {len(a)} entries but {b_name} has {len(b)}; expected the same "
                         "number of samples")


def _class_labels(labels: Any, n_classes: int, name: str = "labels") -> np.ndarray:
    """Integer class indices in [0, n_classes)."""
    y = _to_numpy(labels, name)
    if y.ndim != 1:
        raise ValueError(f"{name} has shape {tuple(y.shape)}; expected a 1-D array [N] of class indices")
    _check_nonempty(y, name)
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        _check_finite(y, name, "class indices")
        if not np.all(y == np.round(y)):
            index = int(np.argmax(y != np.round(y)))
            raise ValueError(f"{name} must be integer class indices; got {y[index].item()!r} at index {index}")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{name} has dtype {y.dtype}; expected integer class indices")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueError(f"{name} must be class indices in [0, {n_classes - 1}] (for {n_classes} classes); "
                         f"got {y[index]} at index {index}")
    return y


def _correctness(correct: Any, name: str = "correct") -> np.ndarray:
    """A boolean array from bool / 0-1 numbers."""
    array = _to_numpy(correct, name)
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected a 1-D array [N] of 0/1 correctness")
    _check_nonempty(array, name)
    if array.dtype.kind == "b":
        return array
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} has dtype {array.dtype}; expected bool or 0/1 correctness")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueError(f"{name} must be 0/1 (or bool) correctness; got {array[index].item()!r} at index {index}")
    return array.astype(bool)


def _unit_interval(array: np.ndarray, name: str, what: str) -> None:
    bad = (array < 0) | (array > 1 + 1e-6)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = first[0] if len(first) == 1 else first
        raise ValueError(f"{name} must lie in [0, 1] ({what}); got {array[first].item()!r} at index {where}")


def _probability_matrix(probs: Any, name: str = "probs") -> np.ndarray:
    p = _float_array(probs, name, 2, "a 2-D array [N, C] of class probabilities", "probabilities")
    if p.shape[1] < 2:
        raise ValueError(f"{name} has shape {p.shape}; expected at least 2 classes (columns)")
    _unit_interval(p, name, "probabilities")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1) > PROB_SUM_ATOL
    if off.any():
        row = int(np.argmax(off))
        raise ValueError(f"{name} rows must sum to 1 (within {PROB_SUM_ATOL}); row {row} sums to {sums[row]:.6g}. "
                         "Expected probabilities: pass softmax(logits), not logits")
    return p


def _logit_matrix(logits: Any, name: str = "logits") -> np.ndarray:
    z = _float_array(logits, name, 2, "a 2-D array [N, C] of logits", "logits")
    if z.shape[1] < 2:
        raise ValueError(f"{name} has shape {z.shape}; expected at least 2 classes (columns)")
    return z


def _check_n_bins(n_bins: Any) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r}: expected a positive integer")


def _check_strategy(strategy: Any) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")


def confidence_and_correct(probs: Float[ArrayLike, "n c"] | Float[ArrayLike, " n"],
                           labels: Int[ArrayLike, " n"] | Bool[ArrayLike, " n"]
                           ) -> tuple[Float[np.ndarray, " n"], Bool[np.ndarray, " n"]]:
    """Top-label confidence and correctness, validated.

    ``probs`` [N, C] with class ``labels`` [N]: confidence = max probability, correct = argmax ==
    label. ``probs`` [N] (confidences) with ``labels`` [N] 0/1: returned as they are.
    """
    array = _to_numpy(probs, "probs")
    if array.ndim == 2:
        p = _probability_matrix(array)
        y = _class_labels(labels, p.shape[1])
        _check_same_length(p, "probs", y, "labels")
        return np.minimum(p.max(axis=1), 1.0), p.argmax(axis=1) == y
    if array.ndim == 1:
        confidence = _float_array(array, "probs", 1, "[N] confidences")
        _unit_interval(confidence, "probs", "confidences of the predicted class")
        correct = _correctness(labels, "labels")
        _check_same_length(confidence, "probs", correct, "labels")
        return np.minimum(confidence, 1.0), correct
    raise ValueError(f"probs has shape {tuple(array.shape)}; expected [N, C] probabilities or [N] confidences")


def softmax(logits: Float[ArrayLike, "n c"], temperature: float = 1.0) -> Float[np.ndarray, "n c"]:
    """Validated ``softmax(logits / temperature)`` as a float64 numpy array."""
    z = _logit_matrix(logits)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Binned metrics
# --------------------------------------------------------------------------------------------

def _bin_edges(confidence: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    # Equal-mass bins; repeated quantiles (ties, saturated confidences) collapse into one bin.
    edges = np.quantile(confidence, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return np.unique(edges)


def _binned(confidence: np.ndarray, outcome: np.ndarray, n_bins: int, strategy: str
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Edges, and per bin: count, mean confidence, mean outcome (NaN where empty), bin index of each sample."""
    edges = _bin_edges(confidence, n_bins, strategy)
    # Right-closed bins (lower, upper]: c equal to an inner edge goes to the bin below it.
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    n = len(edges) - 1
    count = np.bincount(index, minlength=n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n) / count
        mean_outcome = np.bincount(index, weights=outcome.astype(np.float64), minlength=n) / count
    return edges, count, mean_conf, mean_outcome, index


def _ece_from_bins(count: np.ndarray, mean_conf: np.ndarray, mean_outcome: np.ndarray) -> float:
    filled = count > 0
    weights = count[filled] / count.sum()
    return float(np.sum(weights * np.abs(mean_outcome[filled] - mean_conf[filled])))


def expected_calibration_error(probs: Float[ArrayLike, "n c"] | Float[ArrayLike, " n"],
                               labels: Int[ArrayLike, " n"] | Bool[ArrayLike, " n"],
                               n_bins: int = 15, strategy: Strategy = "uniform") -> float:
    """Top-label expected calibration error: ``sum_b |B_b| / N * |accuracy_b - confidence_b|``.

    Args:
        probs: [N, C] class probabilities (rows sum to 1), or [N] confidences of the prediction.
        labels: [N] class indices for [N, C] ``probs``; [N] 0/1 correctness for [N] ``probs``.
        n_bins: number of bins.
        strategy: ``"uniform"`` (equal width on [0, 1], as torchmetrics and Guo et al.) or
            ``"quantile"`` (equal mass; fewer bins when quantiles coincide).

    Bins are right-closed, ``(lower, upper]``, as in Guo et al.'s reference code. (torchmetrics
    >= 1.0 bins ``[lower, upper)`` with exactly-1.0 confidences in a bin of their own, so the two
    agree except when a confidence lies exactly on a bin edge.)
    """
    _check_n_bins(n_bins)
    _check_strategy(strategy)
    confidence, correct = confidence_and_correct(probs, labels)
    _, count, mean_conf, accuracy, _ = _binned(confidence, correct, n_bins, strategy)
    return _ece_from_bins(count, mean_conf, accuracy)


def maximum_calibration_error(probs: Float[ArrayLike, "n c"] | Float[ArrayLike, " n"],
                              labels: Int[ArrayLike, " n"] | Bool[ArrayLike, " n"],
                              n_bins: int = 15, strategy: Strategy = "uniform") -> float:
    """Largest ``|accuracy_b - confidence_b|`` over non-empty bins (arguments as the ECE)."""
    _check_n_bins(n_bins)
    _check_strategy(strategy)
    confidence, correct = confidence_and_correct(probs, labels)
    _, count, mean_conf, accuracy, _ = _binned(confidence, correct, n_bins, strategy)
    filled = count > 0
    return float(np.max(np.abs(accuracy[filled] - mean_conf[filled])))


def reliability_data(probs: Float[ArrayLike, "n c"] | Float[ArrayLike, " n"],
                     labels: Int[ArrayLike, " n"] | Bool[ArrayLike, " n"],
                     n_bins: int = 15, strategy: Strategy = "uniform") -> pd.DataFrame:
    """Per-bin data of a reliability diagram (draw it with :func:`interp_lib.plots.reliability_diagram`).

    Returns one row per bin, empty bins included: ``bin_lower``, ``bin_upper``, ``confidence``
    (mean confidence), ``accuracy``, ``count``, ``gap`` (= confidence - accuracy: positive when
    over-confident). ``confidence``, ``accuracy`` and ``gap`` are NaN for empty bins. The ECE is
    ``(frame.count * frame.gap.abs()).sum() / frame.count.sum()``.
    """
    _check_n_bins(n_bins)
    _check_strategy(strategy)
    confidence, correct = confidence_and_correct(probs, labels)
    edges, count, mean_conf, accuracy, _ = _binned(confidence, correct, n_bins, strategy)
    return pd.DataFrame({
        "bin_lower": edges[:-1], "bin_upper": edges[1:], "confidence": mean_conf,
        "accuracy": accuracy, "count": count.astype(np.int64), "gap": mean_conf - accuracy,
    })


def classwise_ece(probs: Float[ArrayLike, "n c"], labels: Int[ArrayLike, " n"], n_bins: int = 15,
                  strategy: Strategy = "uniform") -> float:
    """Class-wise ECE (Kull et al. 2019): the mean over classes ``k`` of the ECE of ``p_k``
    against the indicator ``label == k``, each binned on its own probabilities."""
    _check_n_bins(n_bins)
    _check_strategy(strategy)
    p = _probability_matrix(probs)
    y = _class_labels(labels, p.shape[1])
    _check_same_length(p, "probs", y, "labels")
    errors = []
    for k in range(p.shape[1]):
        _, count, mean_prob, frequency, _ = _binned(p[:, k], y == k, n_bins, strategy)
        errors.append(_ece_from_bins(count, mean_prob, frequency))
    return float(np.mean(errors))


def brier_score(probs: Float[ArrayLike, "n c"] | Float[ArrayLike, " n"],
                labels: Int[ArrayLike, " n"] | Bool[ArrayLike, " n"]) -> float:
    """Brier score. [N, C] ``probs``: ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (Brier 1950, in
    [0, 2]). [N] confidences with 0/1 correctness: ``mean_i (c_i - correct_i)^2`` (top-label)."""
    array = _to_numpy(probs, "probs")
    if array.ndim == 2:
        p = _probability_matrix(array)
        y = _class_labels(labels, p.shape[1])
        _check_same_length(p, "probs", y, "labels")
        p_true = p[np.arange(len(y)), y]
        return float(np.mean(np.sum(p ** 2, axis=1) - 2 * p_true + 1))
    confidence, correct = confidence_and_correct(array, labels)
    return float(np.mean((confidence - correct) ** 2))


def negative_log_likelihood(probs: Float[ArrayLike, "n c"] | Float[ArrayLike, " n"],
                            labels: Int[ArrayLike, " n"] | Bool[ArrayLike, " n"],
                            from_logits: bool = False, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood (nats) of the labels.

    [N, C] ``probs`` (or logits with ``from_logits=True``, computed exactly with log-softmax):
    ``-mean log p[label]``. [N] confidences with 0/1 correctness: the binary NLL of the
    confidence as a probability of being correct. Probabilities are clipped at ``eps`` so one
    zero does not make the mean infinite.
    """
    if from_logits:
        z = _logit_matrix(probs, "probs")
        y = _class_labels(labels, z.shape[1])
        _check_same_length(z, "probs", y, "labels")
        log_p = torch.from_numpy(z).log_softmax(dim=1).numpy()
        return float(-np.mean(log_p[np.arange(len(y)), y]))
    array = _to_numpy(probs, "probs")
    if array.ndim == 2:
        p = _probability_matrix(array)
        y = _class_labels(labels, p.shape[1])
        _check_same_length(p, "probs", y, "labels")
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, None))))
    confidence, correct = confidence_and_correct(array, labels)
    c = np.clip(confidence, eps, 1 - eps)
    return float(-np.mean(np.where(correct, np.log(c), np.log1p(-c))))


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BootstrapCI:
    """A percentile-bootstrap confidence interval of a metric."""

    estimate: float
    """the metric on the full sample"""
    lower: float
    """``alpha / 2`` percentile of the bootstrap distribution"""
    upper: float
    """``1 - alpha / 2`` percentile"""
    std: float
    """standard deviation of the bootstrap distribution (a standard error)"""
    alpha: float
    n_boot: int
    resample: str = "token"
    """what was resampled: ``"token"`` (rows) or ``"cluster"`` (whole sequences / prompts)"""
    n_clusters: int | None = None
    """number of clusters resampled (``resample="cluster"``)"""
    method: str = "percentile"
    """interval method: percentile, basic or bca"""

    @property
    def width(self) -> float:
        return self.upper - self.lower

    def __str__(self) -> str:
        by = f", {self.n_clusters} clusters" if self.resample == "cluster" else ""
        return f"{self.estimate:.4g} [{self.lower:.4g}, {self.upper:.4g}] ({100 * (1 - self.alpha):.0f}% CI{by})"


def _check_n_boot(n_boot: Any) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise ValueError(f"n_boot={n_boot!r}: expected an integer >= 2")
    return int(n_boot)


def _sample_arrays(arrays: Sequence[Any]) -> list[np.ndarray]:
    if not arrays:
        raise ValueError("arrays: expected at least one array to resample")
    data = [_to_numpy(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    for i, a in enumerate(data):
        if a.ndim == 0:
            raise ValueError(f"arrays[{i}] is a scalar; expected an array with samples along axis 0")
        _check_nonempty(a, f"arrays[{i}]")
        _check_same_length(data[0], "arrays[0]", a, f"arrays[{i}]")
    return data


BootstrapMethod = Literal["percentile", "basic", "bca"]
BOOTSTRAP_METHODS = ("percentile", "basic", "bca")


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r}: expected a number in (0, 1)")
    return float(alpha)


def cluster_bootstrap(metric_fn: Callable[..., float], *arrays: ArrayLike, groups: ArrayLike,
                      n_boot: int = 1000, alpha: float = 0.05, method: BootstrapMethod = "percentile",
                      seed: int = 0) -> BootstrapCI:
    """Bootstrap interval of ``metric_fn(*arrays)`` resampling whole clusters with replacement.

    ``groups`` [N] names the cluster of every row (e.g. ``Predictions.group``, the sequence a
    token comes from). Each resample draws as many clusters as there are, with replacement, and
    evaluates the metric on the concatenation of their rows. The interval is computed by
    ``scipy.stats.bootstrap`` over cluster indices (``method``: ``percentile``, ``basic`` or
    ``bca``). With one row per cluster this is the ordinary (token-level) bootstrap.

    Returns a :class:`BootstrapCI` with ``resample="cluster"`` and
    ``n_clusters``.
    """
    from scipy import stats as scipy_stats

    if not callable(metric_fn):
        raise ValueError(f"metric_fn={metric_fn!r}: expected a callable metric(*arrays) -> float")
    n_boot, alpha = _check_n_boot(n_boot), _check_alpha(alpha)
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"method={method!r}: expected one of {BOOTSTRAP_METHODS}")
    data = _sample_arrays(arrays)
    group = _to_numpy(groups, "groups")
    if group.ndim != 1:
        raise ValueError(f"groups has shape {tuple(group.shape)}; expected a 1-D array [N] of cluster ids")
    _check_same_length(data[0], "arrays[0]", group, "groups")
    _, cluster_of_row = np.unique(group, return_inverse=True)
    order = np.argsort(cluster_of_row, kind="stable")
    counts = np.bincount(cluster_of_row)
    n_clusters = len(counts)
    if n_clusters < 2:
        raise ValueError(f"groups holds {n_clusters} cluster; expected at least 2 clusters to resample")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows_of = [order[s:s + c] for s, c in zip(starts, counts)]

    def statistic(cluster_index: np.ndarray) -> float:
        rows = np.concatenate([rows_of[int(i)] for i in cluster_index])
        return float(metric_fn(*(a[rows] for a in data)))

    estimate = float(metric_fn(*data))
    with warnings.catch_warnings():
        # a degenerate bootstrap distribution (e.g. a metric that is 0 on every resample) is
        # reported as the NaN interval scipy returns, not as a warning
        warnings.simplefilter("ignore", category=getattr(scipy_stats, "DegenerateDataWarning", RuntimeWarning))
        result = scipy_stats.bootstrap((np.arange(n_clusters),), statistic, vectorized=False, paired=False,
                                       n_resamples=n_boot, confidence_level=1 - alpha, method=method,
                                       random_state=np.random.default_rng(seed))
    return BootstrapCI(estimate=estimate, lower=float(result.confidence_interval.low),
                       upper=float(result.confidence_interval.high), std=float(result.standard_error),
                       alpha=alpha, n_boot=n_boot, resample="cluster", n_clusters=int(n_clusters), method=method)


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: ArrayLike, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, groups: ArrayLike | None = None,
                 resample: Literal["auto", "cluster", "token"] = "auto",
                 method: Literal["percentile", "basic", "bca"] = "percentile") -> BootstrapCI:
    """Bootstrap interval of ``metric_fn(*arrays)``.

    All ``arrays`` share their first dimension (samples); each resample indexes every array with
    the same rows. Example: ``bootstrap_ci(expected_calibration_error, probs, labels)``; pass
    other arguments with ``functools.partial``.

    ``groups`` [N] (e.g. ``Predictions.group``: the sequence of each token) makes it a cluster
    bootstrap (:func:`cluster_bootstrap`, also ``il.stats.cluster_bootstrap``): whole sequences are resampled, as
    tokens of one window are not independent. ``resample``: ``"auto"`` (cluster when ``groups``
    is given, else token), ``"cluster"`` (needs ``groups``) or ``"token"`` (rows resampled
    independently, ignoring ``groups``: the interval is too narrow for correlated rows; kept for
    comparison). The token-level interval is a percentile interval (``method`` other than
    ``"percentile"`` needs clusters).
    """
    if resample not in ("auto", "cluster", "token"):
        raise ValueError(f"resample={resample!r}: expected 'auto', 'cluster' or 'token'")
    if resample == "cluster" and groups is None:
        raise ValueError("resample='cluster' needs groups=[N] cluster ids (e.g. Predictions.group)")
    if groups is not None and resample != "token":
        return cluster_bootstrap(metric_fn, *arrays, groups=groups, n_boot=n_boot, alpha=alpha, method=method,
                                 seed=seed)
    if method != "percentile":
        raise ValueError(f"method={method!r}: the token-level bootstrap gives percentile intervals; pass groups "
                         "for basic / bca (cluster_bootstrap)")
    if not callable(metric_fn):
        raise ValueError(f"metric_fn={metric_fn!r}: expected a callable metric(*arrays) -> float")
    if not arrays:
        raise ValueError("arrays: expected at least one array to resample")
    n_boot = _check_n_boot(n_boot)
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r}: expected a number in (0, 1)")
    data = _sample_arrays(arrays)
    estimate = float(metric_fn(*data))
    rng = np.random.default_rng(seed)
    n = len(data[0])
    values = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, n, size=n)
        values[b] = float(metric_fn(*(a[rows] for a in data)))
    lower, upper = np.nanquantile(values, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(estimate=estimate, lower=float(lower), upper=float(upper),
                       std=float(np.nanstd(values)), alpha=float(alpha), n_boot=int(n_boot))


# --------------------------------------------------------------------------------------------
# Temperature / vector scaling
# --------------------------------------------------------------------------------------------

def _logits_tensor(logits: Any, name: str = "logits") -> Tensor:
    """Validated 2-D float logits as a torch tensor (kept on its device; float64 when small)."""
    if isinstance(logits, Tensor):
        z = logits.detach()
        if z.ndim != 2:
            raise ValueError(f"{name} has shape {tuple(z.shape)}; expected a 2-D array [N, C] of logits")
        if z.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(z.shape)}); expected at least one sample")
        if not z.is_floating_point():
            raise ValueError(f"{name} has dtype {z.dtype}; expected floating-point logits")
        finite = torch.isfinite(z)
        if not bool(finite.all()):
            first = tuple(int(i) for i in torch.nonzero(~finite)[0])
            raise ValueError(f"{name} contains {int((~finite).sum())} NaN/inf value(s) (first "
                             f"{float(z[first])} at index {first}); expected finite logits")
        if z.shape[1] < 2:
            raise ValueError(f"{name} has shape {tuple(z.shape)}; expected at least 2 classes (columns)")
    else:
        z = torch.from_numpy(_logit_matrix(logits, name))
    # float64 for precise optimisation unless that would be large (LM vocabularies).
    return z.double() if z.numel() <= 2 ** 24 else z.float()


def _compute_dtype(numel: int) -> torch.dtype:
    """The dtype :func:`_logits_tensor` works in for ``numel`` logits (float64 when small)."""
    return torch.float64 if numel <= 2 ** 24 else torch.float32


def _check_logits_source(logits: Any, name: str = "logits") -> "Tensor | LogitStore":
    """A :class:`LogitStore` as it is (it holds finite float32 logits written by this library), or
    validated logits as a tensor (:func:`_logits_tensor`)."""
    if isinstance(logits, LogitStore):
        if len(logits) == 0 or logits.n_classes < 2:
            raise ValueError(f"{name} is {logits!r}; expected at least one row and 2 classes")
        return logits
    return _logits_tensor(logits, name)


def _logit_blocks(logits: "Tensor | LogitStore", block_rows: int | None = None):
    """Consecutive row blocks of in-memory or stored logits."""
    if isinstance(logits, LogitStore):
        yield from logits.blocks(block_rows)
        return
    block_rows = block_rows or block_rows_for(logits.shape[1] * logits.element_size())
    for start in range(0, logits.shape[0], block_rows):
        yield logits[start:start + block_rows]


class TemperatureScaler:
    """Post-hoc calibration of logits (Guo et al. 2017), scikit-learn style.

    ``mode="temperature"``: one temperature, ``logits / T``. ``mode="vector"``: per-class scale
    and bias, ``logits * scale + bias`` (Guo et al.'s vector scaling; scales kept positive so the
    ranking within a class is unchanged).

    Fitting minimises validation NLL with LBFGS over ``log T`` (so ``T > 0``), resp. log-scales
    and biases. The result never has worse validation NLL than the identity (T = 1): when the
    optimiser diverges or ends worse, the scaler falls back to the identity and records why in
    ``fallback_reason_`` (the reference implementation's known failure: T blows up, ECE worsens).

    Attributes (after ``fit``):
        temperature_: fitted T (temperature mode; None in vector mode).
        scale_, bias_: [C] arrays (vector mode; None in temperature mode).
        nll_before_, nll_after_: validation NLL at the identity and at the fitted parameters.
        fallback_reason_: None, or why the identity was kept.
        n_classes_: number of classes seen in fit.
    """

    # what a checkpoint stores and rebuilds (safe_serialize: declared fields only)
    __stored_fields__ = ("mode", "max_iter", "lr", "line_search_fn", "temperature_", "scale_", "bias_",
                         "n_classes_", "nll_before_", "nll_after_", "fallback_reason_")

    def __init__(self, mode: Literal["temperature", "vector"] = "temperature", max_iter: int = 100,
                 lr: float = 1.0, line_search_fn: str | None = "strong_wolfe"):
        if mode not in ("temperature", "vector"):
            raise ValueError(f"mode={mode!r}: expected 'temperature' or 'vector'")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter={max_iter!r}: expected a positive integer")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r}: expected a number > 0")
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn={line_search_fn!r}: expected 'strong_wolfe' or None")
        self.mode = mode
        self.max_iter = max_iter
        self.lr = float(lr)
        self.line_search_fn = line_search_fn

    def __repr__(self) -> str:
        fitted = ""
        if hasattr(self, "nll_after_"):
            fitted = f", temperature_={self.temperature_:.4g}" if self.mode == "temperature" else ", fitted"
        return f"TemperatureScaler(mode={self.mode!r}{fitted})"

    @staticmethod
    def _apply(z: Tensor, mode: str, log_t: Tensor | None, log_scale: Tensor | None,
               bias: Tensor | None) -> Tensor:
        if mode == "temperature":
            return z * torch.exp(-log_t)
        return z * torch.exp(log_scale) + bias

    def fit(self, logits: Float[ArrayLike, "n c"] | LogitStore, labels: Int[ArrayLike, " n"]) -> "TemperatureScaler":
        """Fit on validation ``logits`` [N, C] and class ``labels`` [N]; returns self.

        ``logits`` may be a :class:`~interp_lib.streaming.LogitStore` (logits on disk). Every
        evaluation of the NLL and its gradient streams the rows a block at a time (from the store,
        or from the tensor in memory), in float64, summing the per-block NLL and accumulating the
        gradient: the optimiser sees the exact float64 NLL of the float32 logits whether they are
        in memory or on disk, while memory holds one block. (Before, large logit matrices were
        fitted in float32, whose rounding moved SmolLM2's fitted T by about 1.5e-5.)"""
        z = _check_logits_source(logits)
        y_np = _class_labels(labels, z.shape[1])
        _check_same_length(z, "logits", y_np, "labels")
        dtype = torch.float64
        device = torch.device("cpu") if isinstance(z, LogitStore) else z.device
        y = torch.from_numpy(y_np).to(device)
        n_classes = z.shape[1]
        log_t = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
        log_scale = torch.zeros(n_classes, dtype=dtype, device=device, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=dtype, device=device, requires_grad=True)
        params = [log_t] if self.mode == "temperature" else [log_scale, bias]

        def streamed_nll(backward: bool) -> Tensor:
            """Mean NLL over the store's blocks (float64 sum of per-block sums); with
            ``backward`` the gradient of the mean is accumulated block by block."""
            total, start = 0.0, 0
            for block in _logit_blocks(z):
                rows = slice(start, start + block.shape[0])
                start += block.shape[0]
                loss = F.cross_entropy(self._apply(block.to(dtype), self.mode, log_t, log_scale, bias), y[rows],
                                       reduction="sum") / len(y)
                if backward:
                    loss.backward()
                total += float(loss.detach())
            return torch.tensor(total, dtype=dtype)

        def nll() -> Tensor:
            return streamed_nll(backward=False)

        with torch.no_grad():
            nll_identity = float(nll())
        optimizer = torch.optim.LBFGS(params, lr=self.lr, max_iter=self.max_iter,
                                      line_search_fn=self.line_search_fn,
                                      tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> Tensor:
            optimizer.zero_grad()
            return streamed_nll(backward=True)

        reason = None
        try:
            with torch.enable_grad():
                optimizer.step(closure)
            with torch.no_grad():
                nll_fitted = float(nll())
        except (RuntimeError, ValueError) as error:  # e.g. a line search on NaN losses
            nll_fitted, reason = float("nan"), f"LBFGS failed ({type(error).__name__}: {error})"
        params_finite = all(bool(torch.isfinite(p).all()) for p in params)
        describe = (f"T={float(torch.exp(log_t.detach())):.4g}" if self.mode == "temperature" and params_finite
                    else "the fitted parameters")
        if reason is None and (not params_finite or not math.isfinite(nll_fitted)):
            reason = f"LBFGS diverged ({describe}, validation NLL {nll_fitted})"
        elif reason is None and nll_fitted > nll_identity:
            reason = (f"LBFGS ended at {describe} with validation NLL {nll_fitted:.6g} > "
                      f"{nll_identity:.6g} at T=1")
        if reason is not None:
            reason += "; kept the identity (T=1)"
            with torch.no_grad():
                for parameter in (log_t, log_scale, bias):
                    parameter.zero_()
            nll_fitted = nll_identity

        self.n_classes_ = n_classes
        self.nll_before_ = nll_identity
        self.nll_after_ = nll_fitted
        self.fallback_reason_ = reason
        if self.mode == "temperature":
            self.temperature_ = float(torch.exp(log_t.detach()))
            self.scale_ = self.bias_ = None
        else:
            self.temperature_ = None
            self.scale_ = torch.exp(log_scale.detach()).cpu().numpy()
            self.bias_ = bias.detach().cpu().numpy()
        return self

    @property
    def temperature(self) -> float | None:
        """Alias of ``temperature_`` (the name in DESIGN.md's contract)."""
        self._check_fitted()
        return self.temperature_

    def _check_fitted(self) -> None:
        if not hasattr(self, "nll_after_"):
            raise RuntimeError("this TemperatureScaler is not fitted yet; call fit(logits, labels) first")

    def transform(self, logits: Float[ArrayLike, "n c"]) -> Float[ArrayLike, "n c"]:
        """Calibrated logits (softmax them for probabilities). Same container as the input: a
        torch tensor stays a tensor (same device, dtype); anything else gives a float64 numpy array."""
        self._check_fitted()
        z = _logits_tensor(logits)
        if z.shape[1] != self.n_classes_:
            raise ValueError(f"logits has {z.shape[1]} classes (columns); expected {self.n_classes_} as in fit")
        if self.mode == "temperature":
            out = z / self.temperature_
        else:
            out = z * torch.as_tensor(self.scale_, dtype=z.dtype, device=z.device) \
                + torch.as_tensor(self.bias_, dtype=z.dtype, device=z.device)
        if isinstance(logits, Tensor):
            return out.to(logits.dtype)
        return out.double().numpy()

    def predict_proba(self, logits: Float[ArrayLike, "n c"]) -> Float[np.ndarray, "n c"]:
        """Calibrated probabilities as a float64 numpy array."""
        z = self.transform(logits)
        z = z if isinstance(z, Tensor) else torch.from_numpy(z)
        return z.double().softmax(dim=1).cpu().numpy()

    def fit_transform(self, logits: Float[ArrayLike, "n c"], labels: Int[ArrayLike, " n"]) -> Float[ArrayLike, "n c"]:
        return self.fit(logits, labels).transform(logits)


# --------------------------------------------------------------------------------------------
# Labels for language models
# --------------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """A model's predictions on labelled examples, one row per example.

    For next-token prediction an example is one position of one sequence (``group`` = sequence
    index, ``position`` = the position predicting from); for classification prompts it is one
    prompt (``group`` = prompt index). ``logits`` [N, C] is kept on the CPU when requested (for
    temperature scaling); the other fields are small. Without labels, ``labels``, ``correct``
    and ``nll`` are None.
    """

    prediction: Int[np.ndarray, " n"]
    confidence: Float[np.ndarray, " n"]
    group: Int[np.ndarray, " n"]
    labels: Int[np.ndarray, " n"] | None = None
    correct: Bool[np.ndarray, " n"] | None = None
    nll: Float[np.ndarray, " n"] | None = None
    position: Int[np.ndarray, " n"] | None = None
    logits: Float[Tensor, "n c"] | LogitStore | None = None
    """[N, C] logits: a tensor (``keep_logits="memory"``, classification prompts) or a
    :class:`~interp_lib.streaming.LogitStore` on disk (next-token predictions, ``keep_logits=True``)"""
    class_names: list[str] | None = None
    """answer strings of the classes (classification prompts)"""

    def __len__(self) -> int:
        return len(self.prediction)

    @property
    def accuracy(self) -> float:
        if self.correct is None:
            raise ValueError("these predictions have no labels; accuracy is undefined")
        return float(np.mean(self.correct))

    def probs(self) -> Float[np.ndarray, "n c"]:
        """Softmax of the kept logits (float64 numpy)."""
        if self.logits is None:
            raise ValueError("logits were not kept (keep_logits=False); probabilities are unavailable")
        logits = self.logits.to_tensor() if isinstance(self.logits, LogitStore) else self.logits
        return logits.double().softmax(dim=1).numpy()

    def subset(self, rows: Int[np.ndarray, " k"] | Bool[np.ndarray, " n"]) -> "Predictions":
        """The predictions of the given rows (indices or a boolean mask)."""
        rows = np.asarray(rows)
        take = (lambda a: None if a is None else a[rows])
        return replace(self, prediction=self.prediction[rows], confidence=self.confidence[rows],
                       group=self.group[rows], labels=take(self.labels), correct=take(self.correct),
                       nll=take(self.nll), position=take(self.position),
                       logits=None if self.logits is None else (
                           self.logits.subset(rows) if isinstance(self.logits, LogitStore)
                           else self.logits[torch.from_numpy(rows)]))

    def split(self, val_fraction: float = 0.5, seed: int = 0) -> tuple["Predictions", "Predictions"]:
        """Disjoint (validation, test) splits by ``group``: all positions of a sequence land on the
        same side, so neighbouring tokens do not leak between the splits."""
        if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction!r}: expected a number in (0, 1)")
        groups = np.unique(self.group)
        if len(groups) < 2:
            raise ValueError(f"predictions come from {len(groups)} group(s) (sequences / prompts); "
                             "expected at least 2 to split into validation and test")
        order = np.random.default_rng(seed).permutation(groups)
        n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
        is_val = np.isin(self.group, order[:n_val])
        return self.subset(is_val), self.subset(~is_val)


def _token_batch(tokens: Any, name: str = "tokens", model: Any = None) -> Tensor:
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens)
    if not isinstance(tokens, Tensor):
        raise ValueError(f"{name} is {type(tokens).__name__}; expected a [batch, pos] integer tensor")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}; expected [batch, pos] with batch >= 1 "
                         "and pos >= 2 (one prediction per following token)")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {tokens.dtype}; expected integer token ids")
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if tokens.numel() and (int(tokens.min()) < 0 or isinstance(d_vocab, int) and int(tokens.max()) >= d_vocab):
        low, high = int(tokens.min()), int(tokens.max())
        bound = f"[0, {d_vocab - 1}] (the model's vocabulary has {d_vocab} tokens)" \
            if isinstance(d_vocab, int) else "of at least 0"
        raise ValueError(f"{name} holds token id {low if low < 0 else high}: expected ids in {bound}")
    return tokens.long()


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(getattr(model, "cfg", None), "device", None) or "cpu")


def _forward_logits(model: Any, tokens: Tensor) -> Tensor:
    out = model(tokens)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError(f"model(tokens) returned {type(out).__name__}; expected logits [batch, pos, vocab]")
    return logits


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")


@torch.no_grad()
def next_token_predictions(model: Any, tokens: Int[Tensor, "batch pos"], batch_size: int = 8,
                           keep_logits: bool | Literal["memory"] = True,
                           attention_mask: Int[Tensor, "batch pos"] | None = None,
                           max_logits_bytes: int = 2 * 2 ** 30, spill_dir: str | os.PathLike | None = None
                           ) -> Predictions:
    """Next-token predictions on held-out text, flattened over positions.

    Position ``t`` of each row predicts token ``t + 1``: confidence = top probability, correct =
    the top token is the true next token, ``nll`` = -log p(true token). Runs ``model(tokens)`` in
    batches of ``batch_size`` rows and keeps per-position summaries. The logits (needed for
    temperature scaling) are kept as ``keep_logits`` says:

    * ``True``: a :class:`~interp_lib.streaming.LogitStore`, the float32 logits written to a
      temporary file (in ``spill_dir``, ``$INTERP_LIB_SPILL_DIR`` or the system temporary folder)
      a batch at a time: memory does not grow with positions x vocabulary;
    * ``"memory"``: one float32 [N, vocab] tensor on the CPU, checked against
      ``max_logits_bytes`` before any work is done;
    * ``False``: none.

    Args:
        model: a TransformerLens bridge (or anything whose ``model(tokens)`` gives logits
            [batch, pos, vocab]).
        tokens: [batch, pos] token ids, e.g. from :func:`interp_lib.data.text_windows`.
        attention_mask: optional [batch, pos] 0/1; a prediction is kept only when both its
            input and its target position are 1 (drops padding).
    """
    tokens = _token_batch(tokens, model=model)
    _check_batch_size(batch_size)
    if keep_logits not in (True, False, "memory"):
        raise ValueError(f"keep_logits={keep_logits!r}: expected True (on disk), 'memory' or False")
    keep = torch.ones_like(tokens[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        mask = torch.as_tensor(_to_numpy(attention_mask, "attention_mask")) if not isinstance(attention_mask, Tensor) \
            else attention_mask.detach().cpu()
        if tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(tokens.shape)} like tokens")
        mask = mask.bool()
        keep = mask[:, :-1] & mask[:, 1:]
    n_kept = int(keep.sum())
    if n_kept == 0:
        raise ValueError("attention_mask leaves no position to predict; expected at least one 1-1 pair")
    cfg = getattr(model, "cfg", None)
    vocab = getattr(cfg, "d_vocab_out", None) or getattr(cfg, "d_vocab", None)
    if keep_logits == "memory" and vocab and n_kept * int(vocab) * 4 > max_logits_bytes:
        raise ValueError(f"keeping logits for {n_kept} positions x {vocab} vocabulary entries needs "
                         f"{n_kept * int(vocab) * 4 / 2 ** 30:.2f} GiB > max_logits_bytes="
                         f"{max_logits_bytes / 2 ** 30:.2f} GiB; pass fewer tokens, keep_logits=True (on disk), "
                         "keep_logits=False, or raise max_logits_bytes")
    device = _model_device(model)
    parts: dict[str, list] = {k: [] for k in ("prediction", "confidence", "labels", "nll", "group", "position", "logits")}
    positions = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    rows = torch.arange(tokens.shape[0])[:, None].expand(-1, tokens.shape[1] - 1)
    store = None
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        batch_logits = _forward_logits(model, batch.to(device))[:, :-1]
        batch_keep = keep[start:start + batch_size].to(batch_logits.device)
        if keep_logits is True and store is None:
            store = LogitStore(batch_logits.shape[-1], spill_dir)
        # one sequence at a time: no float32 copy of the whole batch's [b, pos, vocab] logits
        for i in range(batch_logits.shape[0]):
            logits = batch_logits[i][batch_keep[i]].float()          # [n, vocab]
            targets = batch[i, 1:].to(logits.device)[batch_keep[i]]
            log_probs = logits.log_softmax(dim=-1)
            top_log_prob, top = log_probs.max(dim=-1)
            parts["prediction"].append(top.cpu())
            parts["confidence"].append(top_log_prob.exp().cpu())
            parts["labels"].append(targets.cpu())
            parts["nll"].append(-log_probs.gather(-1, targets[:, None])[:, 0].cpu())
            del log_probs
            if keep_logits == "memory":
                parts["logits"].append(logits.cpu())
            elif keep_logits:
                store.append(logits)
        cpu_keep = batch_keep.cpu()
        parts["group"].append(rows[start:start + batch_size][cpu_keep])
        parts["position"].append(positions[start:start + batch_size][cpu_keep])
        del batch_logits
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    if store is not None:
        cat["logits"] = store
    labels = cat["labels"].numpy().astype(np.int64)
    prediction = cat["prediction"].numpy().astype(np.int64)
    return Predictions(prediction=prediction, confidence=cat["confidence"].double().numpy(),
                       group=cat["group"].numpy().astype(np.int64), labels=labels,
                       correct=prediction == labels, nll=cat["nll"].double().numpy(),
                       position=cat["position"].numpy().astype(np.int64), logits=cat.get("logits"))


def _answer_token_id(model: Any, answer: Any, where: str) -> int:
    if not isinstance(answer, str) or not answer:
        raise ValueError(f"{where}={answer!r}: expected a non-empty answer string")
    ids = model.to_tokens(answer, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = model.to_str_tokens(answer, prepend_bos=False)
        raise ValueError(f"{where}={answer!r} is {len(ids)} tokens {pieces} for this tokenizer; expected "
                         "exactly one token per answer (GPT-2 tokenizers usually want a leading space, e.g. ' yes')")
    return int(ids[0])


@torch.no_grad()
def classify_with_answer_tokens(model: Any, prompts: Sequence[str],
                                answers: Sequence[str] | Sequence[Sequence[str]],
                                labels: Int[ArrayLike, " n"] | None = None,
                                batch_size: int = 16) -> Predictions:
    """Score classification / multiple-choice prompts by the logits of one answer token per class.

    The model reads each prompt (with BOS, as ``model.to_tokens`` does) and the logits of the
    answer tokens at the last position are the class logits [N, C]: the predicted class is the
    answer with the highest logit, confidence its softmax probability among the answers.

    Args:
        model: a TransformerLens bridge (uses ``model.to_tokens`` and ``model(tokens)``).
        prompts: N prompt strings, e.g. ``"Review: great film! Sentiment:"``.
        answers: C answer strings shared by all prompts (``[" negative", " positive"]``), or one
            list of C answers per prompt (multiple choice with per-question options); each must
            be a single token.
        labels: optional [N] index of the right answer; gives ``correct`` and ``nll``.
        batch_size: prompts per forward pass (prompts are grouped by token length, no padding).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts={prompts!r:.80}: expected a non-empty list of prompt strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompts[{i}]={prompt!r}: expected a non-empty string")
    _check_batch_size(batch_size)
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"answers={answers!r}: expected a list of C >= 2 answer strings, or one such list per prompt")
    per_prompt = not isinstance(answers[0], str)
    if per_prompt:
        if len(answers) != len(prompts):
            raise ValueError(f"answers has {len(answers)} lists but prompts has {len(prompts)} entries; "
                             "expected one list of answers per prompt (or one shared list of strings)")
        n_classes = len(answers[0])
        answer_ids = []
        for i, options in enumerate(answers):
            if isinstance(options, str) or len(options) != n_classes:
                raise ValueError(f"answers[{i}]={options!r}: expected a list of {n_classes} answer strings like answers[0]")
            answer_ids.append([_answer_token_id(model, a, f"answers[{i}][{c}]") for c, a in enumerate(options)])
        class_names = None
    else:
        n_classes = len(answers)
        shared = [_answer_token_id(model, a, f"answers[{c}]") for c, a in enumerate(answers)]
        answer_ids = [shared] * len(prompts)
        class_names = list(answers)
    if n_classes < 2:
        raise ValueError(f"answers has {n_classes} class(es); expected at least 2 answers to compare")
    for i, ids in enumerate(answer_ids):
        if len(set(ids)) != len(ids):
            where = f"answers[{i}]" if per_prompt else "answers"
            raise ValueError(f"{where} map to repeated token ids {ids}; expected a distinct token per class")
        if not per_prompt:
            break
    y = None
    if labels is not None:
        y = _class_labels(labels, n_classes)
        _check_same_length(np.empty(len(prompts)), "prompts", y, "labels")

    device = _model_device(model)
    token_rows = [model.to_tokens(p)[0].cpu() for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(token_rows):
        by_length.setdefault(len(row), []).append(i)
    class_logits = torch.empty(len(prompts), n_classes)
    ids_all = torch.tensor(answer_ids)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = torch.stack([token_rows[i] for i in chunk]).to(device)
            last = _forward_logits(model, batch)[:, -1].float()          # [b, vocab]
            class_logits[chunk] = last.gather(1, ids_all[chunk].to(last.device)).cpu()
    log_probs = class_logits.double().log_softmax(dim=1)
    top_log_prob, prediction = log_probs.max(dim=1)
    prediction_np = prediction.numpy().astype(np.int64)
    result = Predictions(prediction=prediction_np, confidence=top_log_prob.exp().numpy(),
                         group=np.arange(len(prompts)), logits=class_logits, class_names=class_names)
    if y is not None:
        result.labels = y
        result.correct = prediction_np == y
        result.nll = -log_probs[torch.arange(len(y)), torch.from_numpy(y)].numpy()
    return result


# --------------------------------------------------------------------------------------------
# Temperature scaling evaluated on held-out data; comparison across models
# --------------------------------------------------------------------------------------------

def _metrics_from_logits(logits: Tensor, labels: np.ndarray, n_bins: int, strategy: str) -> dict[str, float]:
    """accuracy, NLL, ECE, MCE and Brier from [N, C] logits without an N x C float64 copy."""
    z = logits.float()
    y = torch.from_numpy(labels).to(z.device)
    log_p = z.log_softmax(dim=1)
    top_log_p, prediction = log_p.max(dim=1)
    confidence = top_log_p.exp().double().cpu().numpy()
    correct = (prediction == y).cpu().numpy()
    log_p_true = log_p.gather(1, y[:, None])[:, 0]
    brier = (log_p.exp().pow(2).sum(dim=1) - 2 * log_p_true.exp() + 1).double().mean()
    _, count, mean_conf, accuracy, _ = _binned(confidence, correct, n_bins, strategy)
    filled = count > 0
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-log_p_true.double().mean()),
        "ece": _ece_from_bins(count, mean_conf, accuracy),
        "mce": float(np.max(np.abs(accuracy[filled] - mean_conf[filled]))),
        "brier": float(brier),
    }


def _scaled_block(block: Tensor, scaler: "TemperatureScaler | None", dtype: torch.dtype) -> Tensor:
    """``scaler.transform(block)`` computed in ``dtype`` (the dtype the all-logits path uses for
    the whole matrix, so streamed and in-memory results agree), as float32."""
    z = block.to(dtype)
    if scaler is not None:
        if scaler.mode == "temperature":
            z = z / scaler.temperature_
        else:
            z = z * torch.as_tensor(scaler.scale_, dtype=dtype, device=z.device) \
                + torch.as_tensor(scaler.bias_, dtype=dtype, device=z.device)
    return z.float()


def _streamed_row_stats(logits: "Tensor | LogitStore", labels: np.ndarray | None,
                        scalers: dict[str, "TemperatureScaler | None"]) -> dict[str, dict[str, np.ndarray]]:
    """One pass over the rows of ``logits``: per row and per scaler (None = raw logits) the top
    probability ``confidence``, ``prediction``, and with labels ``log_p_true`` and the Brier term
    ``sum_c p_c^2 - 2 p_label + 1``. Memory: one block of rows (and [N] vectors)."""
    dtype = _compute_dtype(logits.numel())
    y = None if labels is None else torch.from_numpy(labels)
    keys = ("confidence", "prediction", "log_p_true", "brier") if y is not None else ("confidence", "prediction")
    parts: dict[str, dict[str, list[Tensor]]] = {name: {k: [] for k in keys} for name in scalers}
    start = 0
    for block in _logit_blocks(logits):
        y_block = None if y is None else y[start:start + block.shape[0]].to(block.device)
        start += block.shape[0]
        for name, scaler in scalers.items():
            log_p = _scaled_block(block, scaler, dtype).log_softmax(dim=1)
            top_log_p, prediction = log_p.max(dim=1)
            part = parts[name]
            part["confidence"].append(top_log_p.exp().cpu())
            part["prediction"].append(prediction.cpu())
            if y_block is not None:
                log_p_true = log_p.gather(1, y_block[:, None])[:, 0]
                part["log_p_true"].append(log_p_true.cpu())
                part["brier"].append((log_p.exp().pow(2).sum(dim=1) - 2 * log_p_true.exp() + 1).cpu())
            del log_p
    return {name: {k: torch.cat(v).numpy() for k, v in part.items()} for name, part in parts.items()}


def _metrics_from_stats(stats: dict[str, np.ndarray], labels: np.ndarray, n_bins: int, strategy: str
                        ) -> dict[str, float]:
    """accuracy, NLL, ECE, MCE and Brier from :func:`_streamed_row_stats` (as :func:`_metrics_from_logits`)."""
    confidence = stats["confidence"].astype(np.float64)
    correct = stats["prediction"] == labels
    _, count, mean_conf, accuracy, _ = _binned(confidence, correct, n_bins, strategy)
    filled = count > 0
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-stats["log_p_true"].astype(np.float64).mean()),
        "ece": _ece_from_bins(count, mean_conf, accuracy),
        "mce": float(np.max(np.abs(accuracy[filled] - mean_conf[filled]))),
        "brier": float(stats["brier"].astype(np.float64).mean()),
    }


@dataclass
class ScalingResult:
    """Temperature (or vector) scaling fitted on a validation split, measured on a test split."""

    scaler: TemperatureScaler
    before: dict[str, float]
    """test metrics of the raw logits: accuracy, nll, ece, mce, brier"""
    after: dict[str, float]
    """the same metrics after scaling"""
    n_val: int
    n_test: int

    def as_row(self) -> dict[str, Any]:
        """One flat table row: ``ece``, ``ece_scaled``, ``nll``, ``nll_scaled``, ... ``temperature``."""
        row: dict[str, Any] = {"n_val": self.n_val, "n_test": self.n_test}
        for key, value in self.before.items():
            row[key] = value
            if key != "accuracy" or self.scaler.mode == "vector":  # T never changes the argmax
                row[f"{key}_scaled"] = self.after[key]
        row["temperature"] = self.scaler.temperature_
        row["fallback"] = self.scaler.fallback_reason_
        return row


def evaluate_temperature_scaling(val_logits: Float[ArrayLike, "n_val c"], val_labels: Int[ArrayLike, " n_val"],
                                 test_logits: Float[ArrayLike, "n_test c"], test_labels: Int[ArrayLike, " n_test"],
                                 n_bins: int = 15, strategy: Strategy = "uniform",
                                 mode: Literal["temperature", "vector"] = "temperature") -> ScalingResult:
    """Fit a :class:`TemperatureScaler` on the validation split; report test metrics before and
    after. The two splits must be disjoint (e.g. from :meth:`Predictions.split`): fitting and
    measuring on the same data flatters the scaler."""
    _check_n_bins(n_bins)
    _check_strategy(strategy)
    if val_logits is test_logits:
        raise ValueError("val_logits and test_logits are the same object; expected disjoint validation and test splits")
    scaler = TemperatureScaler(mode=mode).fit(val_logits, val_labels)
    if isinstance(test_logits, LogitStore):  # streamed: one pass over the stored test logits
        _check_logits_source(test_logits, "test_logits")
        if test_logits.n_classes != scaler.n_classes_:
            raise ValueError(f"test_logits has {test_logits.n_classes} classes; expected {scaler.n_classes_} like "
                             "val_logits")
        y_test = _class_labels(test_labels, test_logits.n_classes, "test_labels")
        _check_same_length(test_logits, "test_logits", y_test, "test_labels")
        stats = _streamed_row_stats(test_logits, y_test, {"before": None, "after": scaler})
        return ScalingResult(scaler=scaler, before=_metrics_from_stats(stats["before"], y_test, n_bins, strategy),
                             after=_metrics_from_stats(stats["after"], y_test, n_bins, strategy),
                             n_val=len(_to_numpy(val_labels, "val_labels")), n_test=len(y_test))
    z_test = _logits_tensor(test_logits, "test_logits")
    if z_test.shape[1] != scaler.n_classes_:
        raise ValueError(f"test_logits has {z_test.shape[1]} classes; expected {scaler.n_classes_} like val_logits")
    y_test = _class_labels(test_labels, z_test.shape[1], "test_labels")
    _check_same_length(z_test, "test_logits", y_test, "test_labels")
    before = _metrics_from_logits(z_test, y_test, n_bins, strategy)
    after = _metrics_from_logits(scaler.transform(z_test), y_test, n_bins, strategy)
    return ScalingResult(scaler=scaler, before=before, after=after, n_val=len(_to_numpy(val_labels, "val_labels")),
                         n_test=len(y_test))


def compare_models(models: Sequence[Any], *, text: str | None = None, tokens: Tensor | None = None,
                   evaluate_fn: Callable[[Any], Predictions] | None = None, window_len: int = 128,
                   n_windows: int = 64, val_fraction: float = 0.5, n_bins: int = 15,
                   strategy: Strategy = "uniform", mode: Literal["temperature", "vector"] = "temperature",
                   batch_size: int = 8, seed: int = 0, device: str | None = None) -> pd.DataFrame:
    """Run the same calibration evaluation over several models and tabulate the results.

    Each model (a name or directory for :func:`interp_lib.load_model`, or an already loaded
    model) is evaluated on one of:

    * ``text``: cut into ``n_windows`` windows of ``window_len`` tokens with the model's own
      tokenizer (so models with different tokenizers compare on the same text), then
      :func:`next_token_predictions`;
    * ``tokens``: [batch, pos] ids for models that share a tokenizer (the GPT-2 sizes);
    * ``evaluate_fn(model) -> Predictions`` with logits kept (e.g. wrapping
      :func:`classify_with_answer_tokens`).

    The predictions are split by sequence / prompt into validation (``val_fraction``) and test;
    the scaler is fitted on validation and every metric is measured on test. Models loaded here
    are released before the next is loaded.

    Returns one row per model: ``model``, ``n_params``, ``n_val``, ``n_test``, ``accuracy``,
    ``nll``, ``nll_scaled``, ``ece``, ``ece_scaled``, ``mce``, ``mce_scaled``, ``brier``,
    ``brier_scaled``, ``temperature``, ``fallback``.
    """
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError(f"models={models!r}: expected a non-empty list of model names, directories or models")
    given = [name for name, value in (("text", text), ("tokens", tokens), ("evaluate_fn", evaluate_fn))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"got {given or 'none'} of text / tokens / evaluate_fn; expected exactly one")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ValueError("text is empty; expected held-out text to evaluate on")
    if tokens is not None:
        tokens = _token_batch(tokens)
    if evaluate_fn is not None and not callable(evaluate_fn):
        raise ValueError(f"evaluate_fn={evaluate_fn!r}: expected a callable model -> Predictions")
    from .data import text_windows
    from .models import load_model

    rows = []
    for entry in models:
        loaded_here = isinstance(entry, (str, os.PathLike))
        model = load_model(entry, device=device) if loaded_here else entry
        name = os.fspath(entry) if loaded_here else getattr(getattr(model, "cfg", None), "model_name", type(model).__name__)
        if evaluate_fn is not None:
            predictions = evaluate_fn(model)
            if not isinstance(predictions, Predictions) or predictions.logits is None or predictions.labels is None:
                raise ValueError(f"evaluate_fn returned {type(predictions).__name__} for {name!r}; expected "
                                 "Predictions with logits and labels")
        else:
            model_tokens = tokens if tokens is not None else text_windows(model, text, window_len, n_windows, seed=seed)
            predictions = next_token_predictions(model, model_tokens, batch_size=batch_size)
        val, test = predictions.split(val_fraction, seed=seed)
        result = evaluate_temperature_scaling(val.logits, val.labels, test.logits, test.labels,
                                              n_bins=n_bins, strategy=strategy, mode=mode)
        n_params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
        rows.append({"model": name, "n_params": n_params, **result.as_row()})
        del predictions, val, test, model
        if loaded_here:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Notebook-level helpers: labelled sets, one-call temperature-scaling reports, model lists
# --------------------------------------------------------------------------------------------

def classify_labelled(model: Any, items: Sequence[dict], batch_size: int = 16) -> Predictions:
    """:func:`classify_with_answer_tokens` over a labelled set from
    :func:`interp_lib.data.load_labelled`: items ``{"prompt", "options", "label", ...}``.

    When every item has the same options (a classification task such as SST-2) they are passed
    as one shared list, so ``class_names`` are the answers; otherwise per item (multiple choice).
    """
    if isinstance(items, (str, dict)) or not isinstance(items, Sequence) or len(items) == 0:
        raise ValueError(f"items={items!r:.80}: expected a non-empty list of labelled items "
                         "(dicts with 'prompt', 'options', 'label'), e.g. from il.data.load_labelled")
    for i, item in enumerate(items):
        missing = [k for k in ("prompt", "options", "label") if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"items[{i}] lacks {missing}; expected a dict with 'prompt', 'options', 'label'")
    options = [list(item["options"]) for item in items]
    shared = all(o == options[0] for o in options)
    return classify_with_answer_tokens(model, [item["prompt"] for item in items], options[0] if shared else options,
                                       labels=[item["label"] for item in items], batch_size=batch_size)


@torch.no_grad()
def confidence_from_logits(logits: Float[ArrayLike, "n c"], scaler: TemperatureScaler | None = None,
                           chunk_size: int = 4096) -> Float[np.ndarray, " n"]:
    """Top-label confidence ``max softmax(logits)`` [N], after ``scaler.transform`` when given.

    Works in chunks of ``chunk_size`` rows without a float64 [N, C] copy (LM vocabularies);
    ``logits`` may be a :class:`~interp_lib.streaming.LogitStore`."""
    if isinstance(logits, LogitStore):
        _check_logits_source(logits)
        dtype = _compute_dtype(logits.numel())
        return torch.cat([_scaled_block(block, scaler, dtype).softmax(dim=1).max(dim=1).values.double()
                          for block in logits.blocks()]).numpy()
    z = _logits_tensor(logits)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive integer")
    parts = []
    for start in range(0, z.shape[0], chunk_size):
        chunk = z[start:start + chunk_size]
        if scaler is not None:
            chunk = scaler.transform(chunk)
        parts.append(chunk.float().softmax(dim=1).max(dim=1).values.double().cpu())
    return torch.cat(parts).numpy()


def next_token_confidence(model: Any, tokens: Int[Tensor, "batch pos"], scaler: TemperatureScaler | None = None,
                          batch_size: int = 8) -> pd.DataFrame:
    """Per-position next-token ``confidence`` and ``correct`` (as :func:`next_token_predictions`)
    with ``group`` (row of ``tokens``) and ``position``; with a fitted ``scaler`` also
    ``confidence_scaled``. Logits are kept only while scaling, a batch at a time."""
    if scaler is not None and not hasattr(scaler, "nll_after_"):
        raise ValueError("scaler is not fitted; expected a TemperatureScaler after fit(...) or None")
    tokens = _token_batch(tokens, model=model)
    _check_batch_size(batch_size)
    frames = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        predictions = next_token_predictions(model, batch, batch_size=batch_size,
                                             keep_logits="memory" if scaler is not None else False)
        frame = pd.DataFrame({"group": predictions.group + start, "position": predictions.position,
                              "confidence": predictions.confidence, "correct": predictions.correct})
        if scaler is not None:
            frame["confidence_scaled"] = confidence_from_logits(predictions.logits, scaler)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@dataclass
class CalibrationReport:
    """Temperature scaling fitted on one split and measured on another, with everything a
    notebook shows: metrics before / after, bootstrap intervals, reliability data and the
    per-example confidences (small: no [N, C] logits, so it checkpoints cheaply).

    ``metrics`` has rows ``before`` / ``after`` (test split) and columns ``accuracy``, ``nll``,
    ``ece`` (uniform bins), ``ece_quantile``, ``mce``, ``brier``. ``ece_ci`` holds a
    :class:`BootstrapCI` of the uniform-bin test ECE for ``before`` and ``after``.
    ``reliability`` holds :func:`reliability_data` frames of the test split, ``before`` and
    ``after`` scaling.
    """

    scaler: TemperatureScaler
    metrics: pd.DataFrame
    ece_ci: dict[str, BootstrapCI]
    reliability: dict[str, pd.DataFrame]
    val_confidence: Float[np.ndarray, " n_val"]
    val_confidence_scaled: Float[np.ndarray, " n_val"]
    val_correct: Bool[np.ndarray, " n_val"]
    test_confidence: Float[np.ndarray, " n_test"]
    test_confidence_scaled: Float[np.ndarray, " n_test"]
    test_correct: Bool[np.ndarray, " n_test"]
    n_bins: int
    val_group: Int[np.ndarray, " n_val"] | None = None
    """sequence / prompt index of each validation example (``Predictions.group``)"""
    test_group: Int[np.ndarray, " n_test"] | None = None

    @property
    def temperature(self) -> float | None:
        return self.scaler.temperature_

    def summary(self) -> dict[str, float]:
        """Flat headline numbers of the test split: ``accuracy`` (``accuracy_after`` too in vector
        mode, where the prediction can change), ``ece_before``, ``ece_after``, ``ece_quantile_*``,
        ``mce_*``, ``brier_*``, ``nll_*`` and ``temperature`` (NaN in vector mode)."""
        out: dict[str, float] = {"accuracy": float(self.metrics.loc["before", "accuracy"])}
        if self.scaler.mode == "vector":
            out["accuracy_after"] = float(self.metrics.loc["after", "accuracy"])
        for column in self.metrics.columns.drop("accuracy"):
            for stage in ("before", "after"):
                out[f"{column}_{stage}"] = float(self.metrics.loc[stage, column])
        out["temperature"] = float(self.scaler.temperature_) if self.scaler.temperature_ is not None else math.nan
        return out


def temperature_scaling_report(val: Predictions, test: Predictions, n_bins: int = 15, n_boot: int = 200,
                               alpha: float = 0.05, seed: int = 0,
                               mode: Literal["temperature", "vector"] = "temperature",
                               resample: Literal["auto", "cluster", "token"] = "auto") -> CalibrationReport:
    """Fit temperature (or vector) scaling on ``val`` predictions, measure on ``test``.

    ``val`` and ``test`` are :class:`Predictions` with logits kept, from disjoint data (separate
    text splits, or :meth:`Predictions.split`). Returns a :class:`CalibrationReport`.

    The ECE intervals resample whole sequences (``test.group``) when the test predictions come
    from more than one (``resample="auto"`` or ``"cluster"``): tokens of a window are
    correlated, so resampling them one by one (``resample="token"``, the former behaviour)
    gives intervals that are too narrow.
    """
    for name, predictions in (("val", val), ("test", test)):
        if not isinstance(predictions, Predictions) or predictions.logits is None or predictions.labels is None:
            raise ValueError(f"{name} is {type(predictions).__name__}; expected Predictions with logits and labels "
                             "(keep_logits=True)")
    if val is test:
        raise ValueError("val and test are the same Predictions; expected disjoint validation and test splits")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2:
        raise ValueError(f"n_boot={n_boot!r}: expected an integer >= 2")
    if isinstance(val.logits, LogitStore) or isinstance(test.logits, LogitStore):
        # streamed: the scaler is fitted through the stored validation logits, then one pass over
        # each split gives every per-row number the report needs
        scaler = TemperatureScaler(mode=mode).fit(val.logits, val.labels)
        y_test = _class_labels(test.labels, scaler.n_classes_, "test.labels")
        test_stats = _streamed_row_stats(test.logits, y_test, {"before": None, "after": scaler})
        val_stats = _streamed_row_stats(val.logits, None, {"before": None, "after": scaler})
        result = ScalingResult(scaler=scaler, before=_metrics_from_stats(test_stats["before"], y_test, n_bins, "uniform"),
                               after=_metrics_from_stats(test_stats["after"], y_test, n_bins, "uniform"),
                               n_val=len(val), n_test=len(test))
        test_raw = test_stats["before"]["confidence"].astype(np.float64)
        test_scaled = test_stats["after"]["confidence"].astype(np.float64)
        val_raw = val_stats["before"]["confidence"].astype(np.float64)
        val_scaled = val_stats["after"]["confidence"].astype(np.float64)
        correct_after = test.correct if mode == "temperature" else test_stats["after"]["prediction"] == y_test
    else:
        result = evaluate_temperature_scaling(val.logits, val.labels, test.logits, test.labels,
                                              n_bins=n_bins, strategy="uniform", mode=mode)
        scaler = result.scaler
        test_scaled = confidence_from_logits(test.logits, scaler)
        test_raw = confidence_from_logits(test.logits)
        val_raw, val_scaled = confidence_from_logits(val.logits), confidence_from_logits(val.logits, scaler)
        # with mode="vector" the argmax may change; correctness is that of the scaled prediction then
        correct_after = test.correct if mode == "temperature" else (
            scaler.transform(test.logits).argmax(dim=1).cpu().numpy() == test.labels)
    rows = {}
    for stage, confidence, correct, measured in (("before", test_raw, test.correct, result.before),
                                                 ("after", test_scaled, correct_after, result.after)):
        rows[stage] = {**{k: measured[k] for k in ("accuracy", "nll", "ece")},
                       "ece_quantile": expected_calibration_error(confidence, correct, n_bins, "quantile"),
                       "mce": measured["mce"], "brier": measured["brier"]}
    if mode == "temperature":  # T > 0 never changes the argmax (float32 ties at huge T could)
        rows["after"]["accuracy"] = rows["before"]["accuracy"]
    metrics = pd.DataFrame.from_dict(rows, orient="index")
    ece = functools.partial(expected_calibration_error, n_bins=n_bins, strategy="uniform")
    if resample not in ("auto", "cluster", "token"):
        raise ValueError(f"resample={resample!r}: expected 'auto', 'cluster' or 'token'")
    n_groups = 0 if test.group is None else len(np.unique(test.group))
    if resample == "cluster" and n_groups < 2:
        raise ValueError(f"resample='cluster': the test predictions come from {n_groups} group(s); expected at "
                         "least 2 sequences / prompts to resample")
    groups = test.group if resample != "token" and n_groups >= 2 else None
    ece_ci = {"before": bootstrap_ci(ece, test_raw, test.correct, n_boot=n_boot, alpha=alpha, seed=seed,
                                     groups=groups),
              "after": bootstrap_ci(ece, test_scaled, correct_after, n_boot=n_boot, alpha=alpha, seed=seed,
                                    groups=groups)}
    reliability = {"before": reliability_data(test_raw, test.correct, n_bins),
                   "after": reliability_data(test_scaled, correct_after, n_bins)}
    return CalibrationReport(scaler=scaler, metrics=metrics, ece_ci=ece_ci, reliability=reliability,
                             val_confidence=val_raw, val_confidence_scaled=val_scaled,
                             val_correct=val.correct.copy(), test_confidence=test_raw,
                             test_confidence_scaled=test_scaled, test_correct=np.asarray(correct_after).copy(),
                             n_bins=n_bins, val_group=val.group.copy(), test_group=test.group.copy())
