"""interp_lib.selective: risk-coverage by hand, the SGR guarantee on fresh data, ensembles, OOD
scores, abstention policies, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize, stats

import interp_lib as il
from interp_lib import selective as sel

# ----------------------------------------------------------------------------------------------
# Risk-coverage, AURC, E-AURC on hand-computable examples
# ----------------------------------------------------------------------------------------------


def test_risk_coverage_by_hand():
    confidence = np.array([0.6, 0.9, 0.7, 0.8])      # sorted: 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong)
    correct = np.array([0, 1, 1, 0])
    rc = sel.risk_coverage(confidence, correct)
    np.testing.assert_allclose(rc.coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(rc.risk, [0, 1 / 2, 1 / 3, 2 / 4])
    np.testing.assert_allclose(rc.threshold, [0.9, 0.8, 0.7, 0.6])
    assert rc.aurc == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)        # 1/3
    assert rc.optimal_aurc == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)    # both right ones first: 5/24
    assert rc.eaurc == pytest.approx(1 / 3 - 5 / 24)                       # 1/8
    assert rc.error_rate == 0.5 and rc.n == 4
    frame = rc.to_frame()
    assert list(frame.columns) == ["threshold", "coverage", "risk", "selective_accuracy"]


def test_all_correct_and_all_wrong_give_finite_e_aurc_zero():
    confidence = np.array([0.2, 0.9, 0.5])
    right = sel.risk_coverage(confidence, np.ones(3, bool))
    assert (right.aurc, right.optimal_aurc, right.eaurc, right.error_rate) == (0.0, 0.0, 0.0, 0.0)
    wrong = sel.risk_coverage(confidence, np.zeros(3, bool))
    assert (wrong.aurc, wrong.optimal_aurc, wrong.eaurc, wrong.error_rate) == (1.0, 1.0, 0.0, 1.0)
    single = sel.risk_coverage([0.7], [1])
    assert single.aurc == 0.0 and single.coverage.tolist() == [1.0]


def test_perfect_ranking_has_zero_e_aurc_and_reversed_ranking_is_worst():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.7
    perfect = sel.risk_coverage(correct + rng.uniform(0, 0.5, 200), correct)
    assert perfect.eaurc == pytest.approx(0.0, abs=1e-12) and perfect.aurc == pytest.approx(perfect.optimal_aurc)
    random_order = sel.risk_coverage(rng.random(200), correct)
    reversed_order = sel.risk_coverage(-(correct + rng.uniform(0, 0.5, 200)), correct)
    assert 0 < random_order.eaurc < reversed_order.eaurc


def test_tied_confidences_average_over_orderings():
    confidence = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.2])
    correct = np.array([1, 0, 1, 1, 0, 0], bool)
    # brute force: mean AURC over every ordering that respects the confidence ranking
    groups = [np.nonzero(confidence == c)[0] for c in (0.9, 0.5, 0.2)]
    values = []
    for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
        errors = ~correct[np.concatenate(orders)]
        values.append(np.mean(np.cumsum(errors) / np.arange(1, 7)))
    rc = sel.risk_coverage(confidence, correct)
    assert rc.aurc == pytest.approx(np.mean(values))
    np.testing.assert_allclose(rc.coverage, [2 / 6, 5 / 6, 1.0])   # one point per distinct threshold
    np.testing.assert_allclose(rc.risk, [1 / 2, 2 / 5, 3 / 6])


def test_accuracy_at_coverage():
    confidence = np.array([0.6, 0.9, 0.7, 0.8])
    correct = np.array([0, 1, 1, 0])
    assert sel.accuracy_at_coverage(confidence, correct, 0.25) == 1.0
    assert sel.accuracy_at_coverage(confidence, correct, 0.5) == 0.5
    table = sel.accuracy_at_coverage(confidence, torch.tensor([0, 1, 1, 0]), [0.3, 0.75, 1.0])
    assert isinstance(table, pd.DataFrame)
    assert table["n_retained"].tolist() == [2, 3, 4]
    np.testing.assert_allclose(table["accuracy"], [0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(table["threshold"], [0.8, 0.7, 0.6])
    np.testing.assert_allclose(table["abstained"], [0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match=r"coverage must lie in \(0, 1\]; got 1\.5"):
        sel.accuracy_at_coverage(confidence, correct, 1.5)


# ----------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------


def test_binomial_bound_solves_the_binomial_tail_equation():
    for n_errors, n, delta in [(0, 10, 0.05), (3, 50, 0.01), (40, 400, 0.001), (7, 7, 0.1)]:
        bound = sel.binomial_upper_bound(n_errors, n, delta)
        if n_errors == n:
            assert bound == 1.0
            continue
        numeric = optimize.brentq(lambda b: stats.binom.cdf(n_errors, n, b) - delta, n_errors / n, 1 - 1e-12)
        assert bound == pytest.approx(numeric, abs=1e-8)
        assert bound > n_errors / n


def calibrated_sample(m: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ~ U(0, 1) and P(correct | c) = c: the true selective risk of threshold t is (1 - t) / 2."""
    confidence = rng.random(m)
    return confidence, rng.random(m) < confidence


