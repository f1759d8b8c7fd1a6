"""Each claim's operationalisation on a planted case where it is true by construction and one
where it is false (synthetic predictions / scores, or the bundled toy models whose truth is known)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from interp_lib import calibration as cal
from interp_lib import claims


def predictions(model_logits: np.ndarray, labels: np.ndarray, per_group: int = 25) -> cal.Predictions:
    z = torch.from_numpy(model_logits).float()
    probs = z.double().softmax(1)
    prediction = probs.argmax(1).numpy()
    return cal.Predictions(prediction=prediction, confidence=probs.max(1).values.numpy(),
                           group=np.arange(len(labels)) // per_group, labels=labels, correct=prediction == labels,
                           nll=-probs.log()[np.arange(len(labels)), labels].numpy(), logits=z)


def skewed_task(n: int, seed: int):
    """True logits with a skewed class prior; labels drawn from them (so they are calibrated)."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
    z = np.log(prior) + rng.normal(0, 1.5, (n, len(prior)))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (rng.random((n, 1)) > np.cumsum(p, 1)).sum(1)
    return z, labels


def overconfident_on_rare(z: np.ndarray) -> np.ndarray:
    """Over-confident everywhere (logits x 2.5), most of all when predicting a rare class."""
    logits = 2.5 * z
    top = logits.argmax(1)
    rare = top >= 6
    logits[np.flatnonzero(rare), top[rare]] += 4.0
    return logits


def test_claim1_supported_when_scaling_fixes_overconfidence_on_rare_classes():
    (zv, yv), (zt, yt) = skewed_task(6000, 0), skewed_task(6000, 1)
    result = claims.claim1_temperature_scaling(predictions(overconfident_on_rare(zv), yv),
                                               predictions(overconfident_on_rare(zt), yt), n_boot=100)
    assert result.verdict == "supported", result.reason
    assert result.measured > 0.15 and result.ci[0] > 0 and result.details["rare_gap_ci"][0] > 0
    assert result.details["temperature"] > 1.5


def test_claim1_not_supported_on_a_calibrated_model():
    (zv, yv), (zt, yt) = skewed_task(6000, 0), skewed_task(6000, 1)
    result = claims.claim1_temperature_scaling(predictions(zv, yv), predictions(zt, yt), n_boot=100)
    assert result.verdict == "not supported"
    assert result.measured < 0.15 or result.ci[0] <= 0
    assert abs(result.details["temperature"] - 1) < 0.1
    # calibrated: no over-confidence gap on the rare predicted classes either
    assert result.details["rare_gap_ci"][0] <= 0 <= result.details["rare_gap_ci"][1] + 0.02


def test_claim2_selective_prediction():
    rng = np.random.default_rng(0)
    n = 5000
    confidence = rng.random(n)
    groups = np.arange(n) // 20
    informative = rng.random(n) < np.where(confidence < 0.12, 0.1, 0.97)
    result = claims.claim2_selective_prediction(confidence, informative, groups, n_boot=100)
    assert result.verdict == "supported", result.reason
    assert result.claimed == pytest.approx(1 - 8 / 18)
    assert result.details["error_retained"] == pytest.approx(0.03, abs=0.01)
    uninformative = rng.random(n) < 0.8
    result = claims.claim2_selective_prediction(confidence, uninformative, groups, n_boot=100)
    assert result.verdict == "not supported" and result.ci[0] < 0.15


def profile(peak: int, n_streams: int = 13, height: float = 0.3) -> pd.DataFrame:
    selectivity = height * np.exp(-0.5 * (np.arange(n_streams) - peak) ** 2)
    return pd.DataFrame({"layer": np.arange(n_streams), "selectivity": selectivity})


def test_claim3_depth_specialisation():
    result = claims.claim3_depth_specialisation(profile(2), profile(10), 12)
    assert result.verdict == "supported" and result.measured == pytest.approx(8 / 12)
    assert claims.claim3_depth_specialisation(profile(10), profile(2), 12).verdict == "not supported"
    assert claims.claim3_depth_specialisation(profile(2), profile(10, height=0.01), 12).verdict == "not supported"
    with pytest.raises(ValueError, match="selectivity"):
        claims.claim3_depth_specialisation(pd.DataFrame({"layer": [0]}), profile(1), 12)


