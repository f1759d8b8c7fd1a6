"""Selective prediction: when should a model abstain?

* :func:`risk_coverage`: the risk-coverage curve of a confidence score, AURC and E-AURC;
  :func:`accuracy_at_coverage`.
* Thresholds: :func:`guaranteed_risk_threshold` (selection with guaranteed risk, Geifman &
  El-Yaniv 2017: the selective risk is below a target with probability ``1 - delta``) and the
  plain empirical :func:`confidence_threshold`.
* Uncertainty from ensembles (:func:`ensemble_disagreement`, :func:`ensemble_next_token_disagreement`:
  mutual information and variance of member probabilities) and out-of-distribution scores
  (:func:`max_softmax_probability`, :func:`energy_score`, :class:`MahalanobisScorer` on
  :func:`residual_features`), compared with :func:`ood_auroc`.
* :class:`AbstentionPolicy`: per input, predict or abstain, and why.

Convention: every score here is oriented so that **higher means more trustworthy / more
in-distribution** (confidence, max softmax probability, negative energy, negative Mahalanobis
distance).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from .calibration import (
    ArrayLike, _check_batch_size, _check_finite, _check_nonempty, _check_same_length, _class_labels, _correctness,
    _float_array, _forward_logits, _logits_tensor, _model_device, _probability_matrix, _to_numpy,
    _token_batch,
)
# "auto" model lists: their home is interp_lib.runtime (re-exported here)
from .runtime import ENSEMBLE_COLAB, ENSEMBLE_ENV, ENSEMBLE_OFFLINE, resolve_ensemble_members

__all__ = [
    "AbstentionPolicy", "AbstentionRule", "EnsembleUncertainty", "MahalanobisScorer", "RiskCoverage",
    "SelectiveThreshold", "abstention_table", "accuracy_at_coverage", "binomial_upper_bound",
    "confidence_threshold", "energy_score", "ensemble_disagreement", "ensemble_next_token_disagreement",
    "ensemble_risk_coverage", "guaranteed_risk_threshold", "max_softmax_probability", "ood_auroc",
    "ood_detection_table", "ood_scores", "residual_features", "resolve_ensemble_members", "risk_coverage",
    "risk_coverage_table", "sequence_scores",
]


def _scores_and_correct(confidence: Any, correct: Any, name: str = "confidence"
                        ) -> tuple[np.ndarray, np.ndarray]:
    score = _float_array(confidence, name, 1, f"a 1-D array [N] of {name} scores")
    ok = _correctness(correct, "correct")
    _check_same_length(score, name, ok, "correct")
    return score, ok


# --------------------------------------------------------------------------------------------
# Risk-coverage
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RiskCoverage:
    """The risk-coverage curve of a confidence score (Geifman et al. 2019 definitions).

    Points are at the distinct confidence values, most confident first: keeping every input with
    ``confidence >= threshold[i]`` covers ``coverage[i]`` of the inputs with selective risk
    (error rate among the kept) ``risk[i]``.

    ``aurc`` is the mean selective risk over the N coverages 1/N, ..., N/N (the k most confident
    inputs kept); inputs with tied confidence are taken in random order (expected value, so ties
    give neither an optimistic nor a pessimistic curve). ``optimal_aurc`` is the AURC of a
    perfect ranking with the same overall error (every correct input first), and
    ``eaurc = aurc - optimal_aurc`` (0 for a perfect ranking; 0 when all inputs are correct or
    all are wrong, where no ranking can help). The exact finite-N optimum is used, not the
    asymptotic ``r + (1 - r) ln(1 - r)``, so no logarithm or division degenerates at r = 0 or 1.
    """

    coverage: Float[np.ndarray, " k"]
    risk: Float[np.ndarray, " k"]
    threshold: Float[np.ndarray, " k"]
    aurc: float
    eaurc: float
    optimal_aurc: float
    error_rate: float
    """selective risk at full coverage (the plain error rate)"""
    n: int

    @property
    def selective_accuracy(self) -> Float[np.ndarray, " k"]:
        return 1.0 - self.risk

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"threshold": self.threshold, "coverage": self.coverage, "risk": self.risk,
                             "selective_accuracy": self.selective_accuracy})


def _expected_errors(confidence: np.ndarray, correct: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted-by-confidence tie groups: (group end counts, errors up to each end, thresholds,
    expected errors among the k most confident for k = 1..N under random tie order)."""
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    cumulative_errors = np.cumsum(~correct[order])
    ends = np.r_[np.nonzero(np.diff(sorted_conf))[0], len(sorted_conf) - 1]
    counts = ends + 1
    errors = cumulative_errors[ends].astype(np.float64)
    k = np.arange(1, len(confidence) + 1)
    # Within a tie group errors accrue linearly in expectation.
    expected = np.interp(k, np.r_[0, counts], np.r_[0.0, errors])
    return counts, errors, sorted_conf[ends], expected


def risk_coverage(confidence: Float[ArrayLike, " n"], correct: Bool[ArrayLike, " n"]) -> RiskCoverage:
    """Risk-coverage curve, AURC and E-AURC of ``confidence`` [N] against 0/1 ``correct`` [N]."""
    score, ok = _scores_and_correct(confidence, correct)
    n = len(score)
    counts, errors, thresholds, expected = _expected_errors(score, ok)
    k = np.arange(1, n + 1)
    aurc = float(np.mean(expected / k))
    n_correct = int(ok.sum())
    optimal = float(np.mean(np.maximum(0, k - n_correct) / k))
    return RiskCoverage(coverage=counts / n, risk=errors / counts, threshold=thresholds, aurc=aurc,
                        eaurc=max(0.0, aurc - optimal), optimal_aurc=optimal,
                        error_rate=float(1 - n_correct / n), n=n)