def test_guaranteed_risk_holds_on_fresh_data_in_most_repetitions():
    rng = np.random.default_rng(0)
    target, delta = 0.1, 0.05
    fresh_conf, fresh_correct = calibrated_sample(200_000, rng)
    violations, coverages = 0, []
    for _ in range(40):
        result = sel.guaranteed_risk_threshold(*calibrated_sample(4000, rng), target_risk=target, delta=delta)
        if not result.feasible:  # the search can miss every feasible threshold: abstaining is safe
            coverages.append(0.0)
            continue
        assert result.method == "sgr" and result.bound < target
        assert result.risk <= result.bound
        kept = fresh_conf >= result.threshold
        fresh_risk = 1 - fresh_correct[kept].mean()
        true_risk = (1 - result.threshold) / 2
        assert fresh_risk == pytest.approx(true_risk, abs=0.01)
        violations += true_risk > target
        coverages.append(result.coverage)
    assert violations <= 2  # P(violation) <= delta = 5% per repetition; typically none
    assert np.mean(np.array(coverages) > 0) >= 0.9
    assert 0.05 < np.mean(coverages) < 0.2   # non-trivial: the best possible coverage is 0.2 (t = 0.8)


def test_guaranteed_risk_infeasible_target_abstains_on_everything():
    confidence = np.linspace(0.1, 0.9, 50)
    result = sel.guaranteed_risk_threshold(confidence, np.zeros(50, bool), target_risk=0.05, delta=0.01)
    assert not result.feasible and result.threshold == math.inf and result.coverage == 0.0
    assert "abstain on everything" in result.describe()
    decisions = result.policy().decide(confidence=confidence)
    assert (decisions["decision"] == "abstain").all()


def test_guaranteed_risk_describes_itself():
    rng = np.random.default_rng(1)
    result = sel.guaranteed_risk_threshold(*calibrated_sample(3000, rng), target_risk=0.2, delta=0.01)
    text = result.describe()
    assert text.startswith("predict when confidence >= ") and "true risk <= " in text and "0.99" in text


def test_empirical_confidence_threshold():
    confidence = np.array([0.6, 0.9, 0.7, 0.8, 0.95])
    correct = np.array([0, 1, 1, 0, 1])
    # sorted: .95 R, .9 R, .8 W, .7 R, .6 W -> risks 0, 0, 1/3, 1/4, 2/5
    by_risk = sel.confidence_threshold(confidence, correct, target_risk=0.25)
    assert (by_risk.threshold, by_risk.n_covered, by_risk.risk) == (0.7, 4, 0.25)
    assert math.isnan(by_risk.bound) and by_risk.method == "empirical"
    by_coverage = sel.confidence_threshold(confidence, correct, coverage=0.5)
    assert (by_coverage.threshold, by_coverage.n_covered) == (0.8, 3)
    assert sel.confidence_threshold(confidence, correct, target_risk=0.0).n_covered == 2
    with pytest.raises(ValueError, match="expected exactly one of them"):
        sel.confidence_threshold(confidence, correct)


# ----------------------------------------------------------------------------------------------
# Ensembles
# ----------------------------------------------------------------------------------------------


