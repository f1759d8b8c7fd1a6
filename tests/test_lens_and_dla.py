"""Logit lens, direct logit attribution, activation / attribution patching and ablation.

Patching results are checked against TransformerLens' own ``patching.get_act_patch_*`` on the
same inputs (a random small GPT-2 and the bundled toy-lm), and against facts that hold for any
model (patching everything restores the clean run; a linear estimate matches a tiny patch).
"""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch

import interp_lib as il
from interp_lib import attribution as A
from interp_lib import patching as P

pytestmark = pytest.mark.oracle  # compares with TransformerLens / Hugging Face: also run on the newest versions

TL_SWEEPS = {  # (our component, by_position) -> TransformerLens function name
    ("resid_pre", True): "get_act_patch_resid_pre",
    ("resid_mid", True): "get_act_patch_resid_mid",
    ("attn_out", True): "get_act_patch_attn_out",
    ("mlp_out", True): "get_act_patch_mlp_out",
    ("attn_head_out", True): "get_act_patch_attn_head_out_by_pos",
    ("attn_head_q", True): "get_act_patch_attn_head_q_by_pos",
    ("attn_head_k", True): "get_act_patch_attn_head_k_by_pos",
    ("attn_head_v", True): "get_act_patch_attn_head_v_by_pos",
    ("attn_head_pattern", True): "get_act_patch_attn_head_pattern_by_pos",
    ("attn_head_out", False): "get_act_patch_attn_head_out_all_pos",
    ("attn_head_q", False): "get_act_patch_attn_head_q_all_pos",
    ("attn_head_k", False): "get_act_patch_attn_head_k_all_pos",
    ("attn_head_v", False): "get_act_patch_attn_head_v_all_pos",
    ("attn_head_pattern", False): "get_act_patch_attn_head_pattern_all_pos",
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 (d=32, 4 heads, vocab 512) saved as a local model
    directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(il.paths.data_dir() / "tokenizer-512" / name, path / name)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return il.load_model(str(tiny_path), device="cpu")


def pair(model, batch=2, n_pos=6, changed=(2, 4), seed=0):
    """Clean tokens, and corrupted tokens differing from them at the ``changed`` positions."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=generator)
    corrupted = clean.clone()
    for p in changed:
        corrupted[:, p] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=generator)
    return clean, corrupted


def logit_diff_metric(model, clean, corrupted, answer=(5, 7), wrong=(9, 11)):
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    return P.normalized_logit_diff_metric(clean_logits, corrupted_logits, torch.as_tensor(answer),
                                          torch.as_tensor(wrong))


# --------------------------------------------------------------------------------------------
# Activation patching equals TransformerLens'
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("component,by_position", list(TL_SWEEPS))
def test_activation_patch_equals_transformer_lens(tiny, component, by_position):
    from transformer_lens import patching as tl_patching

    clean, corrupted = pair(tiny)
    metric = logit_diff_metric(tiny, clean, corrupted)

    def full_metric(logits):  # reads every position: exercises the no-shortcut path too
        return logits.log_softmax(-1)[:, :-1].gather(-1, clean[:, 1:, None]).mean()

    _, clean_cache = tiny.run_with_cache(clean)
    for m in (metric, full_metric):
        with torch.no_grad():
            expected = getattr(tl_patching, TL_SWEEPS[component, by_position])(tiny, corrupted, clean_cache, m)
        ours = P.activation_patch(tiny, clean, corrupted, m, component, by_position=by_position)
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected.cpu().float(), atol=1e-4, rtol=0)
    # the sweep found something: patches change the metric
    assert ours.std() > 0


def test_resid_post_and_all_position_layouts_match_generic_transformer_lens(tiny):
    from transformer_lens import patching as tl_patching

    clean, corrupted = pair(tiny)
    metric = logit_diff_metric(tiny, clean, corrupted)
    _, clean_cache = tiny.run_with_cache(clean)
    with torch.no_grad():
        expected = tl_patching.generic_activation_patch(
            tiny, corrupted, clean_cache, metric, patch_setter=tl_patching.layer_pos_patch_setter,
            activation_name="resid_post", index_axis_names=("layer", "pos"))
    torch.testing.assert_close(P.activation_patch(tiny, clean, corrupted, metric, "resid_post"),
                               expected.float(), atol=1e-4, rtol=0)
    # All positions at once: the first layer's residual input carries everything -> clean (1.0),
    # and so does the last layer's resid_mid (a bridge quirk: its hook is ln2.hook_in, which only
    # an in-place patch carries into the residual add).
    whole = P.activation_patch(tiny, clean, corrupted, metric, "resid_pre", by_position=False)
    assert whole.shape == (tiny.cfg.n_layers,)
    assert whole[0] == pytest.approx(1.0, abs=1e-4)
    mid = P.activation_patch(tiny, clean, corrupted, metric, "resid_mid", by_position=False)
    assert mid[-1] == pytest.approx(1.0, abs=1e-4)


def test_activation_patch_equals_transformer_lens_on_toy_lm(toy_lm):
    from transformer_lens import patching as tl_patching

    clean = toy_lm.to_tokens(["The function returns a list of", "The method returns a dict of"])
    corrupted = toy_lm.to_tokens(["The function returns a tuple of", "The method returns a set of"])
    assert clean.shape == corrupted.shape
    answer, wrong = toy_lm.to_single_token(" items"), toy_lm.to_single_token(" the")
    metric = logit_diff_metric(toy_lm, clean, corrupted, answer=(answer,) * 2, wrong=(wrong,) * 2)
    _, clean_cache = toy_lm.run_with_cache(clean)
    with torch.no_grad():
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(toy_lm, corrupted, clean_cache, metric)
        resid = tl_patching.get_act_patch_resid_pre(toy_lm, corrupted, clean_cache, metric)
        # one layer of the head-by-position sweep (TransformerLens takes an index table for subsets)
        index = pd.DataFrame([(3, p, h) for p in range(clean.shape[1]) for h in range(toy_lm.cfg.n_heads)],
                             columns=["layer", "pos", "head"])
        layer3 = tl_patching.generic_activation_patch(
            toy_lm, corrupted, clean_cache, metric, patch_setter=tl_patching.layer_pos_head_vector_patch_setter,
            activation_name="z", index_df=index)
    torch.testing.assert_close(P.activation_patch(toy_lm, clean, corrupted, metric, "z", by_position=False),
                               heads.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(P.activation_patch(toy_lm, clean, corrupted, metric, "resid_pre"),
                               resid.float(), atol=1e-4, rtol=0)
    ours, labels = P.activation_patch(toy_lm, clean, corrupted, metric, "attn_head_out", return_labels=True)
    torch.testing.assert_close(ours[3].flatten(), layer3.float(), atol=1e-4, rtol=0)
    assert labels["layer"] == [f"L{i}" for i in range(toy_lm.cfg.n_layers)]
    assert labels["cell"][3, 5, 2] == "L3H2@5" and labels["cell"].shape == ours.shape
    # Patching layer 0's residual input at the one corrupted position restores the clean run.
    differs = (clean != corrupted).any(0).float()
    assert differs.sum() == 1
    torch.testing.assert_close(resid[0].float(), differs, atol=1e-4, rtol=0)


def test_activation_patch_equals_transformer_lens_on_toy_2l_induction(toy_2l):
    """Repeated random tokens: the second half is predictable only by induction."""
    from transformer_lens import patching as tl_patching

    generator = torch.Generator().manual_seed(0)
    half = torch.randint(1, toy_2l.cfg.d_vocab, (2, 5), generator=generator)
    clean = torch.cat([torch.zeros(2, 1, dtype=torch.long), half, half[:, :-1]], dim=1)
    corrupted = clean.clone()
    corrupted[:, 1:6] = torch.randint(1, toy_2l.cfg.d_vocab, (2, 5), generator=generator)
    with torch.no_grad():
        wrong = toy_2l(corrupted)[:, -1].argmax(-1)
    metric = logit_diff_metric(toy_2l, clean, corrupted, answer=half[:, -1], wrong=wrong)
    _, clean_cache = toy_2l.run_with_cache(clean)
    with torch.no_grad():
        pattern = tl_patching.get_act_patch_attn_head_pattern_by_pos(toy_2l, corrupted, clean_cache, metric)
        heads = tl_patching.get_act_patch_attn_head_v_all_pos(toy_2l, corrupted, clean_cache, metric)
    torch.testing.assert_close(P.activation_patch(toy_2l, clean, corrupted, metric, "pattern"),
                               pattern.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(P.activation_patch(toy_2l, clean, corrupted, metric, "v", by_position=False),
                               heads.float(), atol=1e-4, rtol=0)


def test_chunking_and_metric_positions_do_not_change_results(tiny):
    clean, corrupted = pair(tiny, n_pos=7, changed=(1, 5))
    metric = logit_diff_metric(tiny, clean, corrupted)
    reference = P.activation_patch(tiny, clean, corrupted, metric, "z", patches_per_batch=1)
    tiny_budget = P.activation_patch(tiny, clean, corrupted, metric, "z", memory_limit_mb=0.05)
    plain = P.activation_patch(tiny, clean, corrupted, lambda logits: metric(logits))  # no reads_positions
    # Chunks of other sizes reduce in another order: float32 noise only (torch 2.11, Colab's, differs
    # by 1.5e-5 on 2 of 56 cells of about 0.7); a chunking bug moves cells by their own size.
    for other in (tiny_budget, plain):
        torch.testing.assert_close(other, reference, atol=5e-5, rtol=0)
    # Positions before the first corrupted token cannot change anything: exactly the corrupted run.
    assert torch.all(reference[:, 0] == 0)

    def wrong_declaration(logits):
        return logits[:, 2, 0].mean()
    wrong_declaration.reads_positions = (-1,)
    with pytest.raises(ValueError, match="reads_positions"):
        P.activation_patch(tiny, clean, corrupted, wrong_declaration, "resid_pre")


def test_subset_sweeps_and_labels(tiny):
    clean, corrupted = pair(tiny, batch=1)
    metric = logit_diff_metric(tiny, clean, corrupted, answer=(5,), wrong=(9,))
    full = P.activation_patch(tiny, clean, corrupted, metric, "z")
    part, labels = P.activation_patch(tiny, clean, corrupted, metric, "z", layers=[1], positions=[-1, 2],
                                      heads=[3, 0], return_labels=True)
    assert part.shape == (1, 2, 2)
    torch.testing.assert_close(part[0], full[1][[5, 2]][:, [3, 0]])
    assert labels["head"] == ["H3", "H0"] and labels["pos"][0].startswith("5:")
    fig = il.plots.patching_heatmap(part[0], {k: v for k, v in labels.items() if k != "layer"} | {"cell": labels["cell"][0]})
    assert fig.data[0].z.shape == (2, 2)
    sweep, sweep_labels = P.activation_patch(tiny, clean, corrupted, metric, "z", return_labels=True)
    assert len(il.plots.patching_heatmap(sweep, sweep_labels).data) == tiny.cfg.n_heads  # a panel per head
    approx = P.attribution_patch(tiny, clean, corrupted, metric, "z")
    assert "r = " in il.plots.patching_scatter(sweep, approx, sweep_labels).layout.title.text
    frame = P.patching_frame(part, labels)
    assert list(frame.columns) == ["layer", "pos", "head", "cell", "value"] and len(frame) == 4
    assert frame["cell"].tolist()[:2] == ["L1H3@5", "L1H0@5"]


# --------------------------------------------------------------------------------------------
# Attribution patching
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("component", ["resid_mid", "attn_head_out", "attn_head_pattern", "mlp_out"])
def test_attribution_patch_is_the_first_order_term_of_exact_patching(tiny, component):
    """With a "clean" run that is the corrupted run plus a tiny perturbation, exact patching and
    its linear estimate agree to second order (checks the gradients reach every consumer of the
    hooked activation, including the residual add behind the bridge's ``hook_resid_mid``)."""
    _, corrupted = pair(tiny)
    metric = logit_diff_metric(tiny, *pair(tiny))
    comp = P.get_component(component)
    _, cache = tiny.run_with_cache(corrupted)
    generator = torch.Generator().manual_seed(1)
    nudged = {}
    for layer in range(tiny.cfg.n_layers):
        act = cache[comp.hook_name(layer)]
        nudged[comp.hook_name(layer)] = act + 1e-3 * act.std() * torch.randn(act.shape, generator=generator)
    exact = P.activation_patch(tiny, None, corrupted, metric, component, clean_cache=nudged)
    approx = P.attribution_patch(tiny, None, corrupted, metric, component, clean_cache=nudged)
    assert approx.shape == exact.shape
    with torch.no_grad():
        baseline = float(metric(tiny(corrupted)))
    effect = (exact - baseline).abs().max()
    assert effect > 0
    assert (approx - exact).abs().max() <= 0.05 * effect


def test_attribution_patch_agrees_with_exact_on_toy_lm(toy_lm):
    clean = toy_lm.to_tokens(["x = [1, 2, 3]\ny = x", "a = [4, 5, 6]\nb = a"])
    corrupted = toy_lm.to_tokens(["x = [1, 2, 3]\ny = z", "a = [4, 5, 6]\nb = c"])
    assert clean.shape == corrupted.shape
    with torch.no_grad():
        clean_logits, corrupted_logits = toy_lm(clean), toy_lm(corrupted)
    answer = clean_logits[:, -1].argmax(-1)
    wrong = corrupted_logits[:, -1].argmax(-1)
    wrong = torch.where(wrong == answer, clean_logits[:, -1].topk(2).indices[:, 1], wrong)
    metric = P.normalized_logit_diff_metric(clean_logits, corrupted_logits, answer, wrong)
    exact = P.activation_patch(toy_lm, clean, corrupted, metric, "resid_pre")
    approx = P.attribution_patch(toy_lm, clean, corrupted, metric, "resid_pre")
    assert approx.shape == exact.shape == (toy_lm.cfg.n_layers, clean.shape[1])
    agreement = P.patching_agreement(exact, approx, k=5)
    assert agreement["pearson"] > 0.7
    assert agreement["sign_agreement"] > 0.7
    assert set(agreement) >= {"pearson", "spearman", "sign_agreement", "top_k_overlap"}


def test_patching_agreement_values_and_errors():
    exact = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    same = P.patching_agreement(exact, exact, k=2)
    assert same["pearson"] == pytest.approx(1.0) and same["sign_agreement"] == 1.0 and same["top_k_overlap"] == 1.0
    flipped = P.patching_agreement(exact, -exact, k=2)
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["sign_agreement"] == 0.25
    with pytest.raises(ValueError, match="cells"):
        P.patching_agreement(exact, exact[0])
    with pytest.raises(ValueError, match="k=9"):
        P.patching_agreement(exact, exact, k=9)


# --------------------------------------------------------------------------------------------
# Metrics and ablation
# --------------------------------------------------------------------------------------------

def test_normalized_metric_is_zero_on_corrupted_and_one_on_clean(tiny):
    clean, corrupted = pair(tiny)
    metric = logit_diff_metric(tiny, clean, corrupted)
    with torch.no_grad():
        assert float(metric(tiny(clean))) == pytest.approx(1.0, abs=1e-5)
        assert float(metric(tiny(corrupted))) == pytest.approx(0.0, abs=1e-5)
        logits = tiny(clean)
    assert metric.reads_positions == (clean.shape[1] - 1,)
    torch.testing.assert_close(metric.batched(logits[None, :, -1:]), metric(logits)[None])
    with pytest.raises(ValueError, match="equal"):
        P.normalized_logit_diff_metric(logits, logits, torch.tensor([5, 7]), torch.tensor([9, 11]))
    with pytest.raises(ValueError, match="answer has shape"):
        P.logit_diff(logits, torch.tensor([1, 2, 3]), 4)


def test_ablation_sweep_and_joint_ablation_agree(tiny):
    tokens, _ = pair(tiny, batch=3)

    def metric(logits):
        return logits[:, -1, 5].mean()

    for method in ("zero", "mean", "resample"):
        sweep = P.ablation_sweep(tiny, tokens, metric, "attn_head_out", method=method)
        assert sweep.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
        single = metric(P.run_with_ablation(tiny, tokens, heads=["L1H2"], method=method))
        assert float(sweep[1, 2]) == pytest.approx(float(single), abs=1e-5)
    # Mean over identical prompts is each prompt's own activation: nothing changes.
    same = tokens[:1].expand(3, -1)
    with torch.no_grad():
        untouched = metric(tiny(same))
    mean_ablated = P.ablation_sweep(tiny, same, metric, "mlp_out", method="mean")
    torch.testing.assert_close(mean_ablated, torch.full_like(mean_ablated, float(untouched)), atol=1e-5, rtol=0)
    # Zero-ablating a whole attention layer differs from leaving it alone.
    with torch.no_grad():
        assert not torch.allclose(P.run_with_ablation(tiny, tokens, attn_layers=[0]), tiny(tokens))
    with pytest.raises(ValueError, match="method='median'"):
        P.ablation_sweep(tiny, tokens, metric, method="median")
    with pytest.raises(ValueError, match="'L9H0'"):
        P.run_with_ablation(tiny, tokens, heads=["L9H0"])
    with pytest.raises(ValueError, match="resample ablation needs"):
        P.ablation_sweep(tiny, tokens[:1], metric, method="resample")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_patching_bad_input_gives_clear_errors(tiny):
    clean, corrupted = pair(tiny)
    metric = logit_diff_metric(tiny, clean, corrupted)
    with pytest.raises(ValueError, match=r"clean_tokens has shape \(2, 5\).*corrupted_tokens has shape \(2, 6\)"):
        P.activation_patch(tiny, clean[:, :5], corrupted, metric)
    with pytest.raises(ValueError, match="must return a scalar.*\\(2,\\)"):
        P.activation_patch(tiny, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError, match="must return a scalar"):
        P.attribution_patch(tiny, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError) as error:
        P.activation_patch(tiny, clean, corrupted, metric, component="attn_heads")
    assert "attn_heads" in str(error.value)
    for name in P.COMPONENTS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match=r"positions=\[6\] out of range.*6 entries"):
        P.activation_patch(tiny, clean, corrupted, metric, positions=[6])
    with pytest.raises(ValueError, match=r"heads=\[4\] out of range"):
        P.attribution_patch(tiny, clean, corrupted, metric, heads=[4])
    with pytest.raises(ValueError, match=r"layers=\[2\] out of range"):
        P.activation_patch(tiny, clean, corrupted, metric, "resid_pre", layers=[2])
    with pytest.raises(ValueError, match="no head axis"):
        P.activation_patch(tiny, clean, corrupted, metric, "mlp_out", heads=[0])
    with pytest.raises(ValueError, match=r"corrupted_tokens holds token id \d+: expected ids in \[0, "):
        P.activation_patch(tiny, clean, corrupted + 1000, metric)
    tiny.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            P.activation_patch(tiny, clean, corrupted, metric)
    finally:
        tiny.eval()


# --------------------------------------------------------------------------------------------
# Logit lens
# --------------------------------------------------------------------------------------------

def test_logit_lens_final_stage_is_the_model_and_stages_renormalise(toy_lm):
    tokens = toy_lm.to_tokens("The function returns a list of")
    logits, labels = A.logit_lens_logits(toy_lm, tokens, incl_mid=True)
    assert labels[0] == "embed" and labels[-1] == f"L{toy_lm.cfg.n_layers - 1}" and "L0.attn" in labels
    with torch.no_grad():
        model_logits, cache = toy_lm.run_with_cache(tokens)
    torch.testing.assert_close(logits[-1].softmax(-1), model_logits.softmax(-1), atol=1e-5, rtol=1e-4)
    # Each stage is normalised with its own statistics (not the final layer's scale: TL #1076).
    resid = cache["blocks.1.hook_resid_pre"]
    centred = resid - resid.mean(-1, keepdim=True)
    own = centred / (centred.pow(2).mean(-1, keepdim=True) + toy_lm.cfg.eps).sqrt()
    expected = toy_lm.unembed(own)
    torch.testing.assert_close(logits[labels.index("L0")], expected, atol=1e-4, rtol=1e-4)
    final_scale = centred / cache["ln_final.hook_scale"]
    assert not torch.allclose(toy_lm.unembed(final_scale), expected, atol=1e-3)


def test_logit_lens_table(toy_lm):
    tokens = toy_lm.to_tokens("The function returns a list of")[0]
    next_tokens = torch.cat([tokens[1:], torch.tensor([-1])])
    table = A.logit_lens(toy_lm, tokens, target=next_tokens, k=3)
    n_stages, n_pos = toy_lm.cfg.n_layers + 1, len(tokens)
    assert len(table) == n_stages * n_pos
    assert {"stage", "layer", "position", "top_tokens", "top_prob", "target_prob", "target_rank"} <= set(table.columns)
    final = table[table["stage"] == f"L{toy_lm.cfg.n_layers - 1}"].sort_values("position")
    with torch.no_grad():
        probs = toy_lm(tokens[None])[0].softmax(-1)
    expected = probs[torch.arange(n_pos - 1), tokens[1:]]
    assert final["target_prob"].iloc[:-1].to_numpy() == pytest.approx(expected.numpy(), rel=1e-4)
    assert math.isnan(final["target_prob"].iloc[-1]) and final["target_rank"].iloc[-1] == -1
    assert (table["top_prob"] >= table["target_prob"].fillna(0)).all()
    one = A.logit_lens(toy_lm, "The function returns a list of", target=" items", positions=[-1])
    assert len(one) == n_stages and one["target_token"].iloc[0] == " items"
    fig = il.plots.logit_lens_heatmap(table, value="target_prob")
    assert fig.data[0].z.shape == (n_stages, n_pos)
    with pytest.raises(ValueError, match="positions="):
        A.logit_lens(toy_lm, tokens, positions=[99])
    with pytest.raises(ValueError, match="target="):
        A.logit_lens(toy_lm, tokens, target=" items and more")


# --------------------------------------------------------------------------------------------
# Direct logit attribution
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("by", ["layer", "head"])
def test_dla_parts_add_up_to_the_logit_difference(toy_lm, by):
    tokens = toy_lm.to_tokens(["The function returns a list of", "Returns the number of items in"])
    answer, wrong = torch.tensor([10, 20]), torch.tensor([30, 40])
    position = torch.tensor([-1, 3])
    contributions, labels = A.direct_logit_attribution(toy_lm, tokens, answer, wrong, position=position,
                                                       by=by, return_labels=True)
    assert contributions.shape == (len(labels), 2) and labels[-1] == "unembed_bias"
    with torch.no_grad():
        logits = toy_lm(tokens)
    rows, pos = torch.arange(2), position % tokens.shape[1]
    total = logits[rows, pos, answer] - logits[rows, pos, wrong]
    torch.testing.assert_close(contributions.sum(0), total, atol=1e-4, rtol=1e-5)
    if by == "head":
        assert "L3H2" in labels and "0_attn_bias" in labels
        grid = A.head_grid(contributions, labels, toy_lm.cfg.n_layers, toy_lm.cfg.n_heads)
        assert grid.shape == (toy_lm.cfg.n_layers, toy_lm.cfg.n_heads, 2)
        assert il.plots.logit_attribution_bar(contributions, labels, top=5).data[0].x.__len__() == 5


def test_dla_matches_transformer_lens_logit_attrs(toy_lm):
    tokens = toy_lm.to_tokens(["The function returns a list of", "Returns the number of items in"])
    answer, wrong = torch.tensor([10, 20]), torch.tensor([30, 40])
    _, cache = toy_lm.run_with_cache(tokens)
    stack = cache.decompose_resid()
    expected = cache.logit_attrs(stack, answer, wrong)[:, :, -1]
    ours = A.direct_logit_attribution(toy_lm, tokens, answer, wrong)
    torch.testing.assert_close(ours[:-1], expected.detach().float(), atol=1e-4, rtol=1e-4)
    heads = cache.logit_attrs(cache.stack_head_results(layer=-1), answer, wrong)[:, :, -1]
    ours_heads, labels = A.direct_logit_attribution(toy_lm, tokens, answer, wrong, by="head", return_labels=True)
    grid = A.head_grid(ours_heads, labels, toy_lm.cfg.n_layers, toy_lm.cfg.n_heads)
    torch.testing.assert_close(grid.reshape(-1, 2), heads.detach().float(), atol=1e-4, rtol=1e-4)


def test_dla_adds_up_without_compatibility_mode(tiny_path):
    """Raw Hugging Face numerics: the final LayerNorm's weight and bias are not folded away."""
    raw = il.load_model(str(tiny_path), device="cpu", compatibility_mode=False)
    with torch.no_grad():
        norm = raw.ln_final._original_component
        norm.weight.mul_(torch.linspace(0.5, 1.5, norm.weight.shape[0]))
        norm.bias.add_(torch.linspace(-0.3, 0.3, norm.bias.shape[0]))
    tokens, _ = pair(raw)
    contributions = A.direct_logit_attribution(raw, tokens, 3, 4, by="head")
    with torch.no_grad():
        logits = raw(tokens)
    torch.testing.assert_close(contributions.sum(0), logits[:, -1, 3] - logits[:, -1, 4], atol=1e-4, rtol=1e-4)


def test_dla_bad_input(toy_lm):
    tokens = toy_lm.to_tokens("The function returns")
    with pytest.raises(ValueError, match="position="):
        A.direct_logit_attribution(toy_lm, tokens, 1, position=50)
    with pytest.raises(ValueError, match="by='neuron'"):
        A.direct_logit_attribution(toy_lm, tokens, 1, by="neuron")
    with pytest.raises(ValueError, match="answer holds ids"):
        A.direct_logit_attribution(toy_lm, tokens, 10**6)
    with pytest.raises(ValueError, match="answer has shape"):
        A.direct_logit_attribution(toy_lm, tokens, torch.tensor([1, 2]))


def test_lens_answer_depth_finds_the_induction_layer(toy_2l):
    """Planted truth: on BOS + S + S, toy-2l can only predict the second copy's next token after its
    induction layer (block 1, i.e. 2 blocks completed); the first copy (random) never."""
    from interp_lib import heads as H

    clean = H.repeat_probe_tokens(toy_2l, 20, 0, 2, seed=0)
    target = torch.cat([clean[:, 1:], torch.full((2, 1), -1)], dim=1)
    lens = A.logit_lens(toy_2l, clean, target=target, incl_mid=True)
    assert A.lens_answer_depth(lens, positions=range(21, 40)) == 2.0
    assert math.isnan(A.lens_answer_depth(lens, positions=range(1, 20)))
    # by hand: the share of rows where the target is top, per whole block
    rows = lens[lens["position"].between(21, 39) & (lens["layer"] == lens["layer"].round())]
    share = (rows["target_rank"] == 0).groupby(rows["layer"]).mean()
    assert share.loc[1.0] <= 0.5 < share.loc[2.0]
    with pytest.raises(ValueError, match="pass target="):
        A.lens_answer_depth(A.logit_lens(toy_2l, clean[:1]))