def accuracy_at_coverage(confidence: Float[ArrayLike, " n"], correct: Bool[ArrayLike, " n"],
                         coverage: float | Sequence[float]) -> float | pd.DataFrame:
    """Accuracy on the ``ceil(coverage * N)`` most confident inputs (ties in random order, in
    expectation). A scalar ``coverage`` gives a float; a sequence gives a DataFrame with
    ``coverage``, ``n_retained``, ``threshold`` (the lowest retained confidence), ``accuracy``,
    ``risk`` and ``abstained`` (the fraction not retained)."""
    score, ok = _scores_and_correct(confidence, correct)
    scalar = np.ndim(coverage) == 0
    targets = _float_array(np.atleast_1d(np.asarray(coverage, dtype=float)), "coverage", 1,
                           "coverages in (0, 1]")
    bad = (targets <= 0) | (targets > 1)
    if bad.any():
        raise ValueError(f"coverage must lie in (0, 1]; got {float(targets[np.argmax(bad)])!r}")
    n = len(score)
    _, _, _, expected = _expected_errors(score, ok)
    sorted_conf = np.sort(score)[::-1]
    kept = np.maximum(1, np.ceil(targets * n - 1e-9).astype(int))
    accuracy = 1 - expected[kept - 1] / kept
    if scalar:
        return float(accuracy[0])
    return pd.DataFrame({"coverage": targets, "n_retained": kept, "threshold": sorted_conf[kept - 1],
                         "accuracy": accuracy, "risk": 1 - accuracy, "abstained": 1 - kept / n})


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SelectiveThreshold:
    """A confidence threshold: predict when ``confidence >= threshold``, abstain otherwise.

    ``risk`` and ``coverage`` are measured on the data the threshold was chosen on; ``bound`` is
    the high-probability upper bound on the true selective risk (SGR; NaN for the empirical
    method). ``feasible`` is False when no threshold met the target: the threshold is then
    ``inf`` (abstain on everything).
    """

    threshold: float
    coverage: float
    risk: float
    bound: float
    n_covered: int
    n: int
    method: str
    """'sgr' (guaranteed risk) or 'empirical'"""
    target_risk: float | None = None
    delta: float | None = None
    feasible: bool = True

    def describe(self) -> str:
        if not self.feasible:
            return (f"no threshold reaches risk <= {self.target_risk:.3g} on {self.n} inputs"
                    f"{'' if self.delta is None else f' with probability {1 - self.delta:.3g}'}: abstain on everything")
        text = (f"predict when confidence >= {self.threshold:.4g}: coverage {100 * self.coverage:.1f}% "
                f"({self.n_covered}/{self.n}), empirical risk {100 * self.risk:.2f}%")
        if self.method == "sgr":
            text += (f", true risk <= {100 * self.bound:.2f}% (target {100 * self.target_risk:.2f}%) "
                     f"with probability >= {1 - self.delta:.4g}")
        return text

    def policy(self) -> "AbstentionPolicy":
        """An :class:`AbstentionPolicy` that applies this threshold to ``confidence``."""
        return AbstentionPolicy.confidence(self.threshold)


def binomial_upper_bound(n_errors: int, n: int, delta: float) -> float:
    """The ``1 - delta`` upper confidence bound on an error probability from ``n_errors`` of ``n``:
    the ``b`` solving ``P(Binomial(n, b) <= n_errors) = delta`` (one-sided Clopper-Pearson; the
    bound ``B*`` of Geifman & El-Yaniv 2017, eq. 4)."""
    if n < 1 or not 0 <= n_errors <= n:
        raise ValueError(f"n_errors={n_errors}, n={n}: expected 0 <= n_errors <= n and n >= 1")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r}: expected a probability in (0, 1)")
    if n_errors == n:
        return 1.0
    return float(stats.beta.ppf(1 - delta, n_errors + 1, n - n_errors))