def test_ensemble_disagreement_by_hand():
    agree = np.array([[[0.7, 0.3]], [[0.7, 0.3]]])
    result = sel.ensemble_disagreement(agree)
    assert result.mutual_information[0] == pytest.approx(0.0) and result.variance[0] == pytest.approx(0.0)
    assert result.predictive_entropy[0] == pytest.approx(-(0.7 * np.log(0.7) + 0.3 * np.log(0.3)))
    opposite = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
    result = sel.ensemble_disagreement(opposite, labels=[1])
    assert result.mutual_information[0] == pytest.approx(np.log(2)) and result.expected_entropy[0] == 0.0
    assert result.variance[0] == pytest.approx(0.25) and result.confidence[0] == 0.5
    # random members against the formulas
    rng = np.random.default_rng(0)
    members = rng.dirichlet(np.ones(4), size=(3, 20))
    result = sel.ensemble_disagreement(torch.from_numpy(members))
    mean = members.mean(0)
    entropy = lambda p: -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(result.mutual_information, entropy(mean) - entropy(members).mean(0))
    np.testing.assert_allclose(result.variance, members[:, np.arange(20), mean.argmax(1)].var(0))
    assert list(result.to_frame().columns)[:3] == ["prediction", "confidence", "predictive_entropy"]
    with pytest.raises(ValueError, match="expected at least 2 to disagree"):
        sel.ensemble_disagreement(members[:1])
    with pytest.raises(ValueError, match=r"member_probs\[1\] has shape \(20, 3\); expected \(20, 4\)"):
        sel.ensemble_disagreement([members[0], members[1][:, :3] / members[1][:, :3].sum(1, keepdims=True)])
    with pytest.raises(ValueError, match=r"member_probs\[2\] rows must sum to 1"):
        sel.ensemble_disagreement(np.concatenate([members[:2], members[2:] * 0.5]))


# ----------------------------------------------------------------------------------------------
# OOD scores
# ----------------------------------------------------------------------------------------------


def test_ood_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s_in, s_out = rng.integers(0, 5, 300).astype(float), rng.integers(0, 4, 200).astype(float)
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[s_in, s_out])
    assert sel.ood_auroc(s_in, s_out) == pytest.approx(expected)
    assert sel.ood_auroc(-s_in, -s_out, higher_is_in=False) == pytest.approx(expected)
    assert sel.ood_auroc([2.0, 3.0], [0.0, 1.0]) == 1.0


def test_mahalanobis_auroc_high_for_shifted_gaussian_and_chance_for_same_distribution():
    rng = np.random.default_rng(0)
    covariance = np.array([[2.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]])
    draw = lambda n, shift: rng.multivariate_normal(np.zeros(3) + shift, covariance, size=n)
    scorer = sel.MahalanobisScorer(class_conditional=False).fit(draw(2000, 0.0))
    in_scores = scorer.score(draw(1000, 0.0))
    assert sel.ood_auroc(in_scores, scorer.score(draw(1000, 3.0))) > 0.95
    assert sel.ood_auroc(in_scores, scorer.score(draw(1000, 0.0))) == pytest.approx(0.5, abs=0.05)


def test_mahalanobis_matches_a_hand_computation():
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [5.0, 5.0], [7.0, 6.0], [6.0, 4.0]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    scorer = sel.MahalanobisScorer(class_conditional=True, regularization=0.0).fit(features, labels)
    means = np.array([features[:3].mean(0), features[3:].mean(0)])
    centred = np.r_[features[:3] - means[0], features[3:] - means[1]]
    shared = centred.T @ centred / 6  # tied covariance, maximum likelihood
    np.testing.assert_allclose(scorer.means_, means)
    np.testing.assert_allclose(scorer.covariance_, shared)
    query = np.array([[1.0, 1.0], [4.0, 3.0], [10.0, -3.0]])
    inverse = np.linalg.inv(shared)
    by_hand = np.array([[(q - m) @ inverse @ (q - m) for m in means] for q in query])
    np.testing.assert_allclose(scorer.class_distances(query), by_hand, rtol=1e-10)
    np.testing.assert_allclose(scorer.distance(query), by_hand.min(1), rtol=1e-10)
    np.testing.assert_allclose(scorer.score(torch.from_numpy(query)), -by_hand.min(1), rtol=1e-10)
    single = sel.MahalanobisScorer(class_conditional=False, regularization=0.0).fit(features)
    centred = features - features.mean(0)
    inverse = np.linalg.inv(centred.T @ centred / 6)
    d = query - features.mean(0)
    np.testing.assert_allclose(single.distance(query), np.einsum("nd,de,ne->n", d, inverse, d), rtol=1e-10)
    with pytest.raises(ValueError, match="labels is None"):
        sel.MahalanobisScorer().fit(features)
    with pytest.raises(ValueError, match="features has 3 columns; expected 2"):
        scorer.score(np.ones((1, 3)))


