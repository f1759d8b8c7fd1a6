"""Edge attribution patching, true edge patching and circuit evaluation against oracles.

* On a model made linear along every attributed path (attention patterns and norm scales
  frozen, a linear MLP), each EAP edge score must equal the measured effect of patching that
  edge alone (true edge patching), to 1e-4.
* The full circuit is the clean run and the empty circuit the corrupted run (against plain
  forward passes without any hook).
* EAP-IG's completeness: the embedding's outgoing scores sum to M(corrupted) - M(clean) (input
  variant) and one layer's outgoing scores to the effect of patching that layer's output,
  measured by the patching engine (activation variant), with an error that shrinks with steps.
* A planted circuit (heads whose output projection is zero carry nothing) is recovered with
  AUROC 1.0; toy-2l's previous-token head feeds its induction heads' keys.
* The split-input hooks are checked, and a bridge that changes them fails loudly.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import interp_lib as il
from interp_lib import circuits as C
from interp_lib import patching as P

from test_patching_oracle import tiny_llama  # noqa: F401 - fixture

pytestmark = pytest.mark.oracle


def _save_gpt2(path, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0,
                        eos_token_id=0, **overrides)
    model = GPT2LMHeadModel(config)
    return model, config


def _finish(model, path):
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(il.paths.data_dir() / "tokenizer-512" / name, path / name)
    return il.load_model(str(path), device="cpu")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 (d=32, 4 heads, GELU MLPs), weights drawn wide enough (std 0.2)
    that patching effects are far above rounding."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model, _ = _save_gpt2(path, initializer_range=0.2)
    return _finish(model, path)


@pytest.fixture(scope="module")
def linear_mlp_gpt2(tmp_path_factory):
    """A random 2-layer GPT-2 (d=32, 4 heads) whose MLP activation is the identity."""
    path = tmp_path_factory.mktemp("linear-gpt2")
    model, _ = _save_gpt2(path, activation_function="linear", initializer_range=0.2)
    return _finish(model, path)


#: The planted circuit: only these heads write to the residual stream (the other heads' and the
#: MLPs' output projections are zero), so every edge from or into another head carries nothing.
PLANTED_HEADS = ((0, 1), (1, 2))


@pytest.fixture(scope="module")
def planted_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted-gpt2")
    model, config = _save_gpt2(path, initializer_range=0.2)
    d_head = config.n_embd // config.n_head
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            for head in range(config.n_head):
                if (layer, head) not in PLANTED_HEADS:
                    block.attn.c_proj.weight[head * d_head:(head + 1) * d_head] = 0.0
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
    return _finish(model, path)


def _pair(model, batch=3, n_pos=7, changed=(1, 3, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, model.cfg.d_vocab, (batch, n_pos), generator=generator)
    corrupted = clean.clone()
    for p in changed:
        corrupted[:, p] = torch.randint(1, model.cfg.d_vocab, (batch,), generator=generator)
    answer = torch.randint(1, model.cfg.d_vocab, (batch,), generator=generator)
    wrong = torch.randint(1, model.cfg.d_vocab, (batch,), generator=generator)
    return clean, corrupted, C.logit_diff_metric(answer, wrong)


def _induction_pair(model, batch=16, length=20, seed=0):
    """BOS + S + S[:-1] (clean) vs BOS + S' + S[:-1]: the answer is S's last token."""
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(1, model.cfg.d_vocab, (batch, length), generator=generator)
    clean = torch.cat([torch.zeros(batch, 1, dtype=torch.long), half, half[:, :-1]], dim=1)
    corrupted = clean.clone()
    corrupted[:, 1:1 + length] = torch.randint(1, model.cfg.d_vocab, (batch, length), generator=generator)
    with torch.no_grad():
        wrong = model(corrupted)[:, -1].argmax(-1)
    return clean, corrupted, C.logit_diff_metric(half[:, -1], wrong)


class _Frozen:
    """Freeze a model's attention patterns (to the clean run's, averaged over prompts) and its
    norm scales (to one constant): every path an edge score follows becomes linear."""

    def __init__(self, model, clean, monkeypatch):
        graph = C.edge_graph(model)
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(graph.n_layers)]
        scales = [n for n in model.hook_dict if n.endswith("hook_scale")]
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n in names or n in scales)
        self.patterns = {n: cache[n].mean(0) for n in names}
        self.scale = float(torch.cat([cache[n].flatten() for n in scales]).median())
        scale = self.scale

        def linear_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
            y = (x - x.mean(-1, keepdim=True)) / scale
            y = y if weight is None else y * weight
            return y if bias is None else y + bias

        monkeypatch.setattr(torch.nn.functional, "layer_norm", linear_layer_norm)
        self.hooks = [(n, self._pattern(p)) for n, p in self.patterns.items()] + \
                     [(n, lambda act, hook: torch.full_like(act, scale)) for n in scales]

    @staticmethod
    def _pattern(pattern):
        return lambda act, hook: pattern.expand_as(act).clone()


def test_graph_layout_and_hook_check(toy_2l, tiny_llama):
    graph = C.edge_graph(toy_2l)
    assert graph.upstream[:3] == ("embed", "L0H0", "L0H1") and graph.upstream[5] == "MLP0"
    assert graph.downstream[:5] == ("L0H0.q", "L0H1.q", "L0H2.q", "L0H3.q", "L0H0.k")
    assert graph.downstream[-1] == "logits" and graph.downstream[-2] == "MLP1"
    # per layer L the attention reads 1 + 5L upstream nodes and the MLP 1 + 5L + 4 (12 inputs,
    # 1 MLP input each), the logits all 11: 12*1 + 5 + 12*6 + 10 + 11 = 110
    assert graph.n_edges == 12 * 1 + 5 + 12 * 6 + 10 + 11
    C.check_edge_hooks(toy_2l, force=True)
    assert not toy_2l.cfg.use_split_qkv_input and not toy_2l.cfg.use_attn_result  # restored
    llama = C.edge_graph(tiny_llama)
    assert llama.n_kv_heads == 2 and "L0KV1.k" in llama.downstream and "L0H3.q" in llama.downstream
    C.check_edge_hooks(tiny_llama, force=True)


def test_a_bridge_whose_head_results_change_meaning_fails_loudly(planted_gpt2):
    planted_gpt2.set_use_attn_result(True)
    planted_gpt2.blocks[1].attn.hook_result.add_hook(lambda act, hook: act * 2)
    try:
        with pytest.raises(C.EdgeHookError, match="split-input hooks changed meaning"):
            C.check_edge_hooks(planted_gpt2, force=True)
    finally:
        planted_gpt2.reset_hooks()
        planted_gpt2.set_use_attn_result(False)
    C.check_edge_hooks(planted_gpt2, force=True)


def test_eap_equals_single_edge_patching_on_a_frozen_linear_model(linear_mlp_gpt2, monkeypatch):
    model = linear_mlp_gpt2
    clean, corrupted, metric = _pair(model)
    C.check_edge_hooks(model)  # once, before the freezing hooks (which fit these prompts' shape only)
    frozen = _Frozen(model, clean, monkeypatch)
    with model.hooks(fwd_hooks=frozen.hooks):
        scores = C.edge_scores(model, clean, corrupted, metric, "eap", progress=False)
        exact = C.exact_edge_effects(model, clean, corrupted, metric, progress=False)
    valid = C.edge_graph(model).valid
    assert exact[valid].abs().max() > 1e-2  # edges matter: equality below is not 0 == 0
    # Under frozen patterns only value, MLP and logit edges carry anything; q / k edges are 0
    # in both, and the others are equal to 1e-4.
    torch.testing.assert_close(scores.scores[valid], exact[valid], atol=1e-4, rtol=0)
    assert (scores.scores[valid] != 0).sum() > valid.sum() // 3


@pytest.mark.parametrize("fixture", ["toy_lm", "tiny_llama"])
def test_full_circuit_is_the_clean_run_and_empty_circuit_the_corrupted_run(fixture, request):
    model = request.getfixturevalue(fixture)
    clean, corrupted, metric = _pair(model)
    graph = C.edge_graph(model)
    values = C.run_circuit(model, clean, corrupted, metric, torch.stack([graph.valid, torch.zeros_like(graph.valid)]),
                           progress=False)
    rows = torch.arange(clean.shape[0])
    with torch.no_grad():
        plain_clean, plain_corrupted = metric(model(clean), rows), metric(model(corrupted), rows)
    assert (plain_clean - plain_corrupted).abs().min() > 1e-3
    torch.testing.assert_close(values[0], plain_clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(values[1], plain_corrupted, atol=1e-4, rtol=0)


def test_eap_ig_inputs_completeness_error_shrinks_with_steps(tiny_gpt2):
    toy_lm = tiny_gpt2
    clean, corrupted, metric = _pair(toy_lm)
    errors = []
    for steps in (1, 4, 16):
        scores = C.edge_scores(toy_lm, clean, corrupted, metric, "eap-ig-inputs", steps=steps, progress=False)
        total = scores.per_prompt[:, 0].sum(-1)                       # the embedding's outgoing edges
        errors.append(float((total - (scores.corrupted_metric - scores.clean_metric)).abs().max()))
    gap = float((scores.corrupted_metric - scores.clean_metric).abs().min())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02 * gap


def test_eap_ig_activations_layer_sums_equal_the_engines_layer_patching(tiny_gpt2):
    toy_lm = tiny_gpt2
    clean, corrupted, metric = _pair(toy_lm)
    rows = torch.arange(clean.shape[0])
    graph = C.edge_graph(toy_lm)
    # the patching engine's oracle: the clean run with one layer's attention output corrupted
    patched = P.activation_patch(toy_lm, corrupted, clean, lambda logits: metric(logits, rows).mean(),
                                 "attn_out", by_position=False)
    with torch.no_grad():
        base = float(metric(toy_lm(clean), rows).mean())
    errors = []
    for steps in (2, 8):
        scores = C.edge_scores(toy_lm, clean, corrupted, metric, "eap-ig-activations", steps=steps, progress=False)
        sums = torch.stack([scores.scores[graph.attn_start(layer):graph.mlp_start(layer)].sum()
                            for layer in range(graph.n_layers)])
        errors.append(float((sums - (patched - base)).abs().max()))
    assert (patched - base).abs().max() > 0.05
    assert errors[1] < errors[0] and errors[1] < 0.05 * float((patched - base).abs().max())


def test_planted_circuit_is_recovered_with_auroc_one(planted_gpt2):
    model = planted_gpt2
    clean, corrupted, metric = _pair(model, batch=4, changed=(0, 2, 3, 5, 6))
    graph = C.edge_graph(model)
    planted = {"embed"} | {f"L{layer}H{head}" for layer, head in PLANTED_HEADS}
    truth = torch.zeros_like(graph.valid)
    for u, name in enumerate(graph.upstream):
        for v, target in enumerate(graph.downstream):
            node = target.split(".")[0]
            truth[u, v] = graph.valid[u, v] and name in planted and (node in planted or target == "logits")
    exact = C.exact_edge_effects(model, clean, corrupted, metric, progress=False)
    # the truth is real: planted edges all carry the task, the others nothing
    assert exact[truth].abs().min() > 1e-4 and exact[graph.valid & ~truth].abs().max() < 1e-6
    for method in C.METHODS:
        scores = C.edge_scores(model, clean, corrupted, metric, method, steps=3, progress=False)
        assert C.auroc(scores.scores.abs(), truth, graph.valid) == 1.0, method
    circuit = C.select_edges(scores, n=int(truth.sum()))
    assert torch.equal(circuit, truth)
    assert C.circuit_heads(graph, circuit) == [il.units.Head(0, 1), il.units.Head(1, 2)]
    curve = C.faithfulness_curve(model, clean, corrupted, metric, scores,
                                 fractions=(0.0, int(truth.sum()) / graph.n_edges, 1.0), progress=False)
    np.testing.assert_allclose(curve["faithfulness"], [0.0, 1.0, 1.0], atol=1e-4)


def test_toy_2l_previous_token_head_feeds_the_induction_heads_keys(toy_2l):
    """Measured by true edge patching and by EAP-IG: for each induction head L1H0-L1H2 the
    previous-token head L0H2's edge into its key input is the largest edge into its query and
    key inputs; for L1H0 and L1H1 it is the largest edge into the head at all (for L1H2 the
    embedding's edge into its value input is larger: corrupting the first copy also changes the
    token that head copies)."""
    clean, corrupted, metric = _induction_pair(toy_2l)
    graph = C.edge_graph(toy_2l)
    into = torch.zeros_like(graph.valid)
    into[:, [graph.downstream.index(f"L1H{h}.{s}") for h in range(3) for s in "qkv"]] = True
    exact = C.exact_edge_effects(toy_2l, clean, corrupted, metric, edges=into, progress=False)
    ig = C.edge_scores(toy_2l, clean, corrupted, metric, "eap-ig-activations", steps=5, progress=False).scores
    prev = graph.upstream.index("L0H2")
    for values in (exact, ig):
        for head in (0, 1, 2):
            inputs = [graph.downstream.index(f"L1H{head}.{s}") for s in "qkv"]
            key = values[:, inputs].abs().masked_fill(~graph.valid[:, inputs], -1)
            assert torch.argmax(key[:, :2].flatten()) == prev * 2 + 1, (head, values is exact)
            if head < 2:
                assert torch.argmax(key.flatten()) == prev * 3 + 1, (head, values is exact)


def test_greedy_selection_is_connected_to_the_logits(toy_2l):
    clean, corrupted, metric = _induction_pair(toy_2l, batch=4, length=8)
    scores = C.edge_scores(toy_2l, clean, corrupted, metric, "eap", progress=False)
    graph = scores.graph
    for n in (1, 5, 20):
        circuit = C.select_edges(scores, n=n, rule="greedy")
        assert int(circuit.sum()) == n
        feeds = graph.downstream_nodes()
        upstream_in = set(circuit.nonzero()[:, 0].tolist())
        for _, v in circuit.nonzero().tolist():
            assert graph.downstream[v] == "logits" or set(feeds[v]) & upstream_in
    top = C.select_edges(scores, n=7)
    assert int(top.sum()) == 7
    threshold = float(scores.scores.abs()[top].min())
    assert torch.equal(C.select_edges(scores, threshold=threshold), top | (scores.scores.abs() >= threshold) & graph.valid)


def test_bootstrap_of_identical_prompts_has_no_spread_and_a_full_core(toy_2l):
    clean, corrupted, metric = _induction_pair(toy_2l, batch=1, length=8)
    clean, corrupted = clean.repeat(4, 1), corrupted.repeat(4, 1)
    metric = C.logit_diff_metric(*[t.repeat(4) for t in (_answer(toy_2l, clean), _wrong(toy_2l, corrupted))])
    scores = C.edge_scores(toy_2l, clean, corrupted, metric, "eap", progress=False)
    boot = C.bootstrap_circuit(toy_2l, clean, corrupted, metric, scores, n=10, n_resamples=5, progress=False)
    assert torch.equal(boot.stable_core, boot.circuit) and set(boot.inclusion.unique().tolist()) <= {0.0, 1.0}
    assert boot.interval[0] == pytest.approx(boot.faithfulness, abs=1e-5)
    assert boot.interval[1] == pytest.approx(boot.faithfulness, abs=1e-5)
    assert boot.core_faithfulness == pytest.approx(boot.faithfulness, abs=1e-5)


def test_bootstrap_on_varied_prompts(toy_2l):
    clean, corrupted, metric = _induction_pair(toy_2l, batch=8, length=10)
    scores = C.edge_scores(toy_2l, clean, corrupted, metric, "eap", progress=False)
    boot = C.bootstrap_circuit(toy_2l, clean, corrupted, metric, scores, n=10, n_resamples=20, progress=False)
    assert boot.n_edges == 10 and 0 < boot.n_core <= 20
    assert int(((boot.inclusion >= 0.9) & scores.graph.valid).sum()) == boot.n_core
    assert boot.interval[0] <= boot.interval[1]
    frame = boot.frame(scores.scores)
    assert set(frame.columns) >= {"edge", "score", "inclusion", "in_circuit", "stable_core"}


def _answer(model, clean):
    return clean[:, 1 + (clean.shape[1] - 1) // 2]


def _wrong(model, corrupted):
    with torch.no_grad():
        return model(corrupted)[:, -1].argmax(-1)


def test_mib_scores_bound_and_curve(toy_2l):
    clean, corrupted, metric = _induction_pair(toy_2l, batch=4, length=8)
    scores = C.edge_scores(toy_2l, clean, corrupted, metric, "eap", progress=False)
    result = C.mib_scores(toy_2l, clean, corrupted, metric, scores, fractions=(0.0, 0.1, 0.5, 1.0), progress=False)
    for curve in (result["cpr_curve"], result["cmd_curve"]):
        assert curve["faithfulness"].iloc[0] == pytest.approx(0.0, abs=1e-5)
        assert curve["faithfulness"].iloc[-1] == pytest.approx(1.0, abs=1e-5)
    f = result["cpr_curve"]["faithfulness"].to_numpy()
    assert result["cpr"] == pytest.approx(0.1 * (f[0] + f[1]) / 2 + 0.4 * (f[1] + f[2]) / 2 + 0.5 * (f[2] + f[3]) / 2)
    assert result["cmd"] >= 0


def test_bad_inputs_fail_with_one_line_messages(toy_2l):
    clean, corrupted, metric = _induction_pair(toy_2l, batch=2, length=4)
    with pytest.raises(ValueError, match="method='acdc'"):
        C.edge_scores(toy_2l, clean, corrupted, metric, "acdc")
    with pytest.raises(ValueError, match="steps=0"):
        C.edge_scores(toy_2l, clean, corrupted, metric, "eap-ig-inputs", steps=0)
    with pytest.raises(ValueError, match="one value per prompt"):
        C.edge_scores(toy_2l, clean, corrupted, lambda logits, rows: logits.sum(), "eap")
    with pytest.raises(ValueError, match="circuits has shape"):
        C.run_circuit(toy_2l, clean, corrupted, metric, torch.ones(3, 3, dtype=torch.bool))
    scores = C.edge_scores(toy_2l, clean, corrupted, metric, "eap", progress=False)
    with pytest.raises(ValueError, match="exactly one of n="):
        C.select_edges(scores)
    with pytest.raises(ValueError, match="n=1000"):
        C.select_edges(scores, n=1000)