def test_claim3_function_word_labels_on_a_real_tokenizer(toy_lm):
    tokens = toy_lm.to_tokens("The function returns a list of the values")
    labels = claims.function_word_labels(toy_lm, tokens)[0]
    words = [toy_lm.tokenizer.decode([t]).strip() for t in tokens[0].tolist()]
    by_word = dict(zip(words[1:], labels[1:].tolist()))
    assert by_word["a"] == 1 and by_word["of"] == 1 and by_word["the"] == 1
    assert by_word["function"] == 0 and by_word["values"] == 0
    assert labels[0] == -1


def test_claim4_named_heads():
    assert claims.claim4_named_heads("toy-2l").verdict == "not testable"
    scores = np.random.default_rng(0).normal(1.0, 0.05, (12, 12))
    scores[9, 6] = 3.0
    result = claims.claim4_named_heads("gpt2", scores)
    # the 9.6 part passes, but 10.2 and transfer cannot be checked: the claim as a whole is not testable
    assert result.verdict == "not testable" and result.details["rank"] == 1 and result.details["p_value"] < 0.05
    scores[9, 6] = 1.0
    assert claims.claim4_named_heads("gpt2", scores).verdict == "not supported"


def test_head_token_enrichment_on_planted_patterns():
    n_pos = 6
    mask = np.zeros((1, n_pos), dtype=bool)
    mask[0, [1, 3]] = True
    causal = torch.tril(torch.ones(n_pos, n_pos))
    uniform = causal / causal.sum(1, keepdim=True)
    onto_marked = torch.zeros(n_pos, n_pos)
    for q in range(n_pos):
        keys = [k for k in (1, 3) if k <= q]
        if keys:
            onto_marked[q, keys] = 1 / len(keys)
        else:
            onto_marked[q, 0] = 1.0
    patterns = torch.stack([uniform, onto_marked])[None, None]  # [layer, batch, head, q, k]
    enrichment = claims.head_token_enrichment(patterns, mask)
    assert enrichment[0, 0] == pytest.approx(1.0)
    # queries 1..5 see marked keys; all attention on them: ratio = 1 / marked fraction
    expected = np.mean([(q + 1) / len([k for k in (1, 3) if k <= q]) for q in range(1, n_pos)])
    assert enrichment[0, 1] == pytest.approx(expected)


def test_proper_noun_mask_on_a_real_tokenizer(toy_lm):
    tokens = toy_lm.to_tokens("The server in Paris. The client uses Python")
    mask = claims.proper_noun_mask(toy_lm, tokens)[0]
    pieces = [toy_lm.tokenizer.decode([t]) for t in tokens[0].tolist()]
    marked = {pieces[i].strip() for i in np.flatnonzero(mask)}
    assert "The" not in marked  # sentence openers are not proper nouns
    assert any(word.startswith("P") for word in marked)


def test_claim5_few_heads_planted_losses():
    rng = np.random.default_rng(0)
    clean = 2 + rng.normal(0, 0.05, 40)
    everything = clean + 2 + rng.normal(0, 0.1, 40)
    carried = clean + 0.8 * (everything - clean)
    null = rng.uniform(0.0, 0.2, 50)
    result = claims.claim5_few_heads(clean, carried, everything, null_fractions=null, k=8, n_heads_total=144,
                                     n_boot=100)
    assert result.verdict == "supported" and result.measured == pytest.approx(0.8, abs=0.02)
    weak = clean + 0.2 * (everything - clean)
    assert claims.claim5_few_heads(clean, weak, everything, null_fractions=null, k=8, n_heads_total=144,
                                   n_boot=100).verdict == "not supported"
    # a large share that random head sets reach too is not support
    assert claims.claim5_few_heads(clean, carried, everything, null_fractions=rng.uniform(0.7, 0.9, 50), k=8,
                                   n_heads_total=144, n_boot=100).verdict == "not supported"
    assert claims.claim5_few_heads(clean, carried, everything, k=8, n_heads_total=8).verdict == "not testable"


