"""The explainer on MLP neurons: a neuron planted in toy-lm to fire on one token is found,
named, scored and ablated by the same stages that explain heads; and a neuron run of
``interp-lib explain`` end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from interp_lib.cli import main as cli_main
from interp_lib.explain.config import ExplainConfig
from interp_lib.explain.events import collect_events, neuron_activation, sample_windows
from interp_lib.explain.heuristic import neuron_heuristic_explanations
from interp_lib.explain.pipeline import causal_effects, select_neurons
from interp_lib.explain.records import load_records
from interp_lib.explain.scoring import ContrastiveScorer, ScoringItem
from interp_lib.explain.viewer import DATA_ELEMENT_ID, read_ratings
from interp_lib.units import Head, Neuron

LAYER, INDEX, WORD = 0, 17, " the"
PUSHED = " zebra"  # the token the planted neuron's output pushes: never the next token here


@pytest.fixture(scope="module")
def planted():
    """A fresh toy-lm (the session model stays untouched) whose neuron L0N17 fires on " the" only.

    Input weights: the direction separating the MLP input (after ln2) at " the" from every other
    position, with the bias halfway between the two groups, scaled so the neuron's pre-activation
    is about +30 at " the" (far from zero on both sides: GELU is ~0 below -4). Output weights: a push on the unembedding of " zebra" (a wrong next
    token), so ablating the neuron must lower the loss where it fires and change nothing where
    it is off."""
    import interp_lib as il

    model = il.load_model("toy-lm", device="cpu")
    model.eval()
    windows = sample_windows(model, "bundled", 32, 32, seed=0)
    word = model.tokenizer.encode(WORD)[-1]
    pushed = model.tokenizer.encode(PUSHED)[-1]
    name = f"blocks.{LAYER}.mlp.hook_in"
    mlp = model.blocks[LAYER].mlp._original_component
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=lambda n: n == name)
        x = cache[name][:, 1:].reshape(-1, model.cfg.d_model)
        at_word = (windows[:, 1:] == word).reshape(-1)
        direction = x[at_word].mean(0) - x[~at_word].mean(0)
        s = x @ direction
        threshold = (s[at_word].min() + s[~at_word].max()) / 2
        scale = 30.0 / (s[at_word].mean() - threshold)
        mlp.c_fc._original_component.weight[:, INDEX] = scale * direction
        mlp.c_fc._original_component.bias[INDEX] = -scale * threshold
        unembed = model.W_U[:, pushed].float()
        mlp.c_proj._original_component.weight[INDEX] = 0.5 * unembed / unembed.norm()
    return model, windows, word


def test_planted_neuron_is_found_named_scored_and_ablated(planted):
    model, windows, word = planted
    # the planted truth, read from the model: on at " the", off everywhere else
    post = neuron_activation(model, windows, [Neuron(LAYER, INDEX)])[Neuron(LAYER, INDEX)][:, 1:]
    at_word = windows[:, 1:] == word
    assert int(at_word.sum()) >= 20
    assert post[at_word].min() > 2 and post[~at_word].abs().max() < 0.01

    events = collect_events(model, windows, [Neuron(LAYER, INDEX)], top_k=8, n_random=8, n_quantile=4,
                            batch_size=8, seed=0, progress=False)
    assert events.unit_kind == "neuron" and events.salience == "activation"
    assert events.units() == [Neuron(LAYER, INDEX)]
    top = events.top[Neuron(LAYER, INDEX)]
    # the oracle: the largest activations over the windows (BOS excluded), in order
    expected = torch.sort(post.reshape(-1), descending=True).values[:8]
    assert np.allclose([e.activation for e in top], expected.numpy(), atol=1e-5)
    assert all(e.query_token == WORD and e.attended == [] and e.label == "L0N17" for e in top)
    stats = events.activation_stats[Neuron(LAYER, INDEX)]
    assert stats["mean"] == pytest.approx(float(post.double().mean()), abs=1e-5)

    explanations, frame = neuron_heuristic_explanations(events)
    explanation = explanations[Neuron(LAYER, INDEX)]
    assert explanation.text.startswith(f"Fires on the token {WORD!r} (8 of its 8 top events")
    row = frame.iloc[0]
    assert (row["unit"], row["kind"], row["top_token"], row["confidence"]) == ("L0N17", "neuron", WORD, 1.0)
    assert explanation.positive_examples and all(p.endswith(WORD) for p in explanation.positive_examples)
    assert explanation.negative_examples and not any(WORD in n for n in explanation.negative_examples)

    # the contrastive scorer reads the neuron's activation on the explanation's own examples
    result = ContrastiveScorer(model).score_many([ScoringItem(LAYER, INDEX, explanation, [], unit_kind="neuron")])[0]
    assert result.score > 2 and result.details["mean_negative"] == pytest.approx(0.0, abs=1e-3)
    # a head with the same numbers is another unit: the same texts say nothing about it
    head = ContrastiveScorer(model).score_many([ScoringItem(LAYER, 1, explanation, [])])[0]
    assert head.score != result.score

    # ablating it: lower loss where it fires (it pushes a wrong token), no change where it is off
    chosen = events.events(LAYER, INDEX, kinds=("top", "random"))
    effect = causal_effects(model, windows, {Neuron(LAYER, INDEX): chosen}, progress=False)[Neuron(LAYER, INDEX)]
    tokens = windows
    with torch.no_grad():
        def zero(act, hook):
            act[:, :, INDEX] = 0.0
            return act

        clean = _loss(model(tokens), tokens)
        ablated = _loss(model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mlp.hook_post", zero)]), tokens)
    delta = ablated - clean
    top_pairs = [(e.window, e.position) for e in top if e.position < windows.shape[1] - 1]
    assert effect["n_top"] == len(top_pairs)
    assert effect["top"] == pytest.approx(float(np.mean([delta[w, p] for w, p in top_pairs])), abs=1e-4)
    assert effect["top"] < -0.5
    # where the neuron has not fired yet in a window (no " the" up to the position), nothing changes
    seen = torch.cumsum((windows == word).long(), dim=1)[:, :-1] > 0      # [window, pos-1]
    assert (~seen).sum() > 100 and delta[~seen].abs().max() < 1e-3


def _loss(logits, tokens):
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]


def test_neuron_selection_budget_and_bad_input(toy_lm):
    auto = select_neurons(toy_lm, "auto", budget=10, seed=0)
    assert len(auto) == 10 and all(isinstance(u, Neuron) for u in auto)
    per_layer = [sum(u.layer == layer for u in auto) for layer in range(toy_lm.cfg.n_layers)]
    assert per_layer == [3, 3, 2, 2]
    assert select_neurons(toy_lm, "auto", budget=10, seed=0) == auto
    assert select_neurons(toy_lm, "auto", budget=10, seed=1) != auto
    assert select_neurons(toy_lm, "l1n5,L0N3") == [Neuron(0, 3), Neuron(1, 5)]
    assert len(select_neurons(toy_lm, "all")) == toy_lm.cfg.n_layers * toy_lm.cfg.d_mlp
    with pytest.raises(ValueError, match=r"neuron L0N9999 .* out of range"):
        select_neurons(toy_lm, "L0N9999")
    with pytest.raises(ValueError, match="names a head"):
        select_neurons(toy_lm, "L0H1")
    with pytest.raises(ValueError, match="units='cells'"):
        ExplainConfig(units="cells")
    with pytest.raises(ValueError, match="neuron label 'L0X1'"):
        ExplainConfig(units="neurons", neurons="L0X1")
    with pytest.raises(ValueError, match="neuron_budget=0"):
        ExplainConfig(units="neurons", neuron_budget=0)


def test_neuron_run_end_to_end_through_the_cli(tmp_path, capsys, toy_lm):
    out = tmp_path / "neurons"
    args = ["explain", "--model", "toy-lm", "--units", "neurons", "--neuron-budget", "4", "--out", str(out),
            "--no-progress", "--windows", "16", "--window-len", "24", "--top-k", "6", "--n-random", "4",
            "--n-quantile", "2", "--batch-size", "8", "--embedding", "tfidf", "--min-cluster-size", "2"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "[events] running" in printed
    records, meta = load_records(out / "records.json")
    expected = select_neurons(toy_lm, "auto", budget=4, seed=0)
    assert [r.unit for r in records] == expected
    assert all(r.unit_kind == "neuron" and r.explanation.text.startswith("Fires on") for r in records)
    assert all(r.scores["contrastive"].score is not None and r.causal_effect is not None for r in records)
    assert all(r.top_events and r.top_events[0].unit_kind == "neuron" for r in records)
    assert all("confidence" in r.stats for r in records)
    assert all(r.family is not None for r in records)  # the taxonomy ran on the neuron records
    report = (out / "report.md").read_text()
    assert report.startswith("# Neuron explainer report") and f"### {records[0].label}" in report
    assert "4 of 4 neurons explained" in report
    page = (out / "viewer.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="%s">(.*?)</script>' % DATA_ELEMENT_ID,
                                page, re.S).group(1))
    # the grid: one row per layer, a neuron's column is its rank among its layer's explained ones
    assert data["column_prefix"] == "#" and data["n_heads"] == 1
    assert [h["label"] for h in data["heads"]] == [r.label for r in records]
    assert data["columns"] == {r.label: 0 for r in records}
    config = json.loads((out / "config.json").read_text())
    assert config["units"] == "neurons" and config["neuron_budget"] == 4

    assert cli_main(args) == 0  # every stage loads
    printed = capsys.readouterr().out
    assert "running" not in printed and printed.count("loaded") >= 8
    assert [r.to_dict() for r in load_records(out / "records.json")[0]] == [r.to_dict() for r in records]

    # ratings name neurons by their labels, in the same format as heads
    ratings = tmp_path / "ratings.json"
    ratings.write_text(json.dumps({"schema": 1, "run": "x", "ratings": [
        {"label": records[0].label.lower(), "rating": 4}, {"label": "L1H0", "rating": 2}]}))
    frame = read_ratings(ratings)
    assert list(frame["label"]) == [records[0].label, "L1H0"]
    assert Head(1, 0) != Neuron(1, 0)


def test_llm_run_on_the_planted_neuron_uses_neuron_prompts(planted, tmp_path, monkeypatch):
    """The LLM path for neurons against a real local OpenAI-compatible server: the explainer,
    simulator, detector and refiner get the neuron prompts (never the head ones); a stand-in LLM
    that says "fires on ' the'" is scored high by simulation and detection on held-out events."""
    from interp_lib.explain import prompts as P
    from interp_lib.explain.local_server import LocalOpenAIServer
    from interp_lib.explain.pipeline import run_explainer

    model, _, _ = planted
    seen: list[str] = []

    def responder(body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        seen.append(system)
        if system in (P.NEURON_EXPLAIN_SYSTEM, P.NEURON_REFINE_SYSTEM):
            assert user.startswith("MLP neuron L0N17.")
            return json.dumps({"explanation": "Fires on the word ' the'.",
                               "positive_examples": ["He saw the cat", "in the end"],
                               "negative_examples": ["He saw a cat", "in an end"]})
        if system == P.NEURON_SIMULATE_SYSTEM:
            tokens = re.findall(r"^\d+\t(.*)$", user, re.M)
            return json.dumps({"activations": [10 if t == WORD else 0 for t in tokens]})
        if system == P.NEURON_DETECT_SYSTEM:
            marked = re.findall(r"^(\d+)\. .*\[\[(.*)\]\]$", user, re.M)
            return json.dumps({"fires": [int(n) for n, t in marked if t == WORD]})
        return "not a neuron prompt"

    monkeypatch.setenv("INTERP_LIB_API_KEY", "sk-test-neurons")
    with LocalOpenAIServer(responder) as server:
        config = ExplainConfig(model="toy-lm", units="neurons", neurons="L0N17", windows=32, window_len=32,
                               top_k=8, n_random=8, n_quantile=4, batch_size=8, explainer="test-model",
                               base_url=server.url, refine_rounds=1, embedding="tfidf")
        run = run_explainer(config, tmp_path / "llm", model=model, progress=False)
    (record,) = run.records
    assert record.label == "L0N17" and record.explanation.source == "llm:test-model"
    assert record.explanation.text == "Fires on the word ' the'."
    assert record.heuristic.text.startswith(f"Fires on the token {WORD!r}")
    assert record.scores["simulation"].score > 0.5 and record.scores["detection"].score > 0.9
    assert record.scores["contrastive"].score > 0.5 and record.scores["baseline_contrastive"].score > 2
    assert record.scores["baseline_simulation"].score is not None
    assert record.refinement and record.causal_effect < -0.5
    assert seen and not {P.EXPLAIN_SYSTEM, P.SIMULATE_SYSTEM, P.DETECT_SYSTEM, P.REFINE_SYSTEM} & set(seen)
    assert {P.NEURON_EXPLAIN_SYSTEM, P.NEURON_SIMULATE_SYSTEM, P.NEURON_DETECT_SYSTEM} <= set(seen)
