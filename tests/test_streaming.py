"""Streaming over the vocabulary: logits spilled to a LogitStore give the same calibration and
selective-prediction numbers as the logits held in memory (the all-logits path is the oracle)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import interp_lib as il
from interp_lib import calibration as cal
from interp_lib import selective as sel
from interp_lib.streaming import LogitStore, auto_rows

TOL = 1e-6


def test_logit_store_round_trips_rows_and_views(tmp_path):
    rng = torch.Generator().manual_seed(0)
    blocks = [torch.randn(n, 7, generator=rng) for n in (3, 1, 5)]
    store = LogitStore(7, tmp_path)
    for block in blocks:
        store.append(block)
    full = torch.cat(blocks)
    assert store.shape == (9, 7) and len(list(tmp_path.iterdir())) == 1
    torch.testing.assert_close(store.to_tensor(), full, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(list(store.blocks(block_rows=2))), full, rtol=0, atol=0)
    torch.testing.assert_close(store[4], full[4], rtol=0, atol=0)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1], bool)
    torch.testing.assert_close(store.subset(mask).to_tensor(), full[torch.from_numpy(mask)], rtol=0, atol=0)
    picked = np.array([8, 0, 5])  # unordered and spread out
    view = store.subset(picked)
    torch.testing.assert_close(view.to_tensor(), full[picked], rtol=0, atol=0)
    torch.testing.assert_close(view.subset([2, 0]).to_tensor(), full[[5, 8]], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"block is \(2, 3\); expected a \[rows, 7\] tensor"):
        store.append(torch.zeros(2, 3))
    # the file goes when the last view of it does
    del store, view
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_auto_rows_fits_the_budget_and_names_the_largest_size():
    size, reason = auto_rows("batch_size", "auto", row_bytes=2 ** 20, budget_bytes=10 * 2 ** 20, upper=8)
    assert size == 8 and "capped at 8" in reason
    assert auto_rows("batch_size", "auto", row_bytes=2 ** 20, budget_bytes=5 * 2 ** 20)[0] == 5
    assert auto_rows("batch_size", 3, row_bytes=2 ** 20, budget_bytes=5 * 2 ** 20)[0] == 3
    with pytest.raises(ValueError, match="batch_size=9 needs .* the largest batch_size that fits is 5"):
        auto_rows("batch_size", 9, row_bytes=2 ** 20, budget_bytes=5 * 2 ** 20)
    with pytest.raises(ValueError, match="batch_size=0: expected 'auto' or a positive integer"):
        auto_rows("batch_size", 0, row_bytes=1, budget_bytes=1)


def compare_streamed_with_memory(model, val_tokens, test_tokens, batch_size=8, mode="temperature"):
    """The calibration and selective-prediction numbers of both paths, asserted equal to TOL."""
    memory = {name: cal.next_token_predictions(model, tokens, batch_size=batch_size, keep_logits="memory")
              for name, tokens in (("val", val_tokens), ("test", test_tokens))}
    streamed = {name: cal.next_token_predictions(model, tokens, batch_size=batch_size)
                for name, tokens in (("val", val_tokens), ("test", test_tokens))}
    assert isinstance(streamed["val"].logits, LogitStore) and isinstance(memory["val"].logits, torch.Tensor)
    for name in ("val", "test"):  # the per-position summaries do not depend on where logits go
        np.testing.assert_array_equal(streamed[name].prediction, memory[name].prediction)
        np.testing.assert_array_equal(streamed[name].confidence, memory[name].confidence)
        np.testing.assert_array_equal(streamed[name].nll, memory[name].nll)
    old = cal.temperature_scaling_report(memory["val"], memory["test"], n_bins=15, n_boot=20, mode=mode)
    new = cal.temperature_scaling_report(streamed["val"], streamed["test"], n_bins=15, n_boot=20, mode=mode)
    old_summary, new_summary = old.summary(), new.summary()
    assert old_summary.keys() == new_summary.keys()
    for key in old_summary:  # ECE, MCE, Brier, NLL before / after, fitted temperature
        assert new_summary[key] == pytest.approx(old_summary[key], abs=TOL, nan_ok=True), key
    for stage in ("before", "after"):
        assert new.ece_ci[stage].lower == pytest.approx(old.ece_ci[stage].lower, abs=TOL)
        assert new.ece_ci[stage].upper == pytest.approx(old.ece_ci[stage].upper, abs=TOL)
        np.testing.assert_allclose(new.reliability[stage]["gap"], old.reliability[stage]["gap"], atol=TOL)
    for field in ("val_confidence", "val_confidence_scaled", "test_confidence", "test_confidence_scaled"):
        np.testing.assert_allclose(getattr(new, field), getattr(old, field), atol=TOL, err_msg=field)
    np.testing.assert_array_equal(new.test_correct, old.test_correct)
    for old_conf, new_conf in ((old.test_confidence, new.test_confidence),
                               (old.test_confidence_scaled, new.test_confidence_scaled)):
        old_curve, new_curve = sel.risk_coverage(old_conf, old.test_correct), sel.risk_coverage(new_conf, new.test_correct)
        assert new_curve.aurc == pytest.approx(old_curve.aurc, abs=TOL)
        assert new_curve.eaurc == pytest.approx(old_curve.eaurc, abs=TOL)
    if mode == "vector":  # (the report above already fitted vector scaling both ways)
        return old, new, memory["val"]
    # the lower-level entry points agree too
    old_result = cal.evaluate_temperature_scaling(memory["val"].logits, memory["val"].labels, memory["test"].logits,
                                                  memory["test"].labels, mode=mode)
    new_result = cal.evaluate_temperature_scaling(streamed["val"].logits, streamed["val"].labels,
                                                  streamed["test"].logits, streamed["test"].labels, mode=mode)
    for stage in ("before", "after"):
        for key, value in getattr(old_result, stage).items():
            assert getattr(new_result, stage)[key] == pytest.approx(value, abs=TOL), (stage, key)
    np.testing.assert_allclose(cal.confidence_from_logits(streamed["test"].logits, new.scaler),
                               cal.confidence_from_logits(memory["test"].logits, old.scaler), atol=TOL)
    return old, new, memory["val"]


def float64_optimal_temperature(logits: torch.Tensor, labels: np.ndarray) -> float:
    """The oracle: the T minimising the float64 validation NLL, by a bounded 1-D search
    (the NLL is convex in 1/T)."""
    from scipy.optimize import minimize_scalar

    z, y = logits.double(), torch.from_numpy(labels)
    result = minimize_scalar(lambda log_t: float(torch.nn.functional.cross_entropy(z * np.exp(-log_t), y)),
                             bounds=(-3, 3), method="bounded", options={"xatol": 1e-10})
    return float(np.exp(result.x))


def test_streamed_calibration_equals_the_all_logits_path_on_toy_lm(toy_lm):
    val = il.data.text_windows(toy_lm, il.data.load_corpus("validation"), 32, 24, seed=0)
    test = il.data.text_windows(toy_lm, il.data.load_corpus("test"), 32, 24, seed=0)
    old, new, memory = compare_streamed_with_memory(toy_lm, val, test, batch_size=5)
    assert old.temperature != 1 and new.scaler.fallback_reason_ is None  # a real fit, not the identity
    assert new.temperature == pytest.approx(old.temperature, abs=TOL)
    assert new.temperature == pytest.approx(float64_optimal_temperature(memory.logits, memory.labels), abs=TOL)


def test_streamed_vector_scaling_equals_the_all_logits_path(toy_lm):
    val = il.data.text_windows(toy_lm, il.data.load_corpus("validation"), 16, 4, seed=1)
    test = il.data.text_windows(toy_lm, il.data.load_corpus("test"), 16, 4, seed=1)
    old, new, _ = compare_streamed_with_memory(toy_lm, val, test, mode="vector")
    np.testing.assert_allclose(new.scaler.scale_, old.scaler.scale_, atol=1e-5)
    np.testing.assert_allclose(new.scaler.bias_, old.scaler.bias_, atol=1e-5)


@pytest.mark.real_model
def test_streamed_calibration_equals_the_all_logits_path_on_smollm2(smollm2):
    """The real 49k-vocabulary model: 8 + 8 windows of 64 tokens (504 predictions per split)."""
    val = il.data.text_windows(smollm2, il.data.load_corpus("validation"), 64, 8, seed=0)
    test = il.data.text_windows(smollm2, il.data.load_corpus("test"), 64, 8, seed=0)
    old, new, memory = compare_streamed_with_memory(smollm2, val, test, batch_size=4)
    assert new.scaler.fallback_reason_ is None
    assert new.temperature == pytest.approx(old.temperature, abs=TOL)
    assert new.temperature == pytest.approx(float64_optimal_temperature(memory.logits, memory.labels), abs=TOL)