def test_claim5_on_toy_2l_with_its_known_circuit(toy_2l):
    """toy-2l's in-context copying runs through L0H2 (previous token) and L1H0-L1H2 (induction):
    on repeated random tokens those four heads carry nearly all of the loss increase from
    ablating every head; the other four heads carry little. (Any set holding L0H2 breaks the
    circuit, so random 4-head sets reach it half the time: shares are not additive.)"""
    fit = claims._task_tokens(toy_2l, "toy-2l", "", 8, 32, seed=0)
    held = claims._task_tokens(toy_2l, "toy-2l", "", 8, 32, seed=1)
    circuit = [(0, 2), (1, 0), (1, 1), (1, 2)]
    data = claims.measure_few_heads(toy_2l, fit, held, n_perm=6, seed=0, heads=circuit)
    result = claims.claim5_few_heads(data["clean_loss"], data["top_loss"], data["all_loss"],
                                     null_fractions=data["null_fractions"], k=4, n_heads_total=8, n_boot=100,
                                     claimed=0.5)
    assert result.measured > 0.9 and result.ci[0] > 0.5, result.reason
    assert len(data["null_fractions"]) == 6
    others = [(0, 0), (0, 1), (0, 3), (1, 3)]
    data = claims.measure_few_heads(toy_2l, fit, held, n_perm=6, seed=0, heads=others)
    result = claims.claim5_few_heads(data["clean_loss"], data["top_loss"], data["all_loss"],
                                     null_fractions=data["null_fractions"], k=4, n_heads_total=8, n_boot=100,
                                     claimed=0.5)
    assert result.verdict == "not supported" and result.measured < 0.5, result.reason


def test_claim6_reproducibility():
    rng = np.random.default_rng(0)
    stable = pd.DataFrame({"accuracy": 0.4 * (1 + rng.normal(0, 0.005, 10)), "nll": 3 * (1 + rng.normal(0, 0.003, 10))})
    result = claims.claim6_reproducibility(stable, n_boot=100)
    assert result.verdict == "supported" and result.measured < 0.02
    noisy = stable.assign(ece=0.05 * (1 + rng.normal(0, 0.2, 10)))
    result = claims.claim6_reproducibility(noisy, n_boot=100)
    assert result.verdict == "not supported" and "ece" in result.reason and result.measured > 0.05
    assert claims.claim6_reproducibility(stable.head(5)).verdict == "not testable"


def test_claim7_position_probe():
    table = pd.DataFrame({"layer": [0, 1, 2], "accuracy": [0.6, 0.98, 0.8], "control_accuracy": [0.05, 0.05, 0.05]})
    correct = np.random.default_rng(0).random(3000) < 0.98
    groups = np.arange(3000) // 30
    result = claims.claim7_position_probe(table, correct, groups, 2, in_domain=0.98, cross_domain=0.96, n_boot=100)
    assert result.verdict == "supported", result.reason
    at_embeddings = table.assign(accuracy=[0.99, 0.98, 0.8])
    assert claims.claim7_position_probe(at_embeddings, correct, groups, 2, 0.98, 0.96,
                                        n_boot=100).verdict == "not supported"
    assert claims.claim7_position_probe(table, correct, groups, 2, 0.98, 0.7, n_boot=100).verdict == "not supported"
    weak = np.random.default_rng(1).random(3000) < 0.7
    assert claims.claim7_position_probe(table, weak, groups, 2, 0.98, 0.96, n_boot=100).verdict == "not supported"

    # "best at intermediate layers" tested: stream 1 against both ends, paired per sequence, Holm
    rng = np.random.default_rng(2)
    streams = {0: rng.random(3000) < 0.6, 1: correct, 2: rng.random(3000) < 0.8}
    tested = claims.claim7_position_probe(table, correct, groups, 2, 0.98, 0.96, n_boot=100, stream_correct=streams)
    assert tested.verdict == "supported" and tested.details["intermediate_stream"] == 1
    assert max(tested.details["holm_p"].values()) < 1e-6 and "Holm-adjusted" in tested.reason
    # the last stream as good as the middle one: not "best at intermediate layers", whatever the point estimate
    tie = {**streams, 2: np.random.default_rng(3).random(3000) < 0.98}
    result = claims.claim7_position_probe(table, correct, groups, 2, 0.98, 0.96, n_boot=100, stream_correct=tie)
    assert result.verdict == "not supported" and result.details["holm_p"]["1 > 2"] > 0.05
    # the adjustment is Holm's over the two raw one-sided paired t-tests (oracle: scipy + the formula)
    from scipy import stats as scipy_stats

    per_seq = {k: np.bincount(groups, weights=v.astype(float)) / 30 for k, v in tie.items()}
    raw = [scipy_stats.ttest_1samp(per_seq[1] - per_seq[k], 0, alternative="greater").pvalue for k in (0, 2)]
    order = np.argsort(raw)
    expected = np.empty(2)
    expected[order] = np.maximum.accumulate(np.minimum(1, (2 - np.arange(2)) * np.sort(raw)))
    assert [result.details["holm_p"]["1 > 0"], result.details["holm_p"]["1 > 2"]] == pytest.approx(expected)


