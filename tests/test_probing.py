"""interp_lib.probing: position probes on held-out sequences, head classes, attribution methods.

Small sizes keep this file fast; the notebook 06 runs the larger versions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp_lib as il
from interp_lib import probing


@pytest.fixture(scope="module")
def windows(toy_lm):
    return il.data.text_windows(toy_lm, il.data.load_corpus("validation"), 24, 64, seed=0)


def test_split_is_by_sequence_and_disjoint():
    train, test = probing.split_sequences(40, 0.25, seed=0)
    assert len(test) == 10 and len(train) == 30
    assert not set(train) & set(test)


def test_shuffle_control_keeps_each_sequence_label_multiset():
    labels = probing.position_labels((5, 8))
    shuffled = probing.shuffle_within_sequence(labels, seed=0)
    assert (shuffled[:, 0] == probing.IGNORE).all()
    assert all(sorted(a) == sorted(b) for a, b in zip(labels, shuffled))
    assert (shuffled != labels).any()


def test_position_is_linearly_decodable_from_early_stream_above_control(toy_lm, windows):
    frame = probing.position_probe(toy_lm, windows, layers=[0, 1], probe="linear")
    chance = 1 / 23
    embed, layer0 = frame.iloc[0], frame.iloc[1]
    # held-out sequences only: 16 of 64 windows, every token of a window on one side
    assert embed["n_test"] == 16 * 23
    assert embed["accuracy"] > 0.6
    assert layer0["accuracy"] > 4 * chance
    assert (frame["control_accuracy"] < 2 * chance).all()
    assert (frame["selectivity"] > 2 * chance).all()


def test_regression_target_reports_r2_and_mae(toy_lm, windows):
    frame = probing.position_probe(toy_lm, windows, layers=[0], target="regression", control=None)
    assert {"r2", "mae"} <= set(frame.columns)
    assert frame["r2"].iloc[0] > 0.8 and frame["mae"].iloc[0] < 3


def test_generic_probe_and_cross_domain(toy_lm, windows):
    code = il.data.text_windows(toy_lm, il.data.load_corpus("code"), 24, 16, seed=0)
    frame = probing.cross_domain_probe(toy_lm, windows, code, layers=[0])
    assert frame["in_domain"].iloc[0] > 0.6 and frame["cross_domain"].iloc[0] > 0.3
    # generic probe: a per-token property (token is BOS-or-first-half), -1 skips tokens
    labels = (np.arange(24)[None].repeat(len(windows), 0) < 12).astype(int)
    labels[:, 0] = -1
    generic = probing.probe(toy_lm, windows, labels, layers=[0], control=None)
    assert generic["accuracy"].iloc[0] > 0.8


def test_head_classes_follow_the_documented_rule(toy_lm, windows):
    frame = probing.head_position_scores(toy_lm, windows[:16])
    assert len(frame) == toy_lm.cfg.n_layers * toy_lm.cfg.n_heads
    assert tuple(frame.columns[:4]) == il.units.UNIT_COLUMNS
    assert list(frame["unit"]) == [f"L{l}H{h}" for l in range(toy_lm.cfg.n_layers) for h in range(toy_lm.cfg.n_heads)]
    assert frame["position_score"].between(0, 1).all()
    expected = np.where(frame["position_score"] >= 0.8, "position",
                        np.where(frame["position_score"] <= 0.5, "content", "hybrid"))
    assert (frame["label"].to_numpy() == expected).all()


def test_head_ablation_importance_has_one_row_per_earlier_head(toy_lm, windows):
    frame = probing.head_ablation_importance(toy_lm, windows[:32], layer=1)
    assert list(frame["unit"]) == [f"L0H{h}" for h in range(toy_lm.cfg.n_heads)]
    assert tuple(frame.columns[:4]) == il.units.UNIT_COLUMNS
    assert list(frame["index"]) == list(range(toy_lm.cfg.n_heads))
    assert (frame["layer"] == 0).all() and (frame["kind"] == "head").all()
    assert np.allclose(frame["drop"], frame["clean_accuracy"] - frame["ablated_accuracy"])


def test_integrated_gradients_completeness(toy_lm, windows):
    result = probing.integrated_gradients(toy_lm, windows[0, :16], n_steps=16)
    difference = result.output - result.baseline_output
    assert abs(difference) > 0.1
    assert result.completeness_error < 1e-3 * max(1.0, abs(difference)), result
    assert result.attributions.shape == (16,)


def test_integrated_gradients_warns_when_its_budget_is_spent_and_reports_the_true_error(toy_lm, windows):
    # the smallest budget: 5 intervals x 2 nodes, nothing left to refine with
    with pytest.warns(probing.IGConvergenceWarning, match="completeness error"):
        result = probing.integrated_gradients(toy_lm, windows[0, :16], n_steps=2, max_steps=10,
                                              tolerance=1e-9)
    difference = result.output - result.baseline_output
    assert result.completeness_error == pytest.approx(abs(float(result.attributions.sum()) - difference), abs=1e-5)
    # with room to refine the same path integral closes
    refined = probing.integrated_gradients(toy_lm, windows[0, :16], n_steps=2, max_steps=400, tolerance=1e-4)
    assert refined.completeness_error < max(1e-3, result.completeness_error)
    assert refined.completeness_error < 1e-4 * max(1.0, abs(difference)) + 1e-5


def test_integrated_gradients_zero_keep_bos_baseline(toy_lm, windows):
    tokens = windows[0, :12]
    assert int(tokens[0]) == toy_lm.tokenizer.bos_token_id
    result = probing.integrated_gradients(toy_lm, tokens, baseline="zero_keep_bos")
    # oracle for the baseline's output: a plain forward with every token embedding zeroed but BOS
    def keep_bos(act, hook):
        act = act.clone()
        act[:, 1:] = 0
        return act
    with torch.no_grad():
        plain = toy_lm.run_with_hooks(tokens[None], fwd_hooks=[("hook_embed", keep_bos)])
    assert result.baseline_output == pytest.approx(float(plain[0, -1, result.target]), abs=1e-4)
    assert float(result.attributions[0]) == 0.0  # BOS does not move along the path
    assert result.completeness_error < 1e-3 * max(1.0, abs(result.output - result.baseline_output))


def test_attention_rollout_rows_are_distributions(toy_lm, windows):
    rollout = probing.attention_rollout(toy_lm, windows[0, :12])
    assert rollout.shape == (toy_lm.cfg.n_layers, 12, 12)
    assert torch.allclose(rollout.sum(-1), torch.ones(toy_lm.cfg.n_layers, 12), atol=1e-5)
    assert torch.all(rollout.triu(1) == 0)  # causal


def test_causal_tracing_full_restore_gives_clean_prediction(toy_lm, windows):
    trace = probing.causal_trace(toy_lm, windows[0, :12])
    assert trace.corrupted_prob < trace.clean_prob
    assert torch.allclose(trace.full_restore, torch.full_like(trace.full_restore, trace.clean_prob), atol=1e-5)
    assert trace.scores.shape == (toy_lm.cfg.n_layers + 1, 12)
    # restoring the last position of the final stream is the full clean state at the read-out
    assert abs(trace.scores[-1, -1] - trace.clean_prob) < 1e-5


def test_causal_trace_equals_plain_restore_hooks(toy_lm, windows):
    """The patching engine's sweep (KV-cache suffix passes, skipped no-op cells) against one plain
    forward pass per (stream, position) with the noise and the restore written out here."""
    tokens = windows[1:2, :10]
    trace = probing.causal_trace(toy_lm, tokens, noise_scale=2.0, seed=4)
    embed = toy_lm.run_with_cache(tokens, names_filter="hook_embed")[1]["hook_embed"]
    noise = torch.zeros_like(embed)
    noise[0, 1:] = torch.randn(9, embed.shape[-1], generator=torch.Generator().manual_seed(4)) * 2.0 * float(
        toy_lm.W_E.std().detach())
    n = toy_lm.cfg.n_layers
    names = [f"blocks.{s}.hook_resid_pre" for s in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = toy_lm.run_with_cache(tokens, names_filter=lambda name: name in names)

        def prob(name=None, positions=()):
            def restore(act, hook):
                act[:, positions] = cache[name][:, positions]
                return act

            def add_noise(act, hook):
                return act + noise

            hooks = [("hook_embed", add_noise)] + ([(name, restore)] if name else [])
            return float(toy_lm.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1].softmax(-1)[trace.target])

        assert trace.corrupted_prob == pytest.approx(prob(), abs=1e-5)
        for s, name in enumerate(names):
            assert trace.full_restore[s] == pytest.approx(prob(name, list(range(10))), abs=1e-5)
            for p in (0, 4, 9):
                assert trace.scores[s, p] == pytest.approx(prob(name, [p]), abs=1e-5)


@pytest.mark.parametrize("call, argument", [
    (lambda m, w: probing.position_probe(m, w, layers=[9]), "layers"),
    (lambda m, w: probing.position_probe(m, w, probe="svm"), "probe"),
    (lambda m, w: probing.position_probe(m, w, target="sideways"), "target"),
    (lambda m, w: probing.position_probe(m, w[:1]), "tokens"),
    (lambda m, w: probing.probe(m, w, np.zeros((2, 3))), "labels"),
    (lambda m, w: probing.position_probe(m, w, test_fraction=1.5), "test_fraction"),
    (lambda m, w: probing.integrated_gradients(m, w[:2]), "tokens"),
    (lambda m, w: probing.integrated_gradients(m, w[0], position=99), "position"),
    (lambda m, w: probing.causal_trace(m, w[0], noise_scale=-1), "noise_scale"),
    (lambda m, w: probing.head_ablation_importance(m, w, layer=0), "layer"),
    (lambda m, w: probing.head_position_scores(m, w, kind="noise"), "kind"),
])
def test_bad_input_names_the_argument(toy_lm, windows, call, argument):
    with pytest.raises(ValueError, match=argument):
        call(toy_lm, windows)


def test_random_model_control_uses_an_untrained_copy(toy_lm, windows):
    frame = probing.position_probe(toy_lm, windows[:32], layers=[0], control="random_model")
    # random learned-position vectors are still distinct: the architecture alone makes position
    # decodable from stream 0, which is why this control is reported next to the shuffle control
    assert frame["control_accuracy"].iloc[0] > 0.9
    random_model = probing.random_init_model(toy_lm, seed=0)
    assert not torch.equal(random_model.W_E, toy_lm.W_E)


# ------------------------------------------------------------------------ Llama-family models (RMSNorm, RoPE)

from test_patching_oracle import tiny_llama  # noqa: E402,F401 - fixture: random 2-layer Llama, GQA, RoPE, RMSNorm


def test_random_init_keeps_rmsnorm_gains_on_a_llama(tiny_llama):
    """Llama names its norm gains input_layernorm.weight / model.norm.weight (no "ln"): zeroing
    them made every logit 0. With gains 1 and N(0, 0.02) matrices the untrained copy predicts
    close to uniformly, so its loss is close to ln(vocab) but its logits still vary."""
    import math

    random_model = probing.random_init_model(tiny_llama, seed=0)
    gains = [(name, param) for name, param in random_model.named_parameters() if "norm" in name]
    assert len(gains) == 2 * tiny_llama.cfg.n_layers + 1 and all(bool((p == 1).all()) for _, p in gains)
    tokens = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    with torch.no_grad():
        logits = random_model(tokens)
    assert logits.std(-1).min() > 0.05  # not constant over the vocabulary (all 0 before the fix)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), tokens[:, 1:].reshape(-1))
    assert abs(float(loss) - math.log(512)) < 0.1
    assert not torch.equal(random_model.W_Q, tiny_llama.W_Q)