def test_max_softmax_probability_and_energy():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [20.0, 18.0, 0.0]])
    msp = sel.max_softmax_probability(logits)
    np.testing.assert_allclose(msp, [np.exp(2) / (np.exp(2) + 2), 1 / 3, 1 / (1 + np.exp(-2) + np.exp(-20))])
    np.testing.assert_allclose(sel.energy_score(logits), np.log(np.exp(logits).sum(1)))
    np.testing.assert_allclose(sel.energy_score(logits, temperature=2.0), 2 * np.log(np.exp(logits / 2).sum(1)))
    # energy keeps the scale that MSP discards: the same shape, 10x the logits
    assert sel.energy_score(logits[:1] * 10)[0] > sel.energy_score(logits[:1])[0]
    with pytest.raises(ValueError, match="logits contains 1 NaN/inf"):
        sel.energy_score(np.array([[1.0, np.nan]]))


# ----------------------------------------------------------------------------------------------
# Abstention policies
# ----------------------------------------------------------------------------------------------


def test_confidence_policy_says_why():
    policy = sel.AbstentionPolicy.confidence(0.52)
    decisions = policy.decide(predictions=[3, 7, 1], confidence=[0.31, 0.93, 0.52])
    assert decisions["decision"].tolist() == ["abstain", "predict", "predict"]
    assert decisions["reason"].tolist() == ["confidence 0.31 < threshold 0.52",
                                            "confidence 0.93 >= threshold 0.52",
                                            "confidence 0.52 >= threshold 0.52"]
    assert decisions["prediction"].isna().tolist() == [True, False, False]
    assert decisions["prediction"].iloc[1] == 7
    # close values get enough digits to show the side of the threshold
    close = policy.decide(confidence=[0.5199])
    assert close["reason"].iloc[0] == "confidence 0.5199 < threshold 0.52"


def test_combined_policy_with_an_ood_rule():
    rng = np.random.default_rng(0)
    in_distance = rng.chisquare(3, 1000)
    ood_rule = sel.AbstentionRule.from_in_distribution("mahalanobis", in_distance, keep=0.95, higher_is_better=False)
    assert np.mean(ood_rule.passes(in_distance)) == pytest.approx(0.95, abs=0.002)
    policy = sel.AbstentionPolicy([sel.AbstentionRule("confidence", 0.5), ood_rule])
    frame = policy.decide(confidence=[0.9, 0.4, 0.9, 0.3], mahalanobis=[1.0, 1.0, 50.0, 60.0])
    assert frame["decision"].tolist() == ["predict", "abstain", "abstain", "abstain"]
    assert frame["reason"].iloc[1] == "confidence 0.4 < threshold 0.5"
    assert frame["reason"].iloc[2].startswith("mahalanobis 50 > threshold ")
    assert frame["reason"].iloc[3].count(";") == 1  # both rules failed, both named
    assert frame["reason"].iloc[0].startswith("confidence 0.9 >= threshold 0.5; mahalanobis 1 <= threshold")
    summary = policy.evaluate([1, 0, 1, 0], confidence=[0.9, 0.4, 0.9, 0.3], mahalanobis=[1.0, 1.0, 50.0, 60.0])
    assert summary["coverage"] == 0.25 and summary["accuracy_predicted"] == 1.0
    assert summary["accuracy_abstained"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"scores \['mahalanobis'\] are missing"):
        policy.decide(confidence=[0.9])
    with pytest.raises(ValueError, match="confidence has 2 entries but mahalanobis has 1"):
        policy.decide(confidence=[0.9, 0.1], mahalanobis=[1.0])