def test_claim8_against_toy_2l_truth(toy_2l):
    import interp_lib as il

    detection = il.heads.detect_heads(toy_2l, "induction", n_sequences=8)
    truth = il.heads.known_heads("toy-2l", "induction")
    result = claims.claim8_induction_detection("toy-2l", detection, truth)
    assert result.verdict == "supported" and result.measured == 1.0
    # a detector that returned the previous-token head instead is wrong
    assert claims.claim8_induction_detection("toy-2l", [(0, 2, 0.9)], truth).verdict == "not supported"
    assert claims.claim8_induction_detection("smollm2-135m", detection).verdict == "not testable"
    published = claims.PUBLISHED_INDUCTION_HEADS
    assert claims.claim8_induction_detection("gpt2", [(*h, 0.5) for h in published]).verdict == "supported"
    assert claims.claim8_induction_detection("gpt2", [(5, 1, 0.5)]).verdict == "not supported"  # recall 0.2
    # existence under multiple-comparison control: the FDR-controlled per-head test must agree
    tests = il.heads.induction_pvalues(toy_2l, n_sequences=16)
    tested = claims.claim8_induction_detection("toy-2l", detection, truth, tests=tests)
    assert tested.verdict == "supported" and tested.details["significant"] == ["L1H0", "L1H1", "L1H2"]
    assert tested.details["tested_recall"] == 1.0 and "Benjamini-Hochberg over 8 heads" in tested.reason
    nothing = tests.assign(significant=False)
    assert claims.claim8_induction_detection("toy-2l", detection, truth, tests=nothing).verdict == "not supported"