def _check_probability(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        raise ValueError(f"{name}={value!r}: expected a number in (0, 1)")
    return float(value)


def guaranteed_risk_threshold(confidence: Float[ArrayLike, " n"], correct: Bool[ArrayLike, " n"],
                              target_risk: float, delta: float = 0.001) -> SelectiveThreshold:
    """Selection with guaranteed risk (SGR; Geifman & El-Yaniv 2017, Algorithm 1).

    Binary search over the sorted confidences for the lowest threshold whose binomial upper bound
    (at level ``delta / ceil(log2 N)`` per tested threshold, a union bound over the search) on the
    selective risk is below ``target_risk``. With probability at least ``1 - delta`` over the
    draw of this labelled sample, the returned threshold's selective risk on new inputs from the
    same distribution is at most ``bound <= target_risk``.

    Of the thresholds that met the target, the one with the largest coverage is returned (the
    paper returns the last one tested; both keep the guarantee). If none did, ``feasible`` is
    False and the threshold is ``inf``.
    """
    score, ok = _scores_and_correct(confidence, correct)
    target_risk = _check_probability(target_risk, "target_risk")
    delta = _check_probability(delta, "delta")
    m = len(score)
    sorted_conf = np.sort(score)
    n_steps = max(1, math.ceil(math.log2(m))) if m > 1 else 1
    step_delta = delta / n_steps
    errors = ~ok
    z_min, z_max = 0, m - 1
    best: SelectiveThreshold | None = None
    for _ in range(n_steps):
        z = math.ceil((z_min + z_max) / 2)
        theta = float(sorted_conf[z])
        selected = score >= theta  # ties with theta are selected too
        n_covered = int(selected.sum())
        n_errors = int(errors[selected].sum())
        bound = binomial_upper_bound(n_errors, n_covered, step_delta)
        if bound < target_risk:
            z_max = z
            if best is None or n_covered > best.n_covered:
                best = SelectiveThreshold(threshold=theta, coverage=n_covered / m, risk=n_errors / n_covered,
                                          bound=bound, n_covered=n_covered, n=m, method="sgr",
                                          target_risk=target_risk, delta=delta)
        else:
            z_min = z
    if best is None:
        return SelectiveThreshold(threshold=math.inf, coverage=0.0, risk=math.nan, bound=math.nan, n_covered=0,
                                  n=m, method="sgr", target_risk=target_risk, delta=delta, feasible=False)
    return best


def confidence_threshold(confidence: Float[ArrayLike, " n"], correct: Bool[ArrayLike, " n"], *,
                         target_risk: float | None = None, coverage: float | None = None) -> SelectiveThreshold:
    """A plain (empirical, no guarantee) confidence threshold: give exactly one of

    * ``target_risk``: the lowest threshold whose selective risk on this data is <= the target
      (largest coverage);
    * ``coverage``: the highest threshold that keeps at least this fraction of the inputs.
    """
    if (target_risk is None) == (coverage is None):
        raise ValueError(f"target_risk={target_risk!r}, coverage={coverage!r}: expected exactly one of them")
    score, ok = _scores_and_correct(confidence, correct)
    curve = risk_coverage(score, ok)
    n = len(score)
    counts = np.rint(curve.coverage * n).astype(int)
    if target_risk is not None:
        if isinstance(target_risk, bool) or not isinstance(target_risk, (int, float)) or not 0 <= target_risk < 1:
            raise ValueError(f"target_risk={target_risk!r}: expected a number in [0, 1)")
        feasible = np.nonzero(curve.risk <= target_risk + 1e-12)[0]
        if len(feasible) == 0:
            return SelectiveThreshold(threshold=math.inf, coverage=0.0, risk=math.nan, bound=math.nan, n_covered=0,
                                      n=n, method="empirical", target_risk=target_risk, feasible=False)
        i = int(feasible[-1])
    else:
        if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
            raise ValueError(f"coverage={coverage!r}: expected a number in (0, 1]")
        i = int(np.searchsorted(counts, math.ceil(coverage * n - 1e-9), side="left"))
    return SelectiveThreshold(threshold=float(curve.threshold[i]), coverage=float(curve.coverage[i]),
                              risk=float(curve.risk[i]), bound=math.nan, n_covered=int(counts[i]), n=n,
                              method="empirical", target_risk=target_risk)


# --------------------------------------------------------------------------------------------
# Ensembles
# --------------------------------------------------------------------------------------------

@dataclass
class EnsembleUncertainty:
    """Uncertainty of an ensemble's prediction per input (entropies in nats).

    ``predictive_entropy`` H[mean_m p_m] = ``expected_entropy`` mean_m H[p_m] (aleatoric) +
    ``mutual_information`` (epistemic: the members disagree; BALD). ``variance`` is the variance
    across members of the probability of the ensemble's predicted class. ``confidence`` is the
    ensemble's mean probability of its prediction.
    """

    prediction: Int[np.ndarray, " n"]
    confidence: Float[np.ndarray, " n"]
    predictive_entropy: Float[np.ndarray, " n"]
    expected_entropy: Float[np.ndarray, " n"]
    mutual_information: Float[np.ndarray, " n"]
    variance: Float[np.ndarray, " n"]
    mean_probs: Float[np.ndarray, "n c"] | None = None
    labels: Int[np.ndarray, " n"] | None = None
    correct: Bool[np.ndarray, " n"] | None = None

    def to_frame(self) -> pd.DataFrame:
        columns = {k: getattr(self, k) for k in ("prediction", "confidence", "predictive_entropy",
                                                  "expected_entropy", "mutual_information", "variance",
                                                  "labels", "correct") if getattr(self, k) is not None}
        return pd.DataFrame(columns)


def _ensemble_stats(probs: Tensor) -> dict[str, Tensor]:
    """probs [member, n, class] (float64) -> per-input statistics."""
    mean = probs.mean(dim=0)
    confidence, prediction = mean.max(dim=-1)
    predictive = -torch.special.xlogy(mean, mean).sum(-1)
    expected = -torch.special.xlogy(probs, probs).sum(-1).mean(0)
    chosen = probs.gather(-1, prediction[None, :, None].expand(probs.shape[0], -1, 1))[..., 0]
    return {"prediction": prediction, "confidence": confidence, "predictive_entropy": predictive,
            "expected_entropy": expected, "mutual_information": (predictive - expected).clamp_min(0),
            "variance": chosen.var(dim=0, unbiased=False), "mean": mean}


def ensemble_disagreement(member_probs: Float[ArrayLike, "member n c"] | Sequence[Float[ArrayLike, "n c"]],
                          labels: Int[ArrayLike, " n"] | None = None) -> EnsembleUncertainty:
    """Disagreement of M ensemble members (models or seeds) given their probabilities [M, N, C]."""
    if isinstance(member_probs, (list, tuple)):
        if len(member_probs) == 0:
            raise ValueError("member_probs is empty; expected probabilities of at least 2 members")
        members = [_probability_matrix(p, f"member_probs[{m}]") for m, p in enumerate(member_probs)]
        for m, p in enumerate(members):
            if p.shape != members[0].shape:
                raise ValueError(f"member_probs[{m}] has shape {p.shape}; expected {members[0].shape} like member 0")
        stacked = np.stack(members)
    else:
        stacked = _float_array(member_probs, "member_probs", 3, "[member, N, C] probabilities")
        for m in range(len(stacked)):
            _probability_matrix(stacked[m], f"member_probs[{m}]")
    if stacked.shape[0] < 2:
        raise ValueError(f"member_probs has {stacked.shape[0]} member(s); expected at least 2 to disagree")
    out = _ensemble_stats(torch.from_numpy(stacked))
    result = EnsembleUncertainty(**{k: v.numpy() for k, v in out.items() if k != "mean"},
                                 mean_probs=out["mean"].numpy())
    if labels is not None:
        y = _class_labels(labels, stacked.shape[2])
        _check_same_length(stacked[0], "member_probs[0]", y, "labels")
        result.labels, result.correct = y, result.prediction == y
    return result


@torch.no_grad()
def ensemble_next_token_disagreement(models: Sequence[Any], tokens: Int[Tensor, "batch pos"],
                                     batch_size: int = 8) -> EnsembleUncertainty:
    """Ensemble disagreement on next-token prediction over [batch, pos] ``tokens``, flattened over
    positions like :func:`interp_lib.calibration.next_token_predictions` (members must share a
    tokenizer, e.g. seeds of one model). Computed batch by batch: the [member, N, vocab]
    probabilities are never held at once (``mean_probs`` is None). ``labels`` / ``correct`` are
    the true next tokens."""
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or len(models) < 2:
        raise ValueError(f"models={models!r:.80}: expected a list of at least 2 loaded models")
    tokens = _token_batch(tokens)
    _check_batch_size(batch_size)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        member_probs = []
        for i, model in enumerate(models):
            logits = _forward_logits(model, batch.to(_model_device(model)))[:, :-1]
            if member_probs and logits.shape[-1] != member_probs[0].shape[-1]:
                raise ValueError(f"models[{i}] has {logits.shape[-1]} vocabulary entries; expected "
                                 f"{member_probs[0].shape[-1]} like models[0] (members must share a tokenizer)")
            member_probs.append(logits.double().softmax(-1).flatten(0, 1).cpu())
        out = _ensemble_stats(torch.stack(member_probs))
        out["labels"] = batch[:, 1:].flatten()
        for key, value in out.items():
            if key != "mean":
                parts.setdefault(key, []).append(value)
    cat = {k: torch.cat(v).numpy() for k, v in parts.items()}
    labels = cat.pop("labels").astype(np.int64)
    return EnsembleUncertainty(**cat, labels=labels, correct=cat["prediction"] == labels)


# --------------------------------------------------------------------------------------------
# Out-of-distribution scores
# --------------------------------------------------------------------------------------------

def max_softmax_probability(logits: Float[ArrayLike, "n c"]) -> Float[np.ndarray, " n"]:
    """Maximum softmax probability (Hendrycks & Gimpel 2017); higher = more in-distribution."""
    z = _logits_tensor(logits)
    return z.softmax(dim=1).max(dim=1).values.double().cpu().numpy()


def energy_score(logits: Float[ArrayLike, "n c"], temperature: float = 1.0) -> Float[np.ndarray, " n"]:
    """Negative free energy ``T * logsumexp(logits / T)`` (Liu et al. 2020); higher = more
    in-distribution. Unlike the max softmax probability it keeps the logits' overall scale."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: expected a finite number > 0")
    z = _logits_tensor(logits)
    return (temperature * torch.logsumexp(z / temperature, dim=1)).double().cpu().numpy()


class MahalanobisScorer:
    """Mahalanobis-distance OOD score on features (Lee et al. 2018), scikit-learn style.

    ``class_conditional=True``: one mean per class and a shared (tied) covariance; the distance of
    an input is to the closest class mean. ``False``: a single Gaussian (one mean, one covariance)
    for all in-distribution features, no labels needed. ``regularization`` adds
    ``regularization * mean(diag(covariance))`` to the diagonal: residual-stream features often
    have more dimensions than samples, where the plain covariance is singular.

    Attributes (after ``fit``): ``classes_``, ``means_`` [K, D], ``covariance_`` [D, D],
    ``precision_`` [D, D].
    """

    def __init__(self, class_conditional: bool = True, regularization: float = 1e-3):
        if not isinstance(regularization, (int, float)) or regularization < 0:
            raise ValueError(f"regularization={regularization!r}: expected a number >= 0")
        self.class_conditional = bool(class_conditional)
        self.regularization = float(regularization)

    def fit(self, features: Float[ArrayLike, "n d"], labels: Int[ArrayLike, " n"] | None = None) -> "MahalanobisScorer":
        """Fit on in-distribution ``features`` [N, D] (with class ``labels`` [N] if class-conditional)."""
        x = _float_array(features, "features", 2, "a 2-D array [N, D] of in-distribution features")
        if self.class_conditional:
            if labels is None:
                raise ValueError("labels is None; expected [N] class labels for class_conditional=True "
                                 "(or use class_conditional=False for a single Gaussian)")
            y = _to_numpy(labels, "labels")
            if y.ndim != 1:
                raise ValueError(f"labels has shape {tuple(y.shape)}; expected a 1-D array [N] of class labels")
            _check_nonempty(y, "labels")
            if y.dtype.kind == "f":
                _check_finite(y, "labels", "class labels")
            _check_same_length(x, "features", y, "labels")
            classes, inverse = np.unique(y, return_inverse=True)
        else:
            classes, inverse = np.array([0]), np.zeros(len(x), dtype=np.int64)
        if len(x) < 2:
            raise ValueError(f"features has {len(x)} row(s); expected at least 2 to estimate a covariance")
        means = np.stack([x[inverse == k].mean(axis=0) for k in range(len(classes))])
        centred = x - means[inverse]
        covariance = centred.T @ centred / len(x)
        ridge = self.regularization * float(np.mean(np.diag(covariance)))
        regularized = covariance + ridge * np.eye(x.shape[1])
        self.classes_ = classes
        self.means_ = means
        self.covariance_ = covariance
        self.precision_ = np.linalg.pinv(regularized, hermitian=True)
        return self

    def class_distances(self, features: Float[ArrayLike, "n d"]) -> Float[np.ndarray, "n k"]:
        """Squared Mahalanobis distance of each input to each class mean [N, K]."""
        if not hasattr(self, "precision_"):
            raise RuntimeError("this MahalanobisScorer is not fitted yet; call fit(features, labels) first")
        x = _float_array(features, "features", 2, f"a 2-D array [N, {self.means_.shape[1]}] of features")
        if x.shape[1] != self.means_.shape[1]:
            raise ValueError(f"features has {x.shape[1]} columns; expected {self.means_.shape[1]} as in fit")
        xp = x @ self.precision_
        mp = self.means_ @ self.precision_
        squared = (np.einsum("nd,nd->n", xp, x)[:, None] - 2 * xp @ self.means_.T
                   + np.einsum("kd,kd->k", mp, self.means_)[None, :])
        return np.maximum(squared, 0.0)

    def distance(self, features: Float[ArrayLike, "n d"]) -> Float[np.ndarray, " n"]:
        """Squared Mahalanobis distance to the closest class mean [N]."""
        return self.class_distances(features).min(axis=1)

    def score(self, features: Float[ArrayLike, "n d"]) -> Float[np.ndarray, " n"]:
        """``-distance``: higher = more in-distribution, like the other scores."""
        return -self.distance(features)


@torch.no_grad()
def residual_features(model: Any, tokens: Int[Tensor, "batch pos"], layer: int = -1,
                      reduce: str = "mean", batch_size: int = 16,
                      hook_name: str | None = None) -> Float[np.ndarray, "n d_model"]:
    """Residual-stream features for OOD scoring: ``blocks.{layer}.hook_resid_post`` (or
    ``hook_name``) over [batch, pos] ``tokens``. ``reduce``: ``"mean"`` over positions or
    ``"last"`` position -> [batch, d_model]; ``"none"`` -> [batch * pos, d_model]."""
    tokens = _token_batch(tokens)
    _check_batch_size(batch_size)
    if reduce not in ("mean", "last", "none"):
        raise ValueError(f"reduce={reduce!r}: expected 'mean', 'last' or 'none'")
    n_layers = model.cfg.n_layers
    if hook_name is None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"layer={layer!r}: expected an integer in [{-n_layers}, {n_layers - 1}]")
        hook_name = f"blocks.{layer % n_layers}.hook_resid_post"
    device = _model_device(model)
    chunks = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(device)
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name == hook_name)
        if hook_name not in cache:
            raise ValueError(f"hook_name={hook_name!r} is not a hook of this model (e.g. 'blocks.0.hook_resid_post')")
        resid = cache[hook_name].double()
        resid = resid.mean(1) if reduce == "mean" else resid[:, -1] if reduce == "last" else resid.flatten(0, 1)
        chunks.append(resid.cpu())
    return torch.cat(chunks).numpy()


def ood_auroc(scores_in: Float[ArrayLike, " n_in"], scores_out: Float[ArrayLike, " n_out"],
              higher_is_in: bool = True) -> float:
    """AUROC of telling in-distribution from out-of-distribution inputs by a score:
    ``P(score_in > score_out) + P(tie) / 2`` (Mann-Whitney). 1 = perfect separation, 0.5 =
    chance. ``higher_is_in=False`` for scores where larger means more anomalous (a distance)."""
    s_in = _float_array(scores_in, "scores_in", 1, "a 1-D array [N_in] of scores")
    s_out = _float_array(scores_out, "scores_out", 1, "a 1-D array [N_out] of scores")
    ranks = stats.rankdata(np.concatenate([s_in, s_out]))
    u = ranks[:len(s_in)].sum() - len(s_in) * (len(s_in) + 1) / 2
    auc = float(u / (len(s_in) * len(s_out)))
    return auc if higher_is_in else 1.0 - auc


# --------------------------------------------------------------------------------------------
# Abstention policies
# --------------------------------------------------------------------------------------------

def _format_pair(value: float, threshold: float) -> tuple[str, str]:
    """Short numbers, with more digits only when needed to show which side of the threshold."""
    for digits in (2, 3, 4, 6, 8, 12):
        a, b = f"{value:.{digits}g}", f"{threshold:.{digits}g}"
        if a != b or value == threshold:
            return a, b
    return repr(value), repr(threshold)


@dataclass(frozen=True)
class AbstentionRule:
    """Predict only when ``score >= threshold`` (``higher_is_better``) or ``score <= threshold``."""

    score: str
    """name of the score this rule reads, e.g. 'confidence', 'mahalanobis', 'mutual_information'"""
    threshold: float
    higher_is_better: bool = True

    def passes(self, values: Float[np.ndarray, " n"]) -> Bool[np.ndarray, " n"]:
        return values >= self.threshold if self.higher_is_better else values <= self.threshold

    def explain(self, value: float) -> str:
        ok = bool(self.passes(np.asarray([value]))[0])
        if self.higher_is_better:
            op = ">=" if ok else "<"
        else:
            op = "<=" if ok else ">"
        shown, limit = _format_pair(float(value), float(self.threshold))
        return f"{self.score} {shown} {op} threshold {limit}"

    @classmethod
    def from_in_distribution(cls, score: str, scores_in: Float[ArrayLike, " n"], keep: float = 0.95,
                             higher_is_better: bool = True) -> "AbstentionRule":
        """A rule that passes ``keep`` of the in-distribution ``scores_in`` (e.g. 95% TPR)."""
        values = _float_array(scores_in, "scores_in", 1, "a 1-D array of in-distribution scores")
        keep = _check_probability(keep, "keep")
        q = 1 - keep if higher_is_better else keep
        return cls(score, float(np.quantile(values, q)), higher_is_better)


class AbstentionPolicy:
    """Per input: predict, or abstain and say why.

    A policy is one or more :class:`AbstentionRule` s; it predicts when every rule passes.
    ``decide`` takes the scores by name (``confidence=...``, ``mahalanobis=...``) and returns one
    row per input with ``decision`` ('predict' / 'abstain') and a ``reason`` such as
    ``"confidence 0.31 < threshold 0.52"`` (failed rules when abstaining, all rules otherwise).
    """

    def __init__(self, rules: AbstentionRule | Sequence[AbstentionRule]):
        rules = [rules] if isinstance(rules, AbstentionRule) else list(rules)
        if not rules or not all(isinstance(r, AbstentionRule) for r in rules):
            raise ValueError(f"rules={rules!r}: expected one or more AbstentionRule")
        self.rules = rules

    @classmethod
    def confidence(cls, threshold: float | SelectiveThreshold) -> "AbstentionPolicy":
        """Predict when ``confidence >= threshold`` (a number or a :class:`SelectiveThreshold`)."""
        value = threshold.threshold if isinstance(threshold, SelectiveThreshold) else threshold
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or math.isnan(value):
            raise ValueError(f"threshold={threshold!r}: expected a number or a SelectiveThreshold")
        return cls(AbstentionRule("confidence", float(value)))

    def __repr__(self) -> str:
        return f"AbstentionPolicy({self.describe()})"

    def describe(self) -> str:
        return " and ".join(f"{r.score} {'>=' if r.higher_is_better else '<='} {r.threshold:.4g}" for r in self.rules)

    def _scores(self, scores: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [r.score for r in self.rules if r.score not in scores]
        if missing:
            raise ValueError(f"scores {missing} are missing; this policy reads {[r.score for r in self.rules]} "
                             f"(got {sorted(scores)})")
        values = {name: _float_array(scores[name], name, 1, f"a 1-D array [N] of {name} scores")
                  for name in dict.fromkeys(r.score for r in self.rules)}
        first = next(iter(values))
        for name, v in values.items():
            _check_same_length(values[first], first, v, name)
        return values

    def decide(self, predictions: Int[ArrayLike, " n"] | None = None, **scores: Float[ArrayLike, " n"]) -> pd.DataFrame:
        """One row per input: ``decision``, ``predict`` (bool), the scores, ``prediction`` (if
        given; None where abstaining) and ``reason``."""
        values = self._scores(scores)
        n = len(next(iter(values.values())))
        passed = np.stack([rule.passes(values[rule.score]) for rule in self.rules])  # [rule, n]
        predict = passed.all(axis=0)
        reasons = []
        for i in range(n):
            chosen = [r for j, r in enumerate(self.rules) if predict[i] or not passed[j, i]]
            reasons.append("; ".join(r.explain(values[r.score][i]) for r in chosen))
        frame = pd.DataFrame({"decision": np.where(predict, "predict", "abstain"), "predict": predict, **values})
        if predictions is not None:
            pred = _to_numpy(predictions, "predictions")
            if pred.ndim != 1:
                raise ValueError(f"predictions has shape {pred.shape}; expected [N]")
            _check_same_length(pred, "predictions", predict, next(iter(values)))
            frame["prediction"] = pd.array(np.where(predict, pred, 0), dtype="Int64")
            frame.loc[~predict, "prediction"] = pd.NA
        frame["reason"] = reasons
        return frame

    def evaluate(self, correct: Bool[ArrayLike, " n"], **scores: Float[ArrayLike, " n"]) -> dict[str, float]:
        """Coverage and accuracy on what the policy keeps: ``n``, ``n_predicted``, ``coverage``,
        ``abstention_rate``, ``accuracy_predicted``, ``risk_predicted``, ``accuracy_abstained``
        (how often the abstained inputs would have been right) and ``accuracy_all``."""
        values = self._scores(scores)
        ok = _correctness(correct, "correct")
        first = next(iter(values))
        _check_same_length(ok, "correct", values[first], first)
        predict = np.stack([rule.passes(values[rule.score]) for rule in self.rules]).all(axis=0)
        n_pred = int(predict.sum())
        return {
            "n": len(ok), "n_predicted": n_pred, "coverage": n_pred / len(ok),
            "abstention_rate": 1 - n_pred / len(ok),
            "accuracy_predicted": float(ok[predict].mean()) if n_pred else math.nan,
            "risk_predicted": float(1 - ok[predict].mean()) if n_pred else math.nan,
            "accuracy_abstained": float(ok[~predict].mean()) if n_pred < len(ok) else math.nan,
            "accuracy_all": float(ok.mean()),
        }


# --------------------------------------------------------------------------------------------
# Notebook-level helpers: tables, sequence-level OOD scores, ensemble members
# --------------------------------------------------------------------------------------------

def risk_coverage_table(curves: Mapping[str, RiskCoverage]) -> pd.DataFrame:
    """One row per named :class:`RiskCoverage`: ``aurc``, ``eaurc``, ``optimal_aurc``,
    ``error_rate`` (risk at full coverage) and ``n``."""
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"curves={curves!r:.80}: expected a non-empty mapping name -> risk_coverage(...) result")
    rows = []
    for name, curve in curves.items():
        if not isinstance(curve, RiskCoverage):
            raise ValueError(f"curves[{name!r}] is {type(curve).__name__}; expected a RiskCoverage")
        rows.append({"score": name, "aurc": curve.aurc, "eaurc": curve.eaurc, "optimal_aurc": curve.optimal_aurc,
                     "error_rate": curve.error_rate, "n": curve.n})
    return pd.DataFrame(rows).set_index("score")


def ensemble_risk_coverage(uncertainty: EnsembleUncertainty) -> dict[str, RiskCoverage]:
    """Risk-coverage of the ensemble's prediction ranked by each uncertainty (higher = keep first):
    ``confidence`` (mean member probability), ``-mutual_information`` (member disagreement),
    ``-predictive_entropy`` and ``-variance``. Needs ``uncertainty.correct`` (labels given)."""
    if not isinstance(uncertainty, EnsembleUncertainty) or uncertainty.correct is None:
        raise ValueError("uncertainty: expected an EnsembleUncertainty computed with labels (correct is set)")
    ok = uncertainty.correct
    return {"confidence": risk_coverage(uncertainty.confidence, ok),
            "-mutual_information": risk_coverage(-uncertainty.mutual_information, ok),
            "-predictive_entropy": risk_coverage(-uncertainty.predictive_entropy, ok),
            "-variance": risk_coverage(-uncertainty.variance, ok)}


def _per_sequence_scores(logits: Tensor, tokens: Tensor) -> dict[str, Tensor]:
    """logits [batch, pos, vocab] of ``tokens`` [batch, pos] -> per-sequence mean scores."""
    logits = logits[:, :-1].float()
    log_p = logits.log_softmax(dim=-1)
    return {"msp": log_p.max(dim=-1).values.exp().mean(dim=1),
            "energy": torch.logsumexp(logits, dim=-1).mean(dim=1),
            "log_prob": log_p.gather(-1, tokens[:, 1:, None].to(log_p.device))[..., 0].mean(dim=1)}


@torch.no_grad()
def sequence_scores(model: Any, tokens: Int[Tensor, "batch pos"], batch_size: int = 16) -> pd.DataFrame:
    """Per-sequence in-distribution scores from the model's own predictions (higher = more
    in-distribution), each the mean over the sequence's positions of:

    * ``msp``: the maximum softmax probability of the next-token distribution;
    * ``energy``: the negative free energy ``logsumexp(logits)`` (:func:`energy_score`, T = 1);
    * ``log_prob``: the log-probability of the actual next token (minus the log-perplexity).
    """
    tokens = _token_batch(tokens)
    _check_batch_size(batch_size)
    device = _model_device(model)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(device)
        for key, value in _per_sequence_scores(_forward_logits(model, batch), batch).items():
            parts.setdefault(key, []).append(value.cpu())
    return pd.DataFrame({k: torch.cat(v).double().numpy() for k, v in parts.items()})


@torch.no_grad()
def _scores_and_features(model: Any, tokens: Tensor, hook_name: str, batch_size: int
                         ) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`sequence_scores` and mean residual features of ``hook_name`` from one forward pass."""
    device = _model_device(model)
    parts: dict[str, list[Tensor]] = {}
    features = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(device)
        logits, cache = model.run_with_cache(batch, names_filter=lambda name: name == hook_name)
        for key, value in _per_sequence_scores(logits, batch).items():
            parts.setdefault(key, []).append(value.cpu())
        features.append(cache[hook_name].double().mean(1).cpu())
    frame = pd.DataFrame({k: torch.cat(v).double().numpy() for k, v in parts.items()})
    return frame, torch.cat(features).numpy()