def test_sgr_threshold_becomes_a_policy():
    rng = np.random.default_rng(3)
    confidence, correct = calibrated_sample(3000, rng)
    result = sel.guaranteed_risk_threshold(confidence, correct, target_risk=0.15, delta=0.01)
    summary = result.policy().evaluate(correct, confidence=confidence)
    assert summary["coverage"] == pytest.approx(result.coverage)
    assert summary["risk_predicted"] == pytest.approx(result.risk)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [
    sel.risk_coverage,
    lambda c, k: sel.accuracy_at_coverage(c, k, 0.5),
    lambda c, k: sel.guaranteed_risk_threshold(c, k, 0.1, 0.01),
    lambda c, k: sel.confidence_threshold(c, k, coverage=0.5),
], ids=["risk_coverage", "accuracy_at_coverage", "guaranteed_risk_threshold", "confidence_threshold"])
@pytest.mark.parametrize("confidence, correct, message", [
    ([0.9, np.nan, 0.2], [1, 0, 1], r"confidence contains 1 NaN/inf value\(s\)"),
    ([0.9, np.inf, 0.2], [1, 0, 1], r"confidence contains 1 NaN/inf"),
    ([0.9, 0.5], [1, 0, 1], r"confidence has 2 entries but correct has 3"),
    ([], [], r"confidence is empty"),
    ([0.9, 0.5], [1, 2], r"correct must be 0/1 \(or bool\) correctness; got 2"),
    ([[0.9, 0.5]], [1], r"confidence has shape \(1, 2\); expected a 1-D array"),
])
def test_bad_selective_input(function, confidence, correct, message):
    with pytest.raises(ValueError, match=message):
        function(np.asarray(confidence, dtype=float), np.asarray(correct))


def test_bad_threshold_options():
    with pytest.raises(ValueError, match="target_risk=1.5: expected a number in"):
        sel.guaranteed_risk_threshold([0.5, 0.6], [1, 1], target_risk=1.5)
    with pytest.raises(ValueError, match="delta=0: expected a number in"):
        sel.guaranteed_risk_threshold([0.5, 0.6], [1, 1], target_risk=0.1, delta=0)
    with pytest.raises(ValueError, match="scores_out is empty"):
        sel.ood_auroc([1.0], [])


# ----------------------------------------------------------------------------------------------
# Model features: residual stream, ensembles of models
# ----------------------------------------------------------------------------------------------


def save_random_gpt2(path, seed: int):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(il.paths.data_dir() / "tokenizer-512")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gpt2_pair")
    return [il.load_model(save_random_gpt2(root / f"seed{s}", s), device="cpu") for s in (0, 1)]


@pytest.fixture(scope="module")
def windows(tiny_pair):
    return il.data.text_windows(tiny_pair[0], il.data.load_corpus("validation"), window_len=16, n_windows=6)


def test_residual_features_match_the_cache(tiny_pair, windows):
    model = tiny_pair[0]
    _, cache = model.run_with_cache(windows)
    resid = cache["blocks.1.hook_resid_post"].double()
    np.testing.assert_allclose(sel.residual_features(model, windows, layer=-1, batch_size=4),
                               resid.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sel.residual_features(model, windows, layer=1, reduce="last"),
                               resid[:, -1].numpy(), rtol=1e-5, atol=1e-6)
    assert sel.residual_features(model, windows, layer=0, reduce="none").shape == (6 * 16, model.cfg.d_model)
    with pytest.raises(ValueError, match=r"layer=5: expected an integer in \[-2, 1\]"):
        sel.residual_features(model, windows, layer=5)


def test_residual_mahalanobis_separates_code_from_prose(tiny_pair):
    # Out-of-distribution text: the bundled corpus has prose and, separately, code blocks.
    model = tiny_pair[0]
    prose = il.data.text_windows(model, il.data.load_corpus("validation"), window_len=16, n_windows=80)
    code = il.data.text_windows(model, il.data.load_corpus("code"), window_len=16, n_windows=40)
    features = sel.residual_features(model, prose, layer=0)
    scorer = sel.MahalanobisScorer(class_conditional=False).fit(features[:40])
    auroc = sel.ood_auroc(scorer.score(features[40:]), scorer.score(sel.residual_features(model, code, layer=0)))
    assert 0.0 <= auroc <= 1.0  # a random model need not separate them; the pipeline must run