def test_claim9_explainer_comparison(monkeypatch):
    rng = np.random.default_rng(0)
    heads = [(layer, head) for layer in range(12) for head in range(12)]
    weak = {h: 0.2 + 0.02 * h[0] + rng.normal(0, 0.05) for h in heads}
    strong = {h: 2 * weak[h] for h in heads}
    families = {h: (-1 if i % 3 == 0 else i % 5) for i, h in enumerate(heads)}
    result = claims.claim9_explainer_comparison(weak, strong, families, n_boot=100)
    assert result.verdict == "supported" and result.measured == pytest.approx(2.0)
    same = {h: weak[h] + rng.normal(0, 0.01) for h in heads}
    assert claims.claim9_explainer_comparison(weak, same, families, n_boot=100).verdict == "not supported"
    none_clustered = {h: 0 for h in heads}
    assert claims.claim9_explainer_comparison(weak, strong, none_clustered, n_boot=100).verdict == "not supported"
    offline = claims.claim9_explainer_comparison(dry_run={"calls": 120, "estimated_cost_usd": 0.5})
    assert offline.verdict == "not testable" and "120 requests" in offline.reason and "$0.50" in offline.reason
    monkeypatch.delenv("INTERP_LIB_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert not claims.llm_endpoint_configured(None)
    assert claims.llm_endpoint_configured("http://127.0.0.1:8000/v1")
    monkeypatch.setenv("INTERP_LIB_API_KEY", "x")
    assert claims.llm_endpoint_configured(None)


def test_results_round_trip_and_tabulate():
    result = claims.claim6_reproducibility(pd.DataFrame({"a": np.linspace(1, 1.01, 10)}), n_boot=50)
    again = claims.ClaimResult.from_dict(result.to_dict())
    assert again == result
    untestable = claims.claim4_named_heads("toy-2l")
    table = claims.verdict_table([result, untestable])
    assert list(table.index) == [6, 4] and math.isnan(table.loc[4, "measured"])
    metrics = claims.claims_metrics([result, untestable])
    assert metrics["claim6_supported"] == 1.0 and "claim4_supported" not in metrics
    assert metrics["n_not_testable"] == 1.0 and metrics["n_supported"] == 1.0
    with pytest.raises(ValueError, match="verdict="):
        claims.ClaimResult(1, "x", "m", None, None, None, "maybe", "")


def test_measure_reproducibility_resamples_windows(toy_2l):
    pool = claims._task_tokens(toy_2l, "toy-2l", "", 24, 32, seed=0)
    frame = claims.measure_reproducibility(toy_2l, pool, n_runs=3, n_windows=6)
    assert list(frame.columns) == ["accuracy", "nll", "ece"] and len(frame) == 3
    assert frame["nll"].nunique() == 3  # different windows per run
    # BOS + S + S with |S| = 15: 30 predictions, of which only the 14 inside the second copy
    # can be right beyond chance (1/512); toy-2l copies most of them
    assert 0.25 < frame["accuracy"].mean() <= 14 / 30 + 0.02
    with pytest.raises(ValueError, match="pool holds only"):
        claims.measure_reproducibility(toy_2l, pool, n_windows=25)


def stand_in_llm(body: dict) -> str:
    """A deterministic stand-in LLM following each prompt's answer format; its answers do not
    depend on the model name, so two 'explainers' served by it are equally strong."""
    from interp_lib.explain.prompts import EXPLAIN_SYSTEM, SIMULATE_SYSTEM

    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if system == EXPLAIN_SYSTEM:
        return json.dumps({"explanation": "Attends from a token to the token right before it.",
                           "attends_from": "every token", "attends_to": "the previous token",
                           "positive_examples": ["the cat sat"], "negative_examples": ["a"]})
    if system == SIMULATE_SYSTEM:
        n = int(re.search(r"Give the (\d+) activations", user).group(1))
        words = user.split()
        return json.dumps({"activations": [len(words[-1 - i]) % 11 if i < len(words) else 0 for i in range(n)]})
    return "Previous-token heads"


def test_claim9_runs_both_explainers_against_a_local_endpoint(toy_2l, make_server, tmp_path, monkeypatch):
    """With an endpoint configured (a real local OpenAI-compatible server) the comparison runs
    both explainers on the same events and gets a simulation score per head and families; the
    verdict is decided. The server answers alike for both model names: ratio 1, not supported."""
    monkeypatch.setenv("INTERP_LIB_API_KEY", "local-test-key")
    server = make_server(responder=stand_in_llm)
    data = claims.measure_explainer_comparison(toy_2l, "toy-2l", tmp_path / "explain", explainers=("small", "large"),
                                               base_url=server.url, windows=8, embedding="tfidf")
    assert set(data) == {"weak_scores", "strong_scores", "families"}
    assert len(data["weak_scores"]) == 8 and data["weak_scores"] == data["strong_scores"]
    assert server.n_requests > 0 and len(data["families"]) == 8
    result = claims.claim9_explainer_comparison(data["weak_scores"], data["strong_scores"], data["families"],
                                                n_boot=50)
    assert result.verdict == "not supported", result.reason
    assert result.measured is None or result.measured == pytest.approx(1.0)


def test_claims_table_names_the_deciding_subtest_and_the_forest_plot_shows_every_number():
    """Issue 26: claimed, measured with interval, the sub-test that decided and the verdict in one
    row; the failing sub-test of a 'not supported' claim is in the row, not only in the text."""
    from interp_lib import findings, plots

    (zv, yv), (zt, yt) = skewed_task(6000, 0), skewed_task(6000, 1)
    calibrated = claims.claim1_temperature_scaling(predictions(zv, yv), predictions(zt, yt), n_boot=100)
    rng = np.random.default_rng(0)
    clean = 2 + rng.normal(0, 0.05, 40)
    everything = clean + 2 + rng.normal(0, 0.1, 40)
    carried = clean + 0.8 * (everything - clean)
    # 8 heads, one ablated: 8 possible one-head sets, the smallest p is 1/8 = 0.125 > alpha
    # every one-head set scored, the top one included (as measure_few_heads enumerates a small model)
    top_share = float((carried - clean).mean() / (everything - clean).mean())
    few = claims.claim5_few_heads(clean, carried, everything, null_fractions=[*np.linspace(0, 0.3, 7), top_share],
                                  k=1, n_heads_total=8, n_boot=100)
    stable = pd.DataFrame({"accuracy": 0.4 * (1 + rng.normal(0, 0.2, 10))})
    noisy = claims.claim6_reproducibility(stable, n_boot=100)
    results = [calibrated, few, noisy, claims.claim4_named_heads("toy-2l")]
    table = claims.claims_table(results)
    assert list(table.columns) == ["metric", "claimed", "measured", "ci_low", "ci_high", "decided_by", "verdict"]
    failing = [t["test"] for t in calibrated.details["subtests"] if not t["passed"]]
    assert calibrated.verdict == "not supported" and failing
    assert table.loc[1, "decided_by"] == "failed: " + "; ".join(failing)
    assert f"{calibrated.measured:.1%}" in table.loc[1, "decided_by"] or calibrated.measured >= 0.15
    assert few.verdict == "supported" and few.details["p_value"] == pytest.approx(0.125)
    assert "the smallest p possible is 1/8 = 0.125" in few.reason
    assert table.loc[5, "decided_by"].startswith("passed: share 80") and "the smallest possible with 8 sets" in \
        table.loc[5, "decided_by"]
    assert table.loc[6, "decided_by"] == f"failed: largest CV (accuracy) {noisy.measured:.2%} < 2%"
    assert table.loc[4, "verdict"] == "not testable" and table.loc[4, "decided_by"] == results[3].reason
    assert (table["measured"].iloc[:3].to_numpy() == [r.measured for r in results[:3]]).all()
    text = findings.claim_verdicts(table)
    assert text.startswith("1 of 4 claims are supported (5), 2 not supported (1, 6) and 1 not testable")
    assert f"Claim 1 fails: {'; '.join(failing)}." in text and "Claim 6 fails: largest CV" in text
    fig = plots.claims_forest(table)
    measured = {y: x for trace in fig.data if trace.name.startswith("measured") for x, y in zip(trace.x, trace.y)}
    claimed = {y: x for trace in fig.data if trace.name == "claimed" for x, y in zip(trace.x, trace.y)}
    assert len(measured) == 3 and "nothing measured for claim 4" in fig.layout.title.text
    for claim_id in (1, 5, 6):
        label = next(y for y in measured if y.startswith(f"{claim_id}."))
        assert measured[label] == pytest.approx(table.loc[claim_id, "measured"])
        assert claimed[label] == pytest.approx(table.loc[claim_id, "claimed"])
    red = next(t for t in fig.data if t.name == "measured (not supported)")
    label_1 = next(i for i, y in enumerate(red.y) if y.startswith("1."))
    assert red.error_x.arrayminus[label_1] == pytest.approx(table.loc[1, "measured"] - table.loc[1, "ci_low"])
