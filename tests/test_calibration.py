"""interp_lib.calibration: metrics against reference implementations, temperature scaling,
bad input, and the language-model label sources on a small random GPT-2 loaded like any model."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch

import interp_lib as il
from interp_lib import calibration as cal

# ----------------------------------------------------------------------------------------------
# Data helpers
# ----------------------------------------------------------------------------------------------


def random_probs(n: int, n_classes: int, seed: int, concentration: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, concentration), size=n)
    labels = rng.integers(0, n_classes, size=n)
    return probs, labels


def calibrated_logits(n: int, n_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution: calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, n_classes))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = (rng.random((n, 1)) > probs.cumsum(1)).sum(1)  # inverse-CDF sampling
    return logits, np.minimum(labels, n_classes - 1)


def reference_ece_mce(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[float, float]:
    """Guo et al.'s `_ECELoss` (temperature_scaling.py): equal-width bins, a confidence c is in
    bin (lower, upper]; here in float64 torch so edges are not rounded to float32."""
    p = torch.from_numpy(probs)
    confidences, predictions = p.max(1)
    accuracies = predictions.eq(torch.from_numpy(labels))
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    ece, mce = torch.zeros(1, dtype=torch.float64), 0.0
    for lower, upper in zip(boundaries[:-1], boundaries[1:]):
        in_bin = confidences.gt(lower.item()) * confidences.le(upper.item())
        prop_in_bin = in_bin.double().mean()
        if prop_in_bin.item() > 0:
            gap = torch.abs(confidences[in_bin].mean() - accuracies[in_bin].double().mean())
            ece += gap * prop_in_bin
            mce = max(mce, gap.item())
    return ece.item(), mce


# ----------------------------------------------------------------------------------------------
# ECE / MCE against references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [2, 5, 10])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_and_mce_match_guo_reference_on_random_inputs(n_classes, n_bins):
    for seed in range(3):
        probs, labels = random_probs(3000, n_classes, seed=seed)
        ece_ref, mce_ref = reference_ece_mce(probs, labels, n_bins)
        assert cal.expected_calibration_error(probs, labels, n_bins=n_bins) == pytest.approx(ece_ref, abs=1e-12)
        assert cal.maximum_calibration_error(probs, labels, n_bins=n_bins) == pytest.approx(mce_ref, abs=1e-12)


def test_ece_bins_are_right_closed_on_exact_edges():
    # Confidences exactly on inner edges (0.6, 0.8) and at 1.0: (lower, upper] puts them below.
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.8, 0.2], [1.0, 0.0], [0.7, 0.3], [0.9, 0.1]])
    labels = np.array([0, 1, 0, 0, 1, 0])
    ece_ref, mce_ref = reference_ece_mce(probs, labels, n_bins=5)
    assert cal.expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(ece_ref, abs=1e-12)
    assert cal.maximum_calibration_error(probs, labels, n_bins=5) == pytest.approx(mce_ref, abs=1e-12)
    frame = cal.reliability_data(probs, labels, n_bins=5)
    assert frame["count"].tolist() == [0, 0, 2, 2, 2]  # (0.4,0.6]: 0.6,0.6; (0.6,0.8]: 0.8,0.7; (0.8,1]: 1.0,0.9
    # A confidence of exactly 0 (1-D form) goes to the first bin, not nowhere.
    assert cal.reliability_data(np.array([0.0, 0.05]), np.array([0, 0]), n_bins=5)["count"].tolist() == [2, 0, 0, 0, 0]


@pytest.mark.oracle
def test_ece_matches_torchmetrics_when_installed():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    for seed, n_classes in ((0, 3), (1, 10)):
        probs, labels = random_probs(4000, n_classes, seed=seed)
        probs32 = torch.from_numpy(probs).float()
        probs32 = probs32 / probs32.sum(1, keepdim=True)
        target = torch.from_numpy(labels)
        for norm, ours in (("l1", cal.expected_calibration_error), ("max", cal.maximum_calibration_error)):
            expected = tm.multiclass_calibration_error(probs32, target, num_classes=n_classes, n_bins=15, norm=norm)
            assert ours(probs32, target, n_bins=15) == pytest.approx(float(expected), abs=1e-5)


def test_one_dimensional_form_equals_probability_form():
    probs, labels = random_probs(2000, 4, seed=7)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    for strategy in ("uniform", "quantile"):
        assert cal.expected_calibration_error(confidence, correct, strategy=strategy) == pytest.approx(
            cal.expected_calibration_error(probs, labels, strategy=strategy))
    assert cal.maximum_calibration_error(confidence, correct.astype(int)) == pytest.approx(
        cal.maximum_calibration_error(probs, labels))


def test_quantile_bins_have_equal_mass_and_calibrated_data_has_small_ece():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, size=3000)
    correct = rng.random(3000) < confidence  # calibrated by construction
    frame = cal.reliability_data(confidence, correct, n_bins=15, strategy="quantile")
    assert len(frame) == 15 and (frame["count"] == 200).all()
    assert frame["bin_lower"].iloc[0] == 0.0 and frame["bin_upper"].iloc[-1] == 1.0
    assert cal.expected_calibration_error(confidence, correct, strategy="quantile") < 0.04
    # Saturated confidences collapse repeated quantile edges instead of making empty bins.
    saturated = np.r_[np.ones(900), rng.uniform(0.5, 1.0, 100)]
    frame = cal.reliability_data(saturated, np.ones(1000, bool), n_bins=10, strategy="quantile")
    assert frame["count"].sum() == 1000 and (frame["count"] > 0).all() and len(frame) < 10


def test_reliability_data_columns_and_ece_recomputed_from_it():
    probs, labels = random_probs(1500, 5, seed=3)
    frame = cal.reliability_data(probs, labels, n_bins=10)
    assert list(frame.columns) == ["bin_lower", "bin_upper", "confidence", "accuracy", "count", "gap"]
    assert len(frame) == 10 and frame["count"].sum() == 1500
    filled = frame["count"] > 0
    np.testing.assert_allclose(frame["gap"][filled], (frame["confidence"] - frame["accuracy"])[filled])
    ece = (frame["count"] * frame["gap"].abs()).sum() / frame["count"].sum()
    assert ece == pytest.approx(cal.expected_calibration_error(probs, labels, n_bins=10))


# ----------------------------------------------------------------------------------------------
# Brier, NLL, classwise ECE, bootstrap
# ----------------------------------------------------------------------------------------------


def test_brier_and_nll_by_hand():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]])
    labels = np.array([0, 0])
    assert cal.brier_score(probs, labels) == pytest.approx(((0.3 ** 2 + 0.3 ** 2) + (0.8 ** 2 + 0.8 ** 2)) / 2)
    assert cal.negative_log_likelihood(probs, labels) == pytest.approx(-(np.log(0.7) + np.log(0.2)) / 2)
    logits = np.log(probs) + 3.0  # any per-row shift gives the same softmax
    assert cal.negative_log_likelihood(logits, labels, from_logits=True) == pytest.approx(
        cal.negative_log_likelihood(probs, labels))
    # Top-label forms: confidences 0.7 (correct) and 0.8 (wrong).
    assert cal.brier_score(np.array([0.7, 0.8]), np.array([1, 0])) == pytest.approx((0.3 ** 2 + 0.8 ** 2) / 2)
    assert cal.negative_log_likelihood(np.array([0.7, 0.8]), np.array([True, False])) == pytest.approx(
        -(np.log(0.7) + np.log(0.2)) / 2)


def test_classwise_ece_matches_a_loop_reference():
    probs, labels = random_probs(2000, 4, seed=11)
    edges = np.linspace(0, 1, 11)
    per_class = []
    for k in range(4):
        p, hit = probs[:, k], labels == k
        total = 0.0
        for b, (lower, upper) in enumerate(zip(edges[:-1], edges[1:])):
            in_bin = (p > lower) & (p <= upper) if b else (p >= lower) & (p <= upper)
            if in_bin.any():
                total += in_bin.mean() * abs(p[in_bin].mean() - hit[in_bin].mean())
        per_class.append(total)
    assert cal.classwise_ece(probs, labels, n_bins=10) == pytest.approx(np.mean(per_class))


def test_bootstrap_ci_is_reproducible_and_brackets_the_estimate():
    probs, labels = random_probs(800, 3, seed=5)
    ci = cal.bootstrap_ci(cal.expected_calibration_error, probs, labels, n_boot=200, seed=1)
    again = cal.bootstrap_ci(cal.expected_calibration_error, torch.from_numpy(probs), torch.from_numpy(labels),
                             n_boot=200, seed=1)
    assert ci == again
    assert ci.lower < ci.estimate < ci.upper and ci.std > 0
    assert ci.estimate == pytest.approx(cal.expected_calibration_error(probs, labels))
    wide = cal.bootstrap_ci(functools.partial(cal.brier_score), probs[:100], labels[:100], n_boot=200)
    narrow = cal.bootstrap_ci(cal.brier_score, probs, labels, n_boot=200)
    assert narrow.upper - narrow.lower < wide.upper - wide.lower
    with pytest.raises(ValueError, match=r"arrays\[0\] has 4 entries but arrays\[1\] has 5"):
        cal.bootstrap_ci(cal.brier_score, probs[:4], labels[:5])


# ----------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2.5, 0.5])
def test_temperature_recovers_known_overconfidence_factor_and_halves_ece(factor):
    val_logits, val_labels = calibrated_logits(8000, seed=1)
    test_logits, test_labels = calibrated_logits(8000, seed=2)
    scaler = cal.TemperatureScaler().fit(val_logits * factor, val_labels)
    assert scaler.fit(val_logits * factor, val_labels) is scaler
    assert scaler.temperature_ == pytest.approx(factor, rel=0.05) and scaler.temperature == scaler.temperature_
    assert scaler.fallback_reason_ is None and scaler.nll_after_ < scaler.nll_before_
    ece_before = cal.expected_calibration_error(cal.softmax(test_logits * factor), test_labels)
    ece_after = cal.expected_calibration_error(scaler.predict_proba(test_logits * factor), test_labels)
    assert ece_after < 0.5 * ece_before


def test_vector_scaling_recovers_per_class_scales():
    val_logits, val_labels = calibrated_logits(8000, n_classes=5, seed=3)
    test_logits, test_labels = calibrated_logits(8000, n_classes=5, seed=4)
    factor = 3.0
    scaler = cal.TemperatureScaler(mode="vector").fit(val_logits * factor, val_labels)
    assert scaler.temperature_ is None and scaler.scale_.shape == (5,) and scaler.bias_.shape == (5,)
    np.testing.assert_allclose(scaler.scale_, 1 / factor, rtol=0.1)
    assert np.abs(scaler.bias_).max() < 0.15
    before = cal.expected_calibration_error(cal.softmax(test_logits * factor), test_labels)
    after = cal.expected_calibration_error(scaler.predict_proba(test_logits * factor), test_labels)
    assert after < 0.5 * before


def test_scaler_never_worsens_validation_nll_on_calibrated_data():
    logits, labels = calibrated_logits(4000, seed=5)
    scaler = cal.TemperatureScaler().fit(logits, labels)
    assert scaler.nll_after_ <= scaler.nll_before_
    assert scaler.temperature_ == pytest.approx(1.0, abs=0.05)
    assert scaler.nll_before_ == pytest.approx(cal.negative_log_likelihood(logits, labels, from_logits=True))


@pytest.mark.parametrize("lr, max_iter", [(100.0, 1), (1000.0, 5)])
def test_misbehaving_lbfgs_falls_back_to_identity_and_says_why(lr, max_iter):
    # No line search and a huge step: LBFGS overshoots (T -> 0.5 or T -> inf), a worse NLL.
    logits, labels = calibrated_logits(4000, seed=6)
    scaler = cal.TemperatureScaler(lr=lr, max_iter=max_iter, line_search_fn=None).fit(logits, labels)
    assert scaler.temperature_ == 1.0
    assert scaler.nll_after_ == scaler.nll_before_
    assert "kept the identity" in scaler.fallback_reason_ and "validation NLL" in scaler.fallback_reason_
    np.testing.assert_array_equal(scaler.transform(logits), logits)


def test_transform_keeps_the_container_and_checks_its_input():
    logits, labels = calibrated_logits(500, n_classes=4, seed=7)
    with pytest.raises(RuntimeError, match="not fitted"):
        cal.TemperatureScaler().transform(logits)
    scaler = cal.TemperatureScaler().fit(torch.from_numpy(logits * 2).float(), torch.from_numpy(labels))
    out = scaler.transform(torch.from_numpy(logits).float())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(logits).float() / scaler.temperature_)
    assert isinstance(scaler.transform(logits), np.ndarray)
    np.testing.assert_allclose(scaler.predict_proba(logits).sum(1), 1.0)
    with pytest.raises(ValueError, match="logits has 3 classes.*expected 4"):
        scaler.transform(logits[:, :3])
    with pytest.raises(ValueError, match="mode='platt'"):
        cal.TemperatureScaler(mode="platt")


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument and what was expected
# ----------------------------------------------------------------------------------------------

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
LABELS = np.array([0, 1, 2, 1])
METRICS = [cal.expected_calibration_error, cal.maximum_calibration_error, cal.brier_score,
           cal.negative_log_likelihood, cal.classwise_ece, cal.reliability_data]


@pytest.mark.parametrize("metric", METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("probs, labels, message", [
    (np.where(PROBS == 0.8, np.nan, PROBS), LABELS, r"probs contains 1 NaN/inf value\(s\).*expected finite"),
    (np.where(PROBS == 0.8, np.inf, PROBS), LABELS, r"probs contains 1 NaN/inf"),
    (PROBS * 1.1, LABELS, r"probs rows must sum to 1 .*row 0 sums to 1\.1.*not logits"),
    (PROBS - 0.2, LABELS, r"probs must lie in \[0, 1\]"),
    (PROBS, np.array([0, 1, 3, 1]), r"labels must be class indices in \[0, 2\].*got 3 at index 2"),
    (PROBS, np.array([0, -1, 2, 1]), r"labels must be class indices in \[0, 2\].*got -1 at index 1"),
    (PROBS, LABELS[:3], r"probs has 4 entries but labels has 3; expected the same number"),
    (np.empty((0, 3)), np.empty(0, dtype=int), r"probs is empty \(shape \(0, 3\)\); expected at least one"),
    (PROBS, np.empty(0, dtype=int), r"labels is empty"),
    (PROBS[None], LABELS, r"probs has shape \(1, 4, 3\); expected"),
    (PROBS, np.array([0.0, 1.5, 2.0, 1.0]), r"labels must be integer class indices; got 1\.5"),
])
def test_bad_probability_input_raises_value_error_naming_the_argument(metric, probs, labels, message):
    with pytest.raises(ValueError, match=message):
        metric(probs, labels)
    if np.isfinite(probs).all():
        with pytest.raises(ValueError, match=message):  # torch tensors take the same checks
            metric(torch.from_numpy(np.asarray(probs)), torch.from_numpy(labels))


@pytest.mark.parametrize("confidence, correct, message", [
    (np.array([0.9, np.nan]), np.array([1, 0]), r"probs contains 1 NaN/inf"),
    (np.array([0.9, 1.2]), np.array([1, 0]), r"probs must lie in \[0, 1\]"),
    (np.array([0.9, 0.6]), np.array([1, 2]), r"labels must be 0/1 \(or bool\) correctness; got 2 at index 1"),
    (np.array([0.9, 0.6]), np.array([1]), r"probs has 2 entries but labels has 1"),
])
def test_bad_confidence_input(confidence, correct, message):
    for metric in (cal.expected_calibration_error, cal.brier_score, cal.negative_log_likelihood):
        with pytest.raises(ValueError, match=message):
            metric(confidence, correct)


@pytest.mark.parametrize("logits, labels, message", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), r"logits contains 1 NaN/inf value\(s\).*expected finite logits"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), torch.tensor([0, 1]), r"logits contains 1 NaN/inf"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), np.array([0, 2]), r"labels must be class indices in \[0, 1\]"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), np.array([0]), r"logits has 2 entries but labels has 1"),
    (np.empty((0, 2)), np.empty(0, dtype=int), r"logits is empty"),
    (torch.empty(0, 2), torch.empty(0, dtype=torch.long), r"logits is empty"),
    (np.array([1.0, 2.0]), np.array([0, 1]), r"logits has shape \(2,\); expected a 2-D array \[N, C\]"),
])
def test_bad_logits_for_temperature_scaling(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        cal.TemperatureScaler().fit(logits, labels)


def test_bad_options():
    with pytest.raises(ValueError, match="n_bins=0: expected a positive integer"):
        cal.expected_calibration_error(PROBS, LABELS, n_bins=0)
    with pytest.raises(ValueError, match=r"strategy='equal'.*\('uniform', 'quantile'\)"):
        cal.reliability_data(PROBS, LABELS, strategy="equal")
    with pytest.raises(ValueError, match="temperature=0"):
        cal.softmax(np.zeros((2, 2)), temperature=0)


# ----------------------------------------------------------------------------------------------
# Language-model label sources, on small random GPT-2s loaded through il.load_model
# ----------------------------------------------------------------------------------------------


def save_random_gpt2(path, seed: int, logit_scale: float = 1.0):
    """A 2-layer random GPT-2 with the bundled 512-token tokenizer; ``logit_scale`` multiplies the
    final LayerNorm gain, so all logits grow and the model becomes over-confident."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(il.paths.data_dir() / "tokenizer-512")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(logit_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gpt2")
    return [str(save_random_gpt2(root / f"seed{seed}", seed, logit_scale=40.0)) for seed in (0, 1)]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return il.load_model(tiny_dirs[0], device="cpu")


