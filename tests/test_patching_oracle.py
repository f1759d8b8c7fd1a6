"""The patching engine's fast paths against TransformerLens on every component, and what happens
when a fast path stops being exact.

The engine runs patched copies from the patched position on on top of the corrupted run's KV
cache. Under transformers 5.24 the bridge's attention stopped receiving that cache (transformers
renamed the argument to ``cache``), the copies ran with no prefix at all and results were off by
up to 4.0 while every shape still matched. These tests pin the numbers to TransformerLens'
``get_act_patch_*`` on three model shapes, check that the cache shortcut is live on the
installed versions, and force a broken shortcut to show the self-check's fallback.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import interp_lib as il
from interp_lib import patching as P

from test_lens_and_dla import TL_SWEEPS, logit_diff_metric, pair, tiny, tiny_path  # noqa: F401 - fixtures

pytestmark = pytest.mark.oracle


def _toy_2l_pair(model, length=6, batch=2, seed=0):
    """BOS + S + S[:-1] (clean) vs BOS + S' + S[:-1] (corrupted): the answer is S's last token."""
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(1, model.cfg.d_vocab, (batch, length), generator=generator)
    clean = torch.cat([torch.zeros(batch, 1, dtype=torch.long), half, half[:, :-1]], dim=1)
    corrupted = clean.clone()
    corrupted[:, 1:1 + length] = torch.randint(1, model.cfg.d_vocab, (batch, length), generator=generator)
    with torch.no_grad():
        wrong = model(corrupted)[:, -1].argmax(-1)
    return clean, corrupted, logit_diff_metric(model, clean, corrupted, answer=half[:, -1], wrong=wrong)


def _toy_lm_pair(model):
    clean = model.to_tokens(["The function returns a list of", "The method returns a dict of"])
    corrupted = model.to_tokens(["The function returns a tuple of", "The method returns a set of"])
    assert clean.shape == corrupted.shape
    answer, wrong = model.to_single_token(" items"), model.to_single_token(" the")
    return clean, corrupted, logit_diff_metric(model, clean, corrupted, answer=(answer,) * 2, wrong=(wrong,) * 2)


def _assert_equals_transformer_lens(model, clean, corrupted, metric, component, by_position):
    from transformer_lens import patching as tl_patching

    _, clean_cache = model.run_with_cache(clean)
    with torch.no_grad():
        expected = getattr(tl_patching, TL_SWEEPS[component, by_position])(model, corrupted, clean_cache, metric)
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.ShortcutMismatchWarning)
        ours = P.activation_patch(model, clean, corrupted, metric, component, by_position=by_position)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected.cpu().float(), atol=1e-4, rtol=0)
    return ours


@pytest.mark.parametrize("component,by_position", list(TL_SWEEPS))
def test_every_component_equals_transformer_lens_on_toy_lm(toy_lm, component, by_position):
    ours = _assert_equals_transformer_lens(toy_lm, *_toy_lm_pair(toy_lm), component, by_position)
    assert ours.abs().max() > 1e-3  # the sweep found effects: a constant result would prove little


@pytest.mark.parametrize("component,by_position", list(TL_SWEEPS))
def test_every_component_equals_transformer_lens_on_toy_2l(toy_2l, component, by_position):
    ours = _assert_equals_transformer_lens(toy_2l, *_toy_2l_pair(toy_2l), component, by_position)
    if component != "mlp_out":  # toy-2l is attention-only style: its MLP outputs are 0
        assert ours.abs().max() > 1e-3


@pytest.fixture(scope="module")
def gpt2_small_shaped(tmp_path_factory):
    """GPT-2 small's shape (12 layers, 12 heads, d_model 768, vocab 50257, 1024 positions) with
    random weights: the size at which the fast path's speed matters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-small-shaped")
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    return il.load_model(str(path), device="cpu")


