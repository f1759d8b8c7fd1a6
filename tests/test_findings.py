"""Results said in words: each sentence follows the numbers it is computed from (planted cases on
both sides of every verdict), with the real calibration / selective / stats functions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from interp_lib import calibration, findings, selective


def predictions(logits: torch.Tensor, labels: np.ndarray, n_groups: int) -> calibration.Predictions:
    probs = logits.double().softmax(1).numpy()
    prediction = probs.argmax(1)
    n = len(labels)
    return calibration.Predictions(prediction=prediction, confidence=probs.max(1), group=np.arange(n) % n_groups,
                                   labels=labels, correct=prediction == labels,
                                   nll=-np.log(probs[np.arange(n), labels]), logits=logits.float())


def planted(sharpness: float, n: int = 4000, seed: int = 0) -> calibration.Predictions:
    """Labels drawn from softmax(z); the model reports softmax(sharpness * z): > 1 over-confident."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=gen) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=gen)[:, 0].numpy()
    return predictions(z * sharpness, labels, n_groups=200)


def test_calibration_sentences_follow_the_numbers():
    over = calibration.temperature_scaling_report(planted(2.5, seed=0), planted(2.5, seed=1), n_boot=100)
    text = findings.calibration_at_t1(over)
    assert "over-confident" in text and f"{over.ece_ci['before'].estimate:.4f}" in text
    text = findings.temperature_scaling(over)
    assert over.temperature > 1 and "softens an over-confident model" in text
    assert "lowers test ECE" in text and "do not overlap" in text  # a large planted effect
    calibrated = calibration.temperature_scaling_report(planted(1.0, seed=2), planted(1.0, seed=3), n_boot=100)
    text = findings.temperature_scaling(calibrated)
    before, after = calibrated.metrics.loc["before", "ece"], calibrated.metrics.loc["after", "ece"]
    assert ("lowers test ECE" in text) == (after < before)
    if after < before:
        assert "overlap, so the cut is within resampling noise" in text
    under = calibration.temperature_scaling_report(planted(0.4, seed=4), planted(0.4, seed=5), n_boot=100)
    assert "under-confident" in findings.calibration_at_t1(under)
    assert "sharpens an under-confident model" in findings.temperature_scaling(under)


def test_heldout_loss_and_top_predictions():
    good = findings.heldout_loss({"loss": 2.0, "top1_accuracy": 0.4, "n_tokens": 1000}, d_vocab=1000)
    assert f"perplexity {math.exp(2.0):,.1f}" in good and "40.0%" in good
    bad = findings.heldout_loss({"loss": 7.5, "top1_accuracy": 0.0, "n_tokens": 10}, d_vocab=1000)
    assert "no better than a uniform guess" in bad
    frame = pd.DataFrame({"token": [" list", " dict"], "probability": [0.62, 0.1]})
    text = findings.top_predictions(frame, "returns a")
    assert "' list'" in text and "a confident guess" in text and "72%" in text


def test_cloze_verdicts_use_the_interval():
    rng = np.random.default_rng(0)
    for p, expected in ((0.9, "above chance"), (0.05, "below chance"), (0.25, "not distinguishable")):
        correct = rng.random(400) < p
        ci = calibration.bootstrap_ci(np.mean, correct, n_boot=200, seed=0)
        assert expected in findings.cloze_accuracy(ci, chance=0.25)