@pytest.fixture(scope="module")
def windows(tiny):
    return il.data.text_windows(tiny, il.data.load_corpus("validation"), window_len=24, n_windows=12)


def test_next_token_predictions_match_a_direct_forward_pass(tiny, windows):
    predictions = cal.next_token_predictions(tiny, windows, batch_size=5)
    n = windows.shape[0] * (windows.shape[1] - 1)
    assert len(predictions) == n and predictions.logits.shape == (n, tiny.cfg.d_vocab)
    with torch.no_grad():
        logits = tiny(windows)[:, :-1].reshape(n, -1).float()
    targets = windows[:, 1:].reshape(-1)
    probs = logits.softmax(-1)
    np.testing.assert_allclose(predictions.confidence, probs.max(-1).values.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(predictions.prediction, probs.argmax(-1).numpy())
    np.testing.assert_array_equal(predictions.labels, targets.numpy())
    np.testing.assert_array_equal(predictions.correct, predictions.prediction == predictions.labels)
    np.testing.assert_allclose(predictions.nll, torch.nn.functional.cross_entropy(logits, targets, reduction="none"),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predictions.group, np.repeat(np.arange(windows.shape[0]), windows.shape[1] - 1))
    np.testing.assert_array_equal(predictions.position, np.tile(np.arange(windows.shape[1] - 1), windows.shape[0]))
    # batch size does not change results; without logits only the summaries are kept
    lean = cal.next_token_predictions(tiny, windows, batch_size=12, keep_logits=False)
    assert lean.logits is None
    np.testing.assert_allclose(lean.confidence, predictions.confidence, rtol=1e-5)
    # metrics accept the predictions directly, both forms agreeing
    assert cal.expected_calibration_error(predictions.probs(), predictions.labels) == pytest.approx(
        cal.expected_calibration_error(predictions.confidence, predictions.correct), abs=1e-6)


def test_next_token_predictions_masks_padding_and_bounds_memory(tiny, windows):
    mask = torch.ones_like(windows)
    mask[:, -5:] = 0  # pretend the last five tokens of every row are padding
    masked = cal.next_token_predictions(tiny, windows, attention_mask=mask)
    assert len(masked) == windows.shape[0] * (windows.shape[1] - 6) and masked.position.max() == windows.shape[1] - 7
    with pytest.raises(ValueError, match="GiB > max_logits_bytes"):
        cal.next_token_predictions(tiny, windows, keep_logits="memory", max_logits_bytes=1000)
    with pytest.raises(ValueError, match=r"tokens has shape \(3, 1\)"):
        cal.next_token_predictions(tiny, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size=0"):
        cal.next_token_predictions(tiny, windows, batch_size=0)


def test_predictions_split_by_sequence_is_disjoint(tiny, windows):
    predictions = cal.next_token_predictions(tiny, windows, keep_logits=False)
    val, test = predictions.split(0.5, seed=3)
    assert len(val) + len(test) == len(predictions)
    assert not set(val.group) & set(test.group)
    assert len(set(val.group)) == 6


def test_classify_with_answer_tokens(tiny):
    prompts = ["x = a if b else", "the list is", "def f(a, b): return", "import os"]
    answers = [" a", " b", " the"]
    labels = [0, 1, 0, 2]
    predictions = cal.classify_with_answer_tokens(tiny, prompts, answers, labels=labels, batch_size=2)
    ids = [tiny.to_single_token(a) for a in answers]
    with torch.no_grad():
        expected = torch.stack([tiny(tiny.to_tokens(p))[0, -1, ids] for p in prompts])
    torch.testing.assert_close(predictions.logits, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(predictions.prediction, expected.argmax(1).numpy())
    np.testing.assert_array_equal(predictions.correct, predictions.prediction == np.array(labels))
    assert predictions.class_names == answers
    # the confidence is the softmax of the scores it returns (exactly), and the plain forward's up
    # to the logits' batching tolerance above
    np.testing.assert_allclose(predictions.confidence,
                               predictions.logits.double().softmax(1).max(1).values.numpy(), rtol=1e-7)
    np.testing.assert_allclose(predictions.confidence, expected.double().softmax(1).max(1).values.numpy(),
                               rtol=0, atol=1e-4)
    # per-prompt options (multiple choice): same scores when the options are the same
    per_prompt = cal.classify_with_answer_tokens(tiny, prompts, [answers] * 4, labels=labels)
    torch.testing.assert_close(per_prompt.logits, predictions.logits)
    with pytest.raises(ValueError, match=r"answers\[1\]=' yes' is 2 tokens"):
        cal.classify_with_answer_tokens(tiny, prompts, [" no", " yes"])
    with pytest.raises(ValueError, match="prompts has 4 entries"):
        cal.classify_with_answer_tokens(tiny, prompts, answers, labels=[0, 1])
    with pytest.raises(ValueError, match="expected at least 2 answers"):
        cal.classify_with_answer_tokens(tiny, prompts, [" a"])


def test_temperature_scaling_lowers_test_ece_of_an_overconfident_model(tiny, windows):
    val, test = cal.next_token_predictions(tiny, windows).split(0.5, seed=0)
    result = cal.evaluate_temperature_scaling(val.logits, val.labels, test.logits, test.labels)
    assert result.scaler.temperature_ > 1.5  # the logits were blown up
    assert result.after["ece"] < 0.5 * result.before["ece"]
    assert result.after["nll"] < result.before["nll"]
    assert result.after["accuracy"] == result.before["accuracy"]
    with pytest.raises(ValueError, match="disjoint validation and test"):
        cal.evaluate_temperature_scaling(val.logits, val.labels, val.logits, val.labels)


def test_compare_models_tabulates_each_model_on_disjoint_splits(tiny_dirs, tiny):
    text = il.data.load_corpus("validation")
    table = cal.compare_models(tiny_dirs, text=text, window_len=20, n_windows=10, seed=0, device="cpu")
    assert table["model"].tolist() == tiny_dirs
    for column in ("n_val", "n_test", "accuracy", "nll", "nll_scaled", "ece", "ece_scaled", "mce",
                   "brier", "brier_scaled", "temperature", "fallback", "n_params"):
        assert column in table.columns
    assert (table["n_val"] + table["n_test"] == 10 * 19).all()
    assert (table["ece_scaled"] < table["ece"]).all() and (table["temperature"] > 1).all()
    # evaluate_fn: any labelled evaluation, here answer-token classification on a loaded model
    prompts = [f"item {i} is" for i in range(8)]
    classify = functools.partial(cal.classify_with_answer_tokens, prompts=prompts, answers=[" a", " b"],
                                 labels=[i % 2 for i in range(8)])
    table = cal.compare_models([tiny], evaluate_fn=lambda model: classify(model))
    assert len(table) == 1 and table["n_val"].iloc[0] + table["n_test"].iloc[0] == 8
    with pytest.raises(ValueError, match="expected exactly one"):
        cal.compare_models(tiny_dirs, text=text, tokens=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expected exactly one"):
        cal.compare_models(tiny_dirs)


def test_reliability_figure_draws_panels_side_by_side():
    probs, labels = random_probs(500, 3, seed=2)
    before = cal.reliability_data(probs, labels, n_bins=10)
    after = cal.reliability_data(probs ** 0.5 / (probs ** 0.5).sum(1, keepdims=True), labels, n_bins=10)
    fig = il.plots.reliability_diagram({"before": before, "after": after})
    assert len(fig.data) == 8 and fig.layout.annotations[0].text.startswith("before — ECE")
    assert sum(fig.data[3].y) == 500 and fig.data[3].name == "inputs per bin"
    assert len(il.plots.reliability_diagram(before, show_counts=False).data) == 3
    with pytest.raises(ValueError, match="lacks columns"):
        il.plots.reliability_diagram(pd.DataFrame({"x": [1]}))


# ----------------------------------------------------------------------------------------------
# Notebook-level helpers: reports, labelled sets, model lists
# ----------------------------------------------------------------------------------------------


def predictions_from_logits(logits: np.ndarray, labels: np.ndarray, n_groups: int) -> cal.Predictions:
    z = torch.from_numpy(logits).float()
    probs = z.double().softmax(1)
    prediction = probs.argmax(1).numpy()
    return cal.Predictions(prediction=prediction, confidence=probs.max(1).values.numpy(),
                           group=np.arange(len(labels)) % n_groups, labels=labels, correct=prediction == labels,
                           nll=-probs.log()[np.arange(len(labels)), labels].numpy(), logits=z)


def test_temperature_scaling_report_fits_on_val_and_measures_on_test():
    factor = 2.5
    val_logits, val_labels = calibrated_logits(6000, seed=11)
    test_logits, test_labels = calibrated_logits(6000, seed=12)
    val = predictions_from_logits(val_logits * factor, val_labels, 60)
    test = predictions_from_logits(test_logits * factor, test_labels, 60)
    report = cal.temperature_scaling_report(val, test, n_bins=15, n_boot=50, seed=0)
    assert report.temperature == pytest.approx(factor, rel=0.05)
    assert list(report.metrics.index) == ["before", "after"]
    assert list(report.metrics.columns) == ["accuracy", "nll", "ece", "ece_quantile", "mce", "brier"]
    before, after = report.metrics.loc["before"], report.metrics.loc["after"]
    assert after.ece < 0.5 * before.ece and after.nll < before.nll and after.accuracy == before.accuracy
    # every number is the test split's, as the metric functions compute it
    z = test_logits * factor
    assert before.ece == pytest.approx(cal.expected_calibration_error(cal.softmax(z), test_labels), abs=1e-6)
    assert after.ece == pytest.approx(cal.expected_calibration_error(cal.softmax(z, report.temperature), test_labels),
                                      abs=1e-6)
    assert before.ece_quantile == pytest.approx(
        cal.expected_calibration_error(cal.softmax(z), test_labels, strategy="quantile"), abs=1e-6)
    assert after.nll == pytest.approx(cal.negative_log_likelihood(z / report.temperature, test_labels,
                                                                  from_logits=True), abs=1e-5)
    assert before.brier == pytest.approx(cal.brier_score(cal.softmax(z), test_labels), abs=1e-5)
    np.testing.assert_allclose(report.test_confidence_scaled, cal.softmax(z, report.temperature).max(1), rtol=1e-5)
    np.testing.assert_allclose(report.val_confidence, cal.softmax(val_logits * factor).max(1), rtol=1e-5)
    np.testing.assert_array_equal(report.test_correct, test.correct)
    np.testing.assert_array_equal(report.test_group, test.group)
    assert report.ece_ci["before"].estimate == pytest.approx(before.ece, abs=1e-6)
    assert report.ece_ci["after"].upper < report.ece_ci["before"].lower
    assert int(report.reliability["after"]["count"].sum()) == len(test_labels)
    summary = report.summary()
    assert summary["ece_before"] == before.ece and summary["temperature"] == report.temperature
    assert "accuracy" in summary and "accuracy_after" not in summary
    with pytest.raises(ValueError, match="disjoint validation and test"):
        cal.temperature_scaling_report(val, val)
    with pytest.raises(ValueError, match="expected Predictions with logits"):
        cal.temperature_scaling_report(val, cal.Predictions(prediction=test.prediction, confidence=test.confidence,
                                                            group=test.group))
    with pytest.raises(ValueError, match="n_boot=1"):
        cal.temperature_scaling_report(val, test, n_boot=1)


def test_confidence_from_logits_chunks_and_scales():
    logits, labels = calibrated_logits(1000, seed=13)
    scaler = cal.TemperatureScaler().fit(logits * 3, labels)
    np.testing.assert_allclose(cal.confidence_from_logits(logits), cal.softmax(logits).max(1), rtol=1e-5)
    np.testing.assert_allclose(cal.confidence_from_logits(logits * 3, scaler, chunk_size=7),
                               scaler.predict_proba(logits * 3).max(1), rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size=0"):
        cal.confidence_from_logits(logits, chunk_size=0)


def test_next_token_confidence_matches_predictions(tiny, windows):
    predictions = cal.next_token_predictions(tiny, windows)
    val, test = predictions.split(0.5, seed=0)
    scaler = cal.TemperatureScaler().fit(val.logits, val.labels)
    frame = cal.next_token_confidence(tiny, windows, scaler=scaler, batch_size=5)
    assert list(frame.columns) == ["group", "position", "confidence", "correct", "confidence_scaled"]
    np.testing.assert_array_equal(frame["group"], predictions.group)
    np.testing.assert_array_equal(frame["position"], predictions.position)
    np.testing.assert_allclose(frame["confidence"], predictions.confidence, rtol=1e-5)
    np.testing.assert_array_equal(frame["correct"], predictions.correct)
    np.testing.assert_allclose(frame["confidence_scaled"], cal.confidence_from_logits(predictions.logits, scaler),
                               rtol=1e-5)
    assert "confidence_scaled" not in cal.next_token_confidence(tiny, windows).columns
    with pytest.raises(ValueError, match="scaler is not fitted"):
        cal.next_token_confidence(tiny, windows, scaler=cal.TemperatureScaler())


def test_classify_labelled_uses_shared_or_per_item_options(tiny):
    items = [{"prompt": "the list is", "options": [" a", " b"], "label": 0},
             {"prompt": "import os", "options": [" a", " b"], "label": 1}]
    shared = cal.classify_labelled(tiny, items)
    direct = cal.classify_with_answer_tokens(tiny, ["the list is", "import os"], [" a", " b"], labels=[0, 1])
    torch.testing.assert_close(shared.logits, direct.logits)
    assert shared.class_names == [" a", " b"]
    mixed = cal.classify_labelled(tiny, [items[0], {**items[1], "options": [" b", " a"]}])
    assert mixed.class_names is None
    torch.testing.assert_close(mixed.logits[1], direct.logits[1].flip(0))
    # the bundled cloze set works through the same call (options filtered to this 512-token
    # tokenizer, which keeps only a few items)
    cloze = il.data.load_labelled("cloze", tokenizer=tiny, n=12)
    result = cal.classify_labelled(tiny, cloze)
    assert len(cloze) >= 1 and result.logits.shape == (len(cloze), 4)
    np.testing.assert_array_equal(result.labels, [item["label"] for item in cloze])
    with pytest.raises(ValueError, match="lacks \\['label'\\]"):
        cal.classify_labelled(tiny, [{"prompt": "x", "options": [" a", " b"]}])
    with pytest.raises(ValueError, match="expected a non-empty list of labelled items"):
        cal.classify_labelled(tiny, [])


def test_resolve_compare_models(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert cal.resolve_compare_models("auto") == ["toy-lm", "toy-2l", "toy-1l"]
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20260101")
    assert cal.resolve_compare_models() == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert cal.resolve_compare_models(["gpt2", "/models/mine"]) == ["gpt2", "/models/mine"]
    assert cal.resolve_compare_models("gpt2, distilgpt2") == ["gpt2", "distilgpt2"]
    assert cal.resolve_compare_models('["gpt2", "gpt2-xl"]') == ["gpt2", "gpt2-xl"]  # papermill -p text
    for bad, message in (([], "non-empty list"), (3, "expected 'auto'"), (["gpt2", "gpt2"], "names a model twice"),
                         ("a,,b", "non-empty list"), ("[gpt2", "could not read the list")):
        with pytest.raises(ValueError, match=message):
            cal.resolve_compare_models(bad)