@pytest.mark.parametrize("component,by_position", list(TL_SWEEPS))
def test_every_component_equals_transformer_lens_on_gpt2_small_shaped(gpt2_small_shaped, component, by_position):
    """The first and last layers of every sweep against TransformerLens' own sweep function, restricted
    to those layers through its index table (the whole sweep would take minutes a component).
    The metric is the raw logit difference: random weights give a clean-corrupted gap near 0.01,
    which a normalised metric would turn into a 100x amplifier of float32 rounding."""
    import itertools

    import pandas as pd
    from transformer_lens import patching as tl_patching

    model = gpt2_small_shaped
    clean, corrupted = pair(model, batch=2, n_pos=5, changed=(1, 3))
    answer, wrong = torch.tensor([5, 7]), torch.tensor([9, 11])

    def metric(logits):
        return P.logit_diff(logits, answer, wrong).mean()
    metric.reads_positions = (clean.shape[1] - 1,)   # lets the engine take every shortcut

    layers = [0, 11]
    tl_sweep = getattr(tl_patching, TL_SWEEPS[component, by_position])
    axes = tl_sweep.keywords["index_axis_names"]
    sizes = {"layer": layers, "pos": range(clean.shape[1]), "dest_pos": range(clean.shape[1]),
             "head": range(model.cfg.n_heads), "head_index": range(model.cfg.n_heads)}
    index = pd.DataFrame(list(itertools.product(*[sizes[a] for a in axes])), columns=list(axes))
    _, clean_cache = model.run_with_cache(clean)
    with torch.no_grad():
        expected = tl_patching.generic_activation_patch(
            model, corrupted, clean_cache, metric, patch_setter=tl_sweep.keywords["patch_setter"],
            activation_name=tl_sweep.keywords["activation_name"], index_df=index)
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.ShortcutMismatchWarning)
        ours = P.activation_patch(model, clean, corrupted, metric, component, by_position=by_position, layers=layers)
    torch.testing.assert_close(ours.flatten(), expected.cpu().float(), atol=1e-4, rtol=0)
    assert (ours - ours.flatten()[0]).abs().max() > 1e-3


def test_kv_cache_suffix_run_equals_full_forward(toy_2l):
    """The shortcut itself, on the installed versions: the corrupted run fills a KV cache, and
    positions p.. run on the cache cropped to p give the full forward's logits there. If a
    transformers / TransformerLens release changes how the cache reaches the attention, this
    fails by name (the engine would still be right, through its fallback, but slower)."""
    clean, corrupted, _ = _toy_2l_pair(toy_2l)
    n_pos = corrupted.shape[1]
    with torch.no_grad(), P._kv_cache_plumbing(toy_2l):
        full, cache = toy_2l(corrupted, return_type="logits_and_cache", use_cache=True)
        assert P._usable_kv_cache(cache, n_pos), f"the KV cache holds {cache.get_seq_length()} of {n_pos} positions"
        for start in (1, 5, n_pos - 1):
            suffix = toy_2l(corrupted[:, start:].repeat_interleave(3, 0),
                            past_key_values=P._prefix_cache(cache, start, n_pos, 3))
            torch.testing.assert_close(suffix, full[:, start:].repeat_interleave(3, 0), atol=1e-5, rtol=0)


def test_first_sweep_verifies_the_shortcut_and_trusts_it_afterwards(tiny_path):
    model = il.load_model(str(tiny_path), device="cpu")
    clean, corrupted = pair(model)
    metric = logit_diff_metric(model, clean, corrupted)
    assert P.shortcut_verdict(model, "z") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.ShortcutMismatchWarning)
        fast = P.activation_patch(model, clean, corrupted, metric, "z")
    assert P.shortcut_verdict(model, "attn_head_out") is True
    assert P.shortcut_verdict(model, "resid_pre") is None  # per component
    plain = P.patch_sweep(model, corrupted, P._source_cache(model, clean, [f"blocks.{l}.attn.hook_z" for l in range(2)]),
                          metric, "z", shortcuts=False)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fault", ["no prefix", "wrong prefix", "crash", "cache API error"])
def test_a_shortcut_that_disagrees_falls_back_to_transformer_lens_numbers(tiny_path, monkeypatch, fault):
    """Force the fast path to be wrong (as transformers 5.24 made it: copies ran with no cached
    prefix) or to crash: the sweep warns once, naming the versions, and returns TransformerLens'
    numbers; later sweeps on that model use the plain path without re-checking."""
    from transformer_lens import patching as tl_patching

    model = il.load_model(str(tiny_path), device="cpu")
    clean, corrupted = pair(model, n_pos=8, changed=(2, 5))
    metric = logit_diff_metric(model, clean, corrupted)
    real_prefix = P._prefix_cache

    def broken(kv_cache, start, n_pos, n_copies):
        if fault == "no prefix":
            return None
        if fault == "wrong prefix":  # off by one position
            return real_prefix(kv_cache, max(start - 1, 1), n_pos, n_copies) if start > 1 else None
        if fault == "cache API error":  # as transformers raises for an unsupported crop
            raise ValueError("Calling `crop` with a positive value is not supported")
        raise RuntimeError("cache API changed")

    monkeypatch.setattr(P, "_prefix_cache", broken)
    _, clean_cache = model.run_with_cache(clean)
    with torch.no_grad():
        expected = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
    with pytest.warns(P.ShortcutMismatchWarning, match=r"transformers \d.*transformer-lens \d") as caught:
        result = P.activation_patch(model, clean, corrupted, metric, "z")
    assert len(caught) == 1
    assert "fast path for attn_head_out" in str(caught[0].message)
    torch.testing.assert_close(result, expected.float(), atol=1e-4, rtol=0)
    assert P.shortcut_verdict(model, "z") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = P.activation_patch(model, clean, corrupted, metric, "z")
    torch.testing.assert_close(again, expected.float(), atol=1e-4, rtol=0)