def test_selective_sentences():
    rng = np.random.default_rng(1)
    correct = rng.random(3000) < 0.6
    informative = np.where(correct, rng.uniform(0.5, 1, 3000), rng.uniform(0, 0.7, 3000))
    noise = rng.random(3000)
    good = selective.risk_coverage(informative, correct)
    assert "confidence ranks errors late" in findings.risk_coverage(good, good)
    assert "leaves the ranking, hence AURC, unchanged" in findings.risk_coverage(good, good)
    # a score that ranks errors first
    bad = selective.risk_coverage(1 - informative, correct)
    assert "does not rank errors late" in findings.risk_coverage(bad, bad)
    strict = selective.guaranteed_risk_threshold(noise, correct, target_risk=0.01, delta=0.05)
    assert not strict.feasible and "No confidence threshold guarantees" in findings.guaranteed_risk(strict, None, 0.01)
    loose = selective.guaranteed_risk_threshold(informative, correct, target_risk=0.2, delta=0.05)
    test = loose.policy().evaluate(correct, confidence=informative)
    text = findings.guaranteed_risk(loose, test, 0.2)
    assert loose.feasible and ("within the target" in text) == (test["risk_predicted"] <= 0.2)
    table = pd.DataFrame({"auroc": [0.93, 0.41, 0.7]}, index=["mahalanobis", "msp", "energy"])
    text = findings.ood_detection(table)
    assert "0.930 (mahalanobis)" in text and "msp ranks the wrong way" in text
    policies = pd.DataFrame({"name": ["a", "b"], "accuracy_predicted": [0.9, 0.7], "abstention_rate": [0.5, 0.1]})
    assert "'a' is most accurate (90.0%)" in findings.abstention(policies)
    assert "Not measured" in findings.ensemble(None, ["toy-lm"])
    mixed = pd.DataFrame({"name": ["conf", "conf", "both", "both"], "domain": ["prose", "code"] * 2,
                          "coverage": [0.6, 0.45, 0.58, 0.02]})
    assert findings.mixed_stream(mixed) == "Kept on prose / code: conf 60% / 45%; both 58% / 2%."


def test_claims_sentences():
    assert "understate" in findings.interval_widths(1.28)
    assert "about as wide" in findings.interval_widths(1.02)
    assert "narrower" in findings.interval_widths(0.8)
    table = pd.DataFrame({"verdict": ["supported", "not supported", "not testable", "supported"]}, index=[1, 2, 3, 4])
    assert findings.claim_verdicts(table) == ("2 of 4 claims are supported (1, 4), 1 not supported (2) and "
                                              "1 not testable on this model.")


def test_summary_fills_the_results_sentences_and_lists_what_was_not_measured():
    out = findings.summary("00_tour", {"heldout_loss": 3.0, "top1_accuracy": 0.25, "extra": float("nan")},
                           model="toy-lm")
    text = repr(out)
    assert "Summary: Language modelling (toy-lm)" in text
    assert "Held-out loss 3.000 nats per token; the top prediction is the next token 25.0% of the time." in text
    assert "not measured: extra" in text and "heldout_loss" in text
    markdown = out._repr_markdown_()
    assert markdown.startswith("### Summary") and "| metric | value |" in markdown
    assert findings.show("x")._repr_markdown_() == "**What this shows.** x"


def test_circuit_sentences():
    assert "the model solves the task" in findings.logit_difference([6.0, 7.0, 5.5])
    assert "does not solve the task" in findings.logit_difference([-1.0, 0.5, -2.0])
    assert "after 2 of 3 blocks" in findings.lens_depth(2.0, 3, 0.01, 0.9)
    assert "never becomes" in findings.lens_depth(float("nan"), 2, 0.01, 0.02)
    assert "only after the last block" in findings.lens_depth(2.0, 2, 0.01, 0.9)
    frame = pd.DataFrame({"unit": ["L1H0", "L1H2", "L0H1", "L1H1"], "dla": [4.0, -3.0, 0.5, 2.0]})
    text = findings.top_units(frame, "dla", k=2, total=10.0, known=["L1H0", "L1H1"], role="induction")
    assert text == ("The top 2 by |dla| are L1H0 (+4.00), L1H2 (-3.00), together 10% of the total 10.00; "
                    "1 of them is known induction heads.")
    assert "no induction heads are on record" in findings.top_units(frame, "dla", known=[], role="induction")
    assert "almost fully" in findings.patching_restoration(0.97, "x")
    assert "restores almost nothing" in findings.patching_restoration(0.02, "x")
    assert "reliable stand-in" in findings.attribution_agreement(0.9, 0.95)
    assert "not a reliable stand-in" in findings.attribution_agreement(0.2, 0.6)
    assert "redundant" in findings.joint_ablation(0.1, {"a": 0.8, "b": 0.9}, "mean")
    assert "one alone already drops it to 0.20" in findings.joint_ablation(0.1, {"a": 0.2}, "mean")