def ood_scores(model: Any, fit_tokens: Int[Tensor, "n_fit pos"], token_sets: Mapping[str, Int[Tensor, "n pos"]],
               layer: int = -1, regularization: float = 1e-3, batch_size: int = 16) -> dict[str, pd.DataFrame]:
    """Sequence-level OOD scores of named token sets (higher = more in-distribution).

    Each frame has the :func:`sequence_scores` columns plus ``mahalanobis``: minus the squared
    Mahalanobis distance of the sequence's mean residual stream (``blocks.{layer}.hook_resid_post``,
    as :func:`residual_features`) to a single Gaussian fitted on ``fit_tokens`` (in-distribution
    text). Keep the fit set apart from every scored set: with about as many fit sequences as
    residual dimensions the Gaussian hugs its own sample, so the fit data look far more
    in-distribution than fresh in-distribution data do.
    """
    if not isinstance(token_sets, Mapping) or not token_sets:
        raise ValueError(f"token_sets={token_sets!r:.80}: expected a non-empty mapping name -> [batch, pos] tokens")
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ValueError(f"layer={layer!r}: expected an integer in [{-n_layers}, {n_layers - 1}]")
    _check_batch_size(batch_size)
    fit_features = residual_features(model, _token_batch(fit_tokens, "fit_tokens"), layer=layer, batch_size=batch_size)
    scorer = MahalanobisScorer(class_conditional=False, regularization=regularization).fit(fit_features)
    hook_name = f"blocks.{layer % n_layers}.hook_resid_post"
    frames = {}
    for name, tokens in token_sets.items():
        frame, features = _scores_and_features(model, _token_batch(tokens, f"token_sets[{name!r}]"), hook_name,
                                               batch_size)
        frame["mahalanobis"] = scorer.score(features)
        frames[name] = frame
    return frames