def test_verify_true_rechecks_every_sweep(tiny_path, monkeypatch):
    model = il.load_model(str(tiny_path), device="cpu")
    clean, corrupted = pair(model, n_pos=8, changed=(2, 5))
    metric = logit_diff_metric(model, clean, corrupted)
    P.activation_patch(model, clean, corrupted, metric, "resid_pre")
    assert P.shortcut_verdict(model, "resid_pre") is True
    monkeypatch.setattr(P, "_prefix_cache", lambda *args: None)
    source = P._source_cache(model, clean, [f"blocks.{l}.hook_resid_pre" for l in range(2)])
    with pytest.warns(P.ShortcutMismatchWarning):
        P.patch_sweep(model, corrupted, source, metric, "resid_pre", verify=True)
    assert P.shortcut_verdict(model, "resid_pre") is False


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama with grouped-query attention (4 query heads, 2 key / value heads),
    RoPE and RMSNorm: SmolLM2's architecture at toy size."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(il.paths.data_dir() / "tokenizer-512" / name, path / name)
    return il.load_model(str(path), device="cpu")


def _plain_patch(model, clean, corrupted, metric, hook_name, index):
    """One cell the plain way: a full forward of ``corrupted`` with ``hook_name[:, *index]``
    taken from the clean run."""
    _, cache = model.run_with_cache(clean, names_filter=[hook_name])

    def patch(act, hook):
        act[(slice(None),) + index] = cache[hook_name][(slice(None),) + index]
        return act
    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, patch)])))


@pytest.mark.parametrize("component", ["attn_head_k", "attn_head_v"])
def test_grouped_key_value_heads_patch_like_plain_hooks(tiny_llama, component):
    """k / v hooks hold 2 key-value heads on this model, not 4: the sweep has 2 head entries and
    each equals a plain hook patch of that key-value head."""
    model = tiny_llama
    assert P.n_kv_heads(model) == 2 and model.cfg.n_heads == 4
    clean, corrupted = pair(model, batch=2, n_pos=6, changed=(1, 4))
    metric = logit_diff_metric(model, clean, corrupted)
    by_pos = P.activation_patch(model, clean, corrupted, metric, component)
    whole = P.activation_patch(model, clean, corrupted, metric, component, by_position=False)
    assert by_pos.shape == (2, 6, 2) and whole.shape == (2, 2)
    name = f"blocks.{{}}.attn.hook_{component[-1]}"
    for layer in range(2):
        for head in range(2):
            assert whole[layer, head] == pytest.approx(
                _plain_patch(model, clean, corrupted, metric, name.format(layer), (slice(None), head)), abs=1e-4)
            for pos in (1, 4, 5):
                assert by_pos[layer, pos, head] == pytest.approx(
                    _plain_patch(model, clean, corrupted, metric, name.format(layer), (pos, head)), abs=1e-4)
    assert by_pos[:, 0].abs().max() < 1e-6   # before the first corrupted token nothing can change
    with pytest.raises(ValueError, match="heads=.*the head axis has 2 entries"):
        P.activation_patch(model, clean, corrupted, metric, component, heads=[3])


@pytest.mark.parametrize("component,by_position", [c for c in TL_SWEEPS if c[0] not in ("attn_head_k", "attn_head_v")])
def test_query_side_components_equal_transformer_lens_on_a_grouped_query_llama(tiny_llama, component, by_position):
    clean, corrupted = pair(tiny_llama, batch=2, n_pos=6, changed=(1, 4))
    metric = logit_diff_metric(tiny_llama, clean, corrupted)
    ours = _assert_equals_transformer_lens(tiny_llama, clean, corrupted, metric, component, by_position)
    assert ours.abs().max() > 1e-3