def test_head_and_position_sentences():
    assert "none found (a null result" in findings.detection([], "induction", 0.4)
    text = findings.detection(["L1H0"], "induction", 0.4, {"precision": 1.0, "recall": 0.5, "f1": 0.667})
    assert text.startswith("1 induction head above") and "recall 0.50" in text
    assert "nothing to remove" in findings.icl_ablation(0.05, 0.04, float("nan"))
    assert "they carry 80% of" in findings.icl_ablation(2.0, 0.4, 0.8)
    assert "they carry all of the in-context copying (109% removed)" in findings.icl_ablation(5.45, -0.51, 1.09)
    assert "clearly feed the induction heads' keys" in findings.composition(0.3, 0.1)
    assert "weakly above the typical pair" in findings.composition(0.12, 0.1)
    assert "no K-composition above" in findings.composition(0.09, 0.1)
    assert "No stream holds" in findings.position_probes([0.03, 0.04], ["embed", "L0 out"], 0.03, 0.04)
    assert "best at embed" in findings.position_probes([0.9, 0.4], ["embed", "L0 out"], 0.03, 0.04)
    assert "No position heads found among 3" in findings.head_classes(["content", "hybrid", "content"])
    frame = pd.DataFrame({"unit": ["L1H0", "L1H1"], "drop": [0.01, -0.002]})
    assert "No single head matters" in findings.ablation_importance(frame)
    assert "L1H1 matters most" in findings.ablation_importance(frame.assign(drop=[0.01, 0.3]))
    assert "not complete" in findings.integrated_gradients_check(0.5, 3.0, 1.0)
    assert "complete: the attributions add up" in findings.integrated_gradients_check(1e-4, 3.0, 1.0)
    assert "brings back 50% of it" in findings.causal_trace(0.9, 0.1, 0.5)
    assert "more than all of it (122%" in findings.causal_trace(0.167, 0.0, 0.204)


def test_explainer_and_taxonomy_sentences():
    assert "No verified head table" in findings.known_heads_named({})
    text = findings.known_heads_named({"induction": [True, True, True], "previous_token": [True]})
    assert text == ("Against the verified table: 3 of 3 induction, 1 of 1 previous-token heads named correctly "
                    "(every known head named by its role).")
    assert "1 known head(s) misnamed" in findings.known_heads_named({"induction": [True, False]})
    frame = pd.DataFrame({"unit": ["L0H0", "L0H1", "L1H0", "L1H1"], "kind": "head",
                          "explanation": ["a", None, "c", "d"], "primary_score": [0.5, None, -0.2, 2.0],
                          "causal_effect": [0.01, 0.02, 0.3, 0.6]})
    text = findings.explainer_run(frame)
    assert text.startswith("3 of 4 heads explained; scores -0.20 to 2.00, negative")
    assert "for L1H0" in text and "L1H1 changes the loss at its top events most (+0.600 nats)" in text
    summary = pd.DataFrame({"kind": ["head", "neuron"], "units": [8, 8], "explained": [8, 7],
                            "mean_score": [1.0, 0.5], "mean_abs_causal": [0.2, 0.05]})
    assert "single heads matter more" in findings.heads_vs_neurons(summary)
    assert "Only one kind" in findings.heads_vs_neurons(summary.iloc[:1])
    table = pd.DataFrame({"label": ["Induction heads", "mixed"], "size": [3, 2]})
    text = findings.families({"n_families": 2, "coverage": 0.625}, table)
    assert text == "2 families cover 62% of the units; the largest is 'Induction heads' (3 units); 38% stay unclustered."
    assert "No family formed" in findings.families({"n_families": 0}, table.iloc[:0])
    stable = pd.DataFrame({"n_families": [2, 2, 0], "ari_vs_reference": [1.0, 0.9, 0.0],
                           "reference": [True, False, False], "failure": [None, None, None]})
    text = findings.taxonomy_stability(stable)
    assert "ranges 0-2" in text and "sensitive" in text and "1 configuration(s) find no family" in text
    assert "agree closely (ARI 0.90); 1 unit(s)" in findings.text_vs_behaviour(0.9, [1])