def ood_detection_table(scores_in: pd.DataFrame, scores_out: pd.DataFrame, scores_calibration: pd.DataFrame,
                        keep: float = 0.95) -> pd.DataFrame:
    """How well each score (a column; higher = more in-distribution) tells ``in`` from ``out``.

    Columns: ``auroc`` (:func:`ood_auroc`); ``threshold``, the rule that keeps ``keep`` of
    ``scores_calibration`` (held-out in-distribution data: the rule is chosen without seeing any
    OOD input); ``in_kept``, the fraction of ``scores_in`` that rule keeps (near ``keep`` when
    calibration and in-distribution test data match); ``out_abstained``, the fraction of
    ``scores_out`` it abstains on.
    """
    keep = _check_probability(keep, "keep")
    frames = {"scores_in": scores_in, "scores_out": scores_out, "scores_calibration": scores_calibration}
    for name, frame in frames.items():
        if not isinstance(frame, pd.DataFrame) or frame.empty:
            raise ValueError(f"{name}: expected a non-empty DataFrame of scores (one column per score)")
    columns = [c for c in scores_in.columns if c in scores_calibration.columns and c in scores_out.columns]
    if not columns:
        raise ValueError(f"scores_in columns {list(scores_in.columns)} share no score with scores_out / "
                         "scores_calibration")
    rows = []
    for column in columns:
        rule = AbstentionRule.from_in_distribution(column, scores_calibration[column].to_numpy(), keep=keep)
        rows.append({"score": column, "auroc": ood_auroc(scores_in[column].to_numpy(), scores_out[column].to_numpy()),
                     "threshold": rule.threshold,
                     "in_kept": float(rule.passes(scores_in[column].to_numpy()).mean()),
                     "out_abstained": float(1 - rule.passes(scores_out[column].to_numpy()).mean())})
    return pd.DataFrame(rows).set_index("score")


