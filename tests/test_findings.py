"""Results said in words: each sentence follows the numbers it is computed from (planted cases on
both sides of every verdict), with the real calibration / selective / stats functions."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

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
    text = findings.temperature_scaling(over, n_boot=100)
    diff = findings.ece_change(over, n_boot=100)
    assert over.temperature > 1 and "softens the model (T > 1" in text
    # a large planted effect: the paired difference's interval lies below 0
    assert diff.upper < 0 and "lowers test ECE" in text and "beyond resampling noise" in text
    assert f"[{diff.lower:+.4f}, {diff.upper:+.4f}]" in text and f"over {diff.n_clusters} test windows" in text
    # the paired difference is ece(after) - ece(before) on the same rows: an oracle from the metrics
    assert diff.estimate == pytest.approx(over.metrics.loc["after", "ece"] - over.metrics.loc["before", "ece"])
    calibrated = calibration.temperature_scaling_report(planted(1.0, seed=2), planted(1.0, seed=3), n_boot=100)
    text = findings.temperature_scaling(calibrated, n_boot=100)
    diff = findings.ece_change(calibrated, n_boot=100)
    assert diff.lower < 0 < diff.upper, "a calibrated model's change should be within noise (planted)"
    assert "the interval contains 0, so the change is within resampling noise" in text
    assert "lowers" not in text and "raises" not in text
    under = calibration.temperature_scaling_report(planted(0.4, seed=4), planted(0.4, seed=5), n_boot=100)
    assert "under-confident" in findings.calibration_at_t1(under)
    assert "sharpens the model (T < 1" in findings.temperature_scaling(under, n_boot=100)


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
    assert "0.930 (mahalanobis)" in text and "msp (0.410) ranks the wrong way" in text
    text = findings.ood_detection(pd.DataFrame({"auroc": [0.18, 0.36, 0.25]}, index=["msp", "energy", "log_prob"]))
    assert text.startswith("No score tells code from prose the right way: the best, energy, has AUROC 0.360")
    assert "msp (0.180), log_prob (0.250) rank the wrong way" in text
    policies = pd.DataFrame({"name": ["a", "b"], "accuracy_predicted": [0.9, 0.7], "abstention_rate": [0.5, 0.1]})
    assert "'a' is most accurate (90.0%)" in findings.abstention(policies)
    assert "Not measured" in findings.ensemble(None, ["toy-lm"])
    mixed = pd.DataFrame({"name": ["conf", "conf", "both", "both"], "domain": ["prose", "code"] * 2,
                          "coverage": [0.6, 0.45, 0.58, 0.02]})
    assert findings.mixed_stream(mixed) == "Kept on prose / code: conf 60% / 45%; both 58% / 2%."
    mixed["accuracy_predicted"] = [0.75, 0.31, 0.8, 0.9]
    text = findings.mixed_stream(mixed, target_risk=0.30, guaranteed="conf")
    assert "VIOLATED on code (keeps 45.0% at risk 0.690)" in text and "it holds on prose (keeps 60.0% at risk 0.250)" in text
    assert "VIOLATED" not in findings.mixed_stream(mixed.assign(accuracy_predicted=0.9), 0.30, "conf")


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
    text = findings.logit_difference([6.0, 7.0, 5.5])
    # the sample standard deviation (ddof = 1), as torch.Tensor.std prints it in the notebook
    assert f"± {torch.tensor([6.0, 7.0, 5.5]).std():.2f}" in text and "n = 3" in text
    assert "the model solves the task" in text and "wins on 3 of 3 prompts" in text
    assert "prefers the alternative" in findings.logit_difference([-3.0, -2.5, -2.0, -4.0])
    assert "the interval contains 0" in findings.logit_difference([-1.0, 0.5, -2.0, 1.5])
    assert "after 2 of 3 blocks" in findings.lens_depth(2.0, 3, 0.01, 0.9)
    assert "never becomes" in findings.lens_depth(float("nan"), 2, 0.01, 0.02)
    assert "only after the last block" in findings.lens_depth(2.0, 2, 0.01, 0.9)
    frame = pd.DataFrame({"unit": ["L1H0", "L1H2", "L0H1", "L1H1"], "dla": [4.0, -3.0, 0.5, 2.0]})
    text = findings.top_units(frame, "dla", k=2, total=10.0, known=["L1H0", "L1H1"], role="induction")
    assert text == ("The top 2 by |dla| are L1H0 (+4.00), L1H2 (-3.00), together 10% of the total 10.00; "
                    "1 of them is a known induction head.")
    assert "no induction heads are on record for this model to compare with (overlap n/a)" in \
        findings.top_units(frame, "dla", known=[], role="induction")
    # signed: the order notebook 04 prints its top-k in (a large negative head is not "top")
    assert findings.top_units(frame, "dla", k=2, rank="signed").startswith(
        "The top 2 by dla are L1H0 (+4.00), L1H1 (+2.00)")
    assert "almost fully" in findings.patching_restoration(0.97, "x")
    assert "restores almost nothing" in findings.patching_restoration(0.02, "x")
    labels = [f"L{l}H{h}" for l in range(3) for h in range(4)]
    exact = pd.Series(np.linspace(-0.3, 0.9, 12), index=labels)
    good = findings.attribution_agreement(exact, exact * 0.9 + 0.01, 0.95, k=3)
    assert "usable stand-in" in good and "over 12 heads Pearson r = 1.00" in good and "3 of 3 shared" in good
    # the case: the largest exact effect (a negative head) estimated near 0, r 0.5
    estimate = exact.copy()
    estimate[exact.abs().idxmax()] = -0.003
    estimate["L0H0"] = -0.003
    bad = findings.attribution_agreement(exact, estimate, 0.9, k=3)
    assert "L2H3 (+0.900), is estimated at -0.003" in bad and "not a stand-in here" in bad
    assert "it misses the largest effect (L2H3)" in bad
    few = findings.attribution_agreement(exact[:4], exact[:4], 1.0, k=3)
    assert "with 4 heads, too few units to say" in few and "stand-in for" not in few
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
    assert findings.head_classes(["content", "hybrid", "content"]) == (
        "0 position, 1 hybrid and 2 content heads among 3: most heads (2 of 3) attend by what tokens are, not where "
        "they are; none attends by position alone.")
    text = findings.head_classes(["hybrid"] * 12 + ["content"] * 4)
    assert "most heads (12 of 16) mix where tokens are with what they are" in text and "not where" not in text
    frame = pd.DataFrame({"unit": ["L1H0", "L1H1"], "drop": [0.01, -0.002]})
    assert "No single head's ablation drops probe accuracy by 0.02 or more" in findings.ablation_importance(frame)
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
    assert "with 3 scored units, too few units to say" in text and "Spearman" not in text
    rng = np.random.default_rng(0)
    heads = pd.DataFrame({"unit": [f"L{i // 4}H{i % 4}" for i in range(12)], "kind": "head", "explanation": "x",
                          "primary_score": rng.normal(size=12), "causal_effect": rng.uniform(0.2, 0.6, 12)})
    neurons = pd.DataFrame({"unit": [f"N{i}" for i in range(10)], "kind": "neuron", "explanation": "y",
                            "primary_score": rng.normal(size=10), "causal_effect": rng.uniform(0, 0.05, 10)})
    text = findings.heads_vs_neurons(pd.concat([heads, neurons]))
    assert "single heads matter more" in text and "n = 12 heads and 10 neurons" in text
    # toy-2l: the MLP outputs are zero, every neuron's causal effect is exactly 0
    zero = findings.heads_vs_neurons(pd.concat([heads, neurons.assign(causal_effect=0.0)]))
    assert "every neuron ablation changes the loss by exactly 0 (n = 10)" in zero and "matter more" not in zero
    assert "exactly 0" in findings.explainer_run(neurons.assign(causal_effect=0.0))
    assert "Only one kind" in findings.heads_vs_neurons(heads)
    table = pd.DataFrame({"label": ["Induction heads", "mixed"], "size": [3, 2]})
    text = findings.families({"n_families": 2, "coverage": 0.625}, table)
    assert text == "2 families cover 62% of the units; the largest is 'Induction heads' (3 units); 38% stay unclustered."
    assert "No family formed" in findings.families({"n_families": 0}, table.iloc[:0])
    stable = pd.DataFrame({"n_families": [2, 2, 0], "ari_vs_reference": [1.0, 0.9, 0.0],
                           "reference": [True, False, False], "failure": [None, None, None]})
    text = findings.taxonomy_stability(stable)
    assert "ranges 0-2" in text and "sensitive" in text and "1 configuration(s) find no family" in text
    assert "agree closely (ARI 0.90); 1 unit(s)" in findings.text_vs_behaviour(0.9, [1])
    assert "agree closely (ARI 0.90 over 12 clustered units)" in findings.text_vs_behaviour(0.9, [1], n_units=12)
    few = findings.text_vs_behaviour(0.48, [1, 2], n_units=5)
    assert "ARI 0.48 over 5 clustered units, too few units to say" in few and "agree partly" not in few


# ------------------------------------------------------------------------------------------------
# The audit: sentences checked against the inputs they were computed from, over seeded random
# inputs. Every number a sentence quotes must be one of the inputs or a quantity the test
# recomputes itself (scipy / numpy oracles), rounded as printed; stated orderings and counts hold.

NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w])")
REFERENCES = ("0", "95%")  # the fixed references sentences compare with: zero, the interval level


def quoted(text: str) -> list[str]:
    """The numbers a sentence quotes (not the digits inside labels such as L1H0)."""
    return [m.group(0).lstrip("+").rstrip(".") for m in NUMBER.finditer(text)]


def renderings(values, constants=()) -> set[str]:
    """Every way the sentences print a number: fixed 0-4 decimals, 2-4 significant digits,
    percentages with 0-1 decimals, integers with thousands separators."""
    out = {str(c) for c in (*REFERENCES, *constants)}
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            continue
        for d in range(5):
            out.add(f"{v:.{d}f}")
            out.add(f"{100 * v:.{min(d, 1)}f}%")
        for d in (2, 3, 4):
            out.add(f"{v:.{d}g}")
        if float(v).is_integer():
            out.add(f"{int(v):,}")
    return {o.lstrip("+") for o in out}


def assert_numbers_from(text: str, values, constants=()):
    allowed = renderings(values, constants)
    stray = [n for n in quoted(text) if n not in allowed]
    assert not stray, f"{stray} quoted in {text!r} but not among the inputs"


def test_model_sizes_names_accuracy_and_needs_eight_models_for_a_trend():
    few = pd.DataFrame({"model": ["toy-lm", "toy-1l", "toy-2l"], "n_params": [1e6, 2e6, 3e6],
                        "accuracy": [0.21, 0.011, 0.05], "ece": [0.02, 0.01, 0.03], "ece_scaled": [0.015, 0.004, 0.02],
                        "temperature": [1.2, 0.9, 1.1]})
    text = findings.model_sizes(few)
    assert "the lowest test ECE is toy-1l's (0.0040, at top-1 accuracy 1.1%, the least accurate model" in text
    assert "best calibrated" not in text and "with 3 models, too few units to say" in text
    assert "rises" not in text and "falls" not in text
    n = 10
    rising = pd.DataFrame({"model": [f"m{i}" for i in range(n)], "n_params": np.arange(1, n + 1) * 1e8,
                           "accuracy": np.linspace(0.3, 0.5, n), "ece": np.linspace(0.01, 0.1, n),
                           "ece_scaled": np.linspace(0.005, 0.02, n), "temperature": 1.1})
    rho, p = stats.spearmanr(rising["n_params"], rising["ece"])
    text = findings.model_sizes(rising)
    assert f"ECE at T = 1 rises with parameter count (Spearman {rho:+.2f}, n = 10, p = {p:.3f})" in text
    noise = rising.assign(ece=np.random.default_rng(3).permutation(np.linspace(0.01, 0.1, n)))
    rho, p = stats.spearmanr(noise["n_params"], noise["ece"])
    assert p >= 0.05 and "no trend of ECE at T = 1 with parameter count" in findings.model_sizes(noise)


def test_explainer_run_correlation_needs_eight_units_and_a_test():
    rng = np.random.default_rng(1)
    score = rng.normal(size=20)
    frame = pd.DataFrame({"unit": [f"u{i}" for i in range(20)], "kind": "head", "explanation": "x",
                          "primary_score": score, "causal_effect": score * 0.5 + rng.normal(0, 0.1, 20)})
    rho, p = stats.spearmanr(frame["primary_score"], frame["causal_effect"])
    text = findings.explainer_run(frame)
    assert f"score and causal effect correlate (Spearman {rho:+.2f}, n = 20, p = {p:.3f})" in text
    unrelated = frame.assign(causal_effect=rng.permutation(20) / 10)
    rho, p = stats.spearmanr(unrelated["primary_score"], unrelated["causal_effect"])
    if p >= 0.05:
        assert "no evidence that score and causal effect go together" in findings.explainer_run(unrelated)
    assert "too few units to say" in findings.explainer_run(frame.head(7))


def test_audit_random_sweep_every_quoted_number_ordering_and_count_holds():
    """A seeded sweep over random inputs of every finding that quotes numbers computed from them."""
    rng = np.random.default_rng(2026)
    for trial in range(60):
        # head classes: the counts add up and the majority named is the majority
        labels = list(rng.choice(["position", "hybrid", "content"], size=int(rng.integers(1, 30))))
        text = findings.head_classes(labels)
        counts = [labels.count(k) for k in ("position", "hybrid", "content")]
        assert_numbers_from(text, [*counts, len(labels)])
        said = [int(x) for x in re.match(r"(\d+) position, (\d+) hybrid and (\d+) content heads among (\d+)", text).groups()]
        assert said[:3] == counts and sum(said[:3]) == said[3] == len(labels)
        if "most heads (" in text:
            m = int(re.search(r"most heads \((\d+) of", text).group(1))
            assert m == max(counts) and counts.count(m) == 1

        # logit difference: mean, sample SD, t interval, wins of n
        diffs = rng.normal(rng.normal(0, 3), rng.uniform(0.1, 4), size=int(rng.integers(2, 40)))
        text = findings.logit_difference(diffs)
        n = len(diffs)
        half = stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n)
        wins = int((diffs > 0).sum())
        assert_numbers_from(text, [diffs.mean(), diffs.std(ddof=1), diffs.mean() - half, diffs.mean() + half, n, wins])
        assert f"wins on {wins} of {n} prompts" in text
        if "solves the task" in text:
            assert wins >= 0.9 * n and diffs.mean() - half > 0
        if "interval contains 0" in text:
            assert diffs.mean() - half <= 0 <= diffs.mean() + half

        # OOD: the best is the maximum; exactly the scores below 0.5 are said to rank the wrong way
        names = ["msp", "energy", "log_prob", "mahalanobis"][: int(rng.integers(2, 5))]
        auroc = pd.Series(rng.uniform(0, 1, len(names)), index=names)
        text = findings.ood_detection(pd.DataFrame({"auroc": auroc}))
        assert_numbers_from(text, auroc.values, constants=("0.5",))
        best = auroc.idxmax()
        assert f"{auroc[best]:.3f}" in text and best in text
        for name, value in auroc.items():
            if name != best:
                assert (f"{name} ({value:.3f})" in text) == (value < 0.5) or (f"{name} is near chance" in text)

        # mixed stream: a violation is said exactly where the guaranteed policy's risk > target
        target = float(rng.uniform(0.1, 0.5))
        table = pd.DataFrame({"name": ["sgr", "sgr", "other", "other"], "domain": ["prose", "code"] * 2,
                              "coverage": rng.uniform(0, 1, 4), "accuracy_predicted": rng.uniform(0, 1, 4)})
        text = findings.mixed_stream(table, target, "sgr")
        risks = 1 - table["accuracy_predicted"].to_numpy()
        assert_numbers_from(text, [*table["coverage"], *risks, target])
        violated = [d for d, r in zip(["prose", "code"], risks[:2]) if r > target]
        if violated:
            clause = text.split("VIOLATED on ")[1].split(":")[0]
            assert [d for d in ("prose", "code") if f"{d} (keeps" in clause] == violated
        else:
            assert "VIOLATED" not in text

        # attribution vs exact: r, rho, p recomputed with scipy; the top-k lists are the true orders
        n_heads = int(rng.integers(4, 20))
        idx = [f"L{i // 4}H{i % 4}" for i in range(n_heads)]
        exact = pd.Series(rng.normal(size=n_heads), index=idx)
        estimate = pd.Series(exact.to_numpy() * rng.uniform(-1, 2) + rng.normal(0, rng.uniform(0.01, 2), n_heads), index=idx)
        text = findings.attribution_agreement(exact, estimate, float(rng.uniform()), k=3)
        r, p_r = stats.pearsonr(exact, estimate)
        rho, p_rho = stats.spearmanr(exact, estimate)
        top_e = list(exact.sort_values(ascending=False).index[:3])
        top_a = list(estimate.sort_values(ascending=False).index[:3])
        shared = len(set(top_e) & set(top_a))
        largest = exact.abs().idxmax()
        sign = float(re.search(r"signs agree on (\d+)%", text).group(1)) / 100
        assert_numbers_from(text, [r, p_r, rho, p_rho, exact[largest], estimate[largest], shared, n_heads, 3, sign],
                            constants=("0.8",))
        assert f"{', '.join(top_e)} vs by attribution {', '.join(top_a)} ({shared} of 3 shared)" in text
        assert ("too few units to say" in text) == (n_heads < findings.MIN_UNITS)
        if "usable stand-in" in text:
            assert n_heads >= 8 and r >= 0.8 and rho >= 0.8 and shared == 3

        # explainer run: Spearman quoted only from >= 8 units, with the scipy p-value
        m = int(rng.integers(2, 25))
        frame = pd.DataFrame({"unit": [f"u{i}" for i in range(m)], "kind": "head", "explanation": "x",
                              "primary_score": rng.normal(size=m), "causal_effect": rng.normal(size=m)})
        text = findings.explainer_run(frame)
        rho, p = stats.spearmanr(frame["primary_score"], frame["causal_effect"])
        top = frame.loc[frame["causal_effect"].abs().idxmax()]
        assert_numbers_from(text, [m, frame["primary_score"].min(), frame["primary_score"].max(), top["causal_effect"],
                                   rho, p, findings.MIN_UNITS])
        assert ("Spearman" in text) == (m >= findings.MIN_UNITS)
        if "correlate (" in text:
            assert p < 0.05

        # model sizes: the model named has the lowest scaled ECE; a trend only from >= 8 models and p < 0.05
        k = int(rng.integers(1, 12))
        sizes = pd.DataFrame({"model": [f"m{i}" for i in range(k)], "n_params": rng.uniform(1e6, 1e9, k),
                              "accuracy": rng.uniform(0, 1, k), "ece": rng.uniform(0, 0.2, k),
                              "ece_scaled": rng.uniform(0, 0.2, k), "temperature": rng.uniform(0.5, 2, k)})
        text = findings.model_sizes(sizes)
        best = sizes.loc[sizes["ece_scaled"].idxmin()]
        assert f"lowest test ECE is {best['model']}'s ({best['ece_scaled']:.4f}" in text
        hotter = int((sizes["temperature"] > 1).sum())
        extra = [*stats.spearmanr(sizes["n_params"], sizes["ece"])] if k >= 3 else []
        assert_numbers_from(text, [k, best["ece_scaled"], best["accuracy"], hotter, *extra, findings.MIN_UNITS],
                            constants=("1",))
        if "rises" in text or "falls" in text:
            assert k >= 8 and extra[1] < 0.05 and (("rises" in text) == (extra[0] > 0))

        # heads vs neurons: the Mann-Whitney p recomputed; "matter more" only at p < 0.05
        h, q = int(rng.integers(2, 15)), int(rng.integers(2, 15))
        units = pd.DataFrame({"unit": [f"x{i}" for i in range(h + q)], "kind": ["head"] * h + ["neuron"] * q,
                              "explanation": "x", "primary_score": rng.normal(size=h + q),
                              "causal_effect": np.r_[rng.exponential(rng.uniform(0.05, 1), h),
                                                     rng.exponential(rng.uniform(0.05, 1), q)]})
        text = findings.heads_vs_neurons(units)
        e_h, e_n = units["causal_effect"][:h].abs(), units["causal_effect"][h:].abs()
        p = stats.mannwhitneyu(e_h, e_n, alternative="two-sided").pvalue
        assert_numbers_from(text, [h, q, units["primary_score"][:h].mean(), units["primary_score"][h:].mean(),
                                   e_h.mean(), e_n.mean(), p])
        assert ("matter more" in text) == (p < 0.05)