def test_ensemble_next_token_disagreement_matches_full_probabilities(tiny_pair, windows):
    result = sel.ensemble_next_token_disagreement(tiny_pair, windows, batch_size=4)
    with torch.no_grad():
        members = [m(windows)[:, :-1].double().softmax(-1).flatten(0, 1).numpy() for m in tiny_pair]
    reference = sel.ensemble_disagreement(members, labels=windows[:, 1:].flatten())
    np.testing.assert_allclose(result.mutual_information, reference.mutual_information, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(result.variance, reference.variance, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(result.correct, reference.correct)
    assert result.mean_probs is None and (result.mutual_information > 0).all()
    with pytest.raises(ValueError, match="at least 2 loaded models"):
        sel.ensemble_next_token_disagreement(tiny_pair[:1], windows)


def test_risk_coverage_figure():
    rng = np.random.default_rng(0)
    confidence, correct = calibrated_sample(500, rng)
    curves = {"raw": sel.risk_coverage(confidence, correct), "shuffled": sel.risk_coverage(rng.random(500), correct)}
    sgr = sel.guaranteed_risk_threshold(confidence, correct, 0.2, 0.05)
    fig = il.plots.risk_coverage_curve(curves, thresholds={"SGR": sgr})
    assert len(fig.data) == 3 and "AURC" in fig.data[0].name
    assert fig.data[2].error_y.array[0] == pytest.approx(sgr.bound - sgr.risk)


# ----------------------------------------------------------------------------------------------
# Notebook-level helpers: tables, sequence-level OOD scores, ensemble members
# ----------------------------------------------------------------------------------------------


def test_risk_coverage_table_and_ensemble_curves():
    rng = np.random.default_rng(1)
    confidence, correct = calibrated_sample(400, rng)
    curves = {"confidence": sel.risk_coverage(confidence, correct), "random": sel.risk_coverage(rng.random(400), correct)}
    table = sel.risk_coverage_table(curves)
    assert list(table.index) == ["confidence", "random"]
    assert table.loc["confidence", "aurc"] == curves["confidence"].aurc
    assert table.loc["confidence", "aurc"] < table.loc["random", "aurc"]
    assert (table["error_rate"] == 1 - correct.mean()).all()
    members = rng.dirichlet(np.ones(3), size=(4, 50))
    uncertainty = sel.ensemble_disagreement(members, labels=rng.integers(0, 3, 50))
    ensemble = sel.ensemble_risk_coverage(uncertainty)
    assert set(ensemble) == {"confidence", "-mutual_information", "-predictive_entropy", "-variance"}
    assert ensemble["-mutual_information"].aurc == sel.risk_coverage(-uncertainty.mutual_information,
                                                                       uncertainty.correct).aurc
    with pytest.raises(ValueError, match="computed with labels"):
        sel.ensemble_risk_coverage(sel.ensemble_disagreement(members))
    with pytest.raises(ValueError, match="expected a RiskCoverage"):
        sel.risk_coverage_table({"x": 0.5})


def test_ood_detection_table_chooses_thresholds_on_calibration_data():
    rng = np.random.default_rng(2)
    frame = lambda shift, n: pd.DataFrame({"good": rng.normal(-shift, 1, n), "useless": rng.normal(0, 1, n)})
    calibration, inside, outside = frame(0, 4000), frame(0, 4000), frame(3, 2000)
    table = sel.ood_detection_table(inside, outside, calibration, keep=0.9)
    assert list(table.index) == ["good", "useless"]
    assert table.loc["good", "auroc"] == pytest.approx(sel.ood_auroc(inside["good"], outside["good"]))
    assert table.loc["good", "auroc"] > 0.95 and abs(table.loc["useless", "auroc"] - 0.5) < 0.05
    assert table.loc["good", "threshold"] == pytest.approx(np.quantile(calibration["good"], 0.1))
    assert table["in_kept"].to_numpy() == pytest.approx([0.9, 0.9], abs=0.02)
    assert table.loc["good", "out_abstained"] > 0.9 and table.loc["useless", "out_abstained"] == pytest.approx(
        0.1, abs=0.03)
    with pytest.raises(ValueError, match="share no score"):
        sel.ood_detection_table(inside, outside.rename(columns=str.upper), calibration)
    with pytest.raises(ValueError, match="keep=1.5"):
        sel.ood_detection_table(inside, outside, calibration, keep=1.5)


def test_abstention_table_by_hand_and_per_domain():
    correct = np.array([1, 1, 0, 1, 0, 0], bool)
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    familiar = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    policies = {"confident": sel.AbstentionPolicy.confidence(0.5),
                "both": sel.AbstentionPolicy([sel.AbstentionRule("confidence", 0.5),
                                              sel.AbstentionRule("familiar", 0.0)])}
    table = sel.abstention_table(policies, correct, {"confidence": confidence, "familiar": familiar})
    assert list(table["name"]) == ["confident", "both"] and "domain" not in table.columns
    assert table.loc[0, "coverage"] == pytest.approx(4 / 6) and table.loc[0, "accuracy_predicted"] == pytest.approx(0.75)
    assert table.loc[1, "coverage"] == pytest.approx(3 / 6) and table.loc[1, "accuracy_predicted"] == pytest.approx(2 / 3)
    assert table.loc[1, "policy"] == "confidence >= 0.5 and familiar >= 0"
    domain = np.array(["prose"] * 3 + ["code"] * 3)
    split = sel.abstention_table(policies, correct, {"confidence": confidence, "familiar": familiar}, domain=domain)
    assert list(split["domain"]) == ["prose", "code", "all"] * 2
    code = split[(split["name"] == "both") & (split["domain"] == "code")].iloc[0]
    assert code["coverage"] == 0.0 and code["accuracy_abstained"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="familiar"):
        sel.abstention_table(policies, correct, {"confidence": confidence})
    with pytest.raises(ValueError, match="domain has 2 entries|correct has 6 entries but domain has 2"):
        sel.abstention_table(policies, correct, {"confidence": confidence, "familiar": familiar}, domain=["a", "b"])
    with pytest.raises(ValueError, match="expected an AbstentionPolicy"):
        sel.abstention_table({"x": 0.5}, correct, {"confidence": confidence})


def test_sequence_scores_match_a_direct_forward_pass(tiny_pair, windows):
    model = tiny_pair[0]
    frame = sel.sequence_scores(model, windows, batch_size=4)
    with torch.no_grad():
        logits = model(windows)[:, :-1].double()
    log_p = logits.log_softmax(-1)
    np.testing.assert_allclose(frame["msp"], log_p.exp().max(-1).values.mean(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(frame["energy"], torch.logsumexp(logits, -1).mean(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(frame["log_prob"], log_p.gather(-1, windows[:, 1:, None])[..., 0].mean(1).numpy(),
                               rtol=1e-5)


def test_ood_scores_fit_mahalanobis_on_the_fit_set_only(tiny_pair):
    model = tiny_pair[0]
    prose = il.data.text_windows(model, il.data.load_corpus("validation"), window_len=16, n_windows=60)
    code = il.data.text_windows(model, il.data.load_corpus("code"), window_len=16, n_windows=10)
    frames = sel.ood_scores(model, prose[:40], {"in": prose[40:], "out": code}, layer=0, batch_size=7)
    assert list(frames) == ["in", "out"] and len(frames["in"]) == 20 and len(frames["out"]) == 10
    assert list(frames["in"].columns) == ["msp", "energy", "log_prob", "mahalanobis"]
    scorer = sel.MahalanobisScorer(class_conditional=False).fit(sel.residual_features(model, prose[:40], layer=0))
    np.testing.assert_allclose(frames["out"]["mahalanobis"], scorer.score(sel.residual_features(model, code, layer=0)),
                               rtol=1e-6)
    pd.testing.assert_frame_equal(frames["in"].drop(columns="mahalanobis"), sel.sequence_scores(model, prose[40:]))
    with pytest.raises(ValueError, match="layer=2"):
        sel.ood_scores(model, prose[:40], {"in": prose[40:]}, layer=2)
    with pytest.raises(ValueError, match="non-empty mapping"):
        sel.ood_scores(model, prose[:40], {})


def test_resolve_ensemble_members(monkeypatch, tmp_path):
    import os

    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delenv("INTERP_LIB_ENSEMBLE", raising=False)
    assert sel.resolve_ensemble_members("auto") == ["toy-lm"]  # no honest offline ensemble is bundled
    monkeypatch.setenv("INTERP_LIB_ENSEMBLE", os.pathsep.join([str(tmp_path / "seed1"), str(tmp_path / "seed2")]))
    assert sel.resolve_ensemble_members() == ["toy-lm", str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20260101")
    assert sel.resolve_ensemble_members() == ["gpt2", "distilgpt2"]
    assert sel.resolve_ensemble_members(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="ensemble="):
        sel.resolve_ensemble_members([])