def abstention_table(policies: Mapping[str, "AbstentionPolicy"], correct: Bool[ArrayLike, " n"],
                     scores: Mapping[str, Float[ArrayLike, " n"]],
                     domain: Sequence[str] | np.ndarray | None = None) -> pd.DataFrame:
    """"Accuracy on retained predictions X% while abstaining on Y%", one row per policy (and per
    ``domain`` value when given, e.g. 'prose' / 'code', plus 'all').

    Each policy reads its scores by name from ``scores``; the columns are those of
    :meth:`AbstentionPolicy.evaluate` plus ``policy`` (its description) and ``domain``.
    """
    if not isinstance(policies, Mapping) or not policies:
        raise ValueError(f"policies={policies!r:.80}: expected a non-empty mapping name -> AbstentionPolicy")
    ok = _correctness(correct, "correct")
    values = {name: _float_array(v, name, 1, f"a 1-D array [N] of {name} scores") for name, v in scores.items()}
    for name, v in values.items():
        _check_same_length(ok, "correct", v, name)
    masks: dict[str, np.ndarray] = {"all": np.ones(len(ok), dtype=bool)}
    if domain is not None:
        labels = np.asarray(domain)
        if labels.ndim != 1:
            raise ValueError(f"domain has shape {labels.shape}; expected [N] labels such as 'prose' / 'code'")
        _check_same_length(ok, "correct", labels, "domain")
        masks = {str(d): labels == d for d in dict.fromkeys(labels.tolist())} | masks
    rows = []
    for name, policy in policies.items():
        if not isinstance(policy, AbstentionPolicy):
            raise ValueError(f"policies[{name!r}] is {type(policy).__name__}; expected an AbstentionPolicy")
        for where, mask in masks.items():
            result = policy.evaluate(ok[mask], **{k: v[mask] for k, v in values.items()})
            rows.append({"name": name, "domain": where, "policy": policy.describe(), **result})
    frame = pd.DataFrame(rows)
    return frame if domain is not None else frame.drop(columns="domain")
