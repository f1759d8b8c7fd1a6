"""load_model: bundled names, local directories, hub names offline, bad input."""

from __future__ import annotations

import time

import pytest
import torch

import interp_lib as il
from interp_lib.models import BUNDLED_MODELS, ModelLoadError, resolve_dtype, select_device

pytestmark = pytest.mark.oracle  # compares with TransformerLens / Hugging Face: also run on the newest versions


def test_bundled_models_load_as_transformer_bridge(toy_lm, toy_2l, toy_1l):
    from transformer_lens.model_bridge import TransformerBridge

    for model, n_layers in ((toy_lm, 4), (toy_2l, 2), (toy_1l, 1)):
        assert isinstance(model, TransformerBridge)
        assert model.cfg.n_layers == n_layers
        logits, cache = model.run_with_cache("The function returns a list.")
        assert logits.shape[-1] == model.cfg.d_vocab
        assert "blocks.0.attn.hook_pattern" in cache and "blocks.0.attn.hook_z" in cache
        pattern = cache["blocks.0.attn.hook_pattern"][0]
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_local_directory_takes_the_same_path_and_matches_hf(toy_lm):
    from transformers import AutoModelForCausalLM

    path = il.models.bundled_model_path("toy-lm")
    from_dir = il.load_model(str(path), device="cpu")
    tokens = toy_lm.to_tokens("Returns the number of items in the list.")
    torch.testing.assert_close(from_dir(tokens), toy_lm(tokens))
    # Compatibility mode centres the unembedding: logits shift per position, probabilities don't.
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_probs = hf(tokens).logits.softmax(-1)
    torch.testing.assert_close(toy_lm(tokens).softmax(-1), hf_probs, atol=1e-5, rtol=1e-4)


def test_raw_numerics_without_compatibility_mode_match_hf():
    from transformers import AutoModelForCausalLM

    path = il.models.bundled_model_path("toy-2l")
    raw = il.load_model("toy-2l", device="cpu", compatibility_mode=False)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokens = raw.to_tokens("x = [1, 2, 3]")
    with torch.no_grad():
        torch.testing.assert_close(raw(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_unknown_name_lists_bundled_models():
    with pytest.raises(ValueError) as error:
        il.load_model("toy-9l")
    message = str(error.value)
    assert "toy-9l" in message
    for name in BUNDLED_MODELS:
        assert name in message


def test_path_that_is_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a model directory"):
        il.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="not a model directory"):
        il.load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="no such directory"):
        il.load_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_name_without_network_fails_fast_with_advice(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    if offline == "0" and il.models._hub_reachable(timeout=2):
        pytest.skip("this machine reaches the hub; the offline error cannot be observed")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        il.load_model("gpt2")
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "'gpt2'" in message and "cache" in message and "toy-lm" in message


def test_device_and_dtype_validation():
    assert select_device(None).type in {"cpu", "cuda", "mps"}
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='banana'"):
        select_device("banana")
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="dtype='float8'"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


def test_half_precision_load():
    model = il.load_model("toy-1l", device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(model(model.to_tokens("abc")).float()).all()


@pytest.mark.parametrize("name", ["toy-lm", "toy-2l"])
def test_generate_with_the_kv_cache_equals_plain_greedy_decoding(name, toy_lm, toy_2l):
    """TransformerBridge.generate decodes on its KV cache; under transformers 5.x that cache never
    reached the bridge's attention and generation went wrong after the first new token. Models
    from il.load_model hand it on, so generate equals greedy decoding with plain forward passes."""
    model = {"toy-lm": toy_lm, "toy-2l": toy_2l}[name]
    prompt = model.to_tokens("The function returns a list of") if name == "toy-lm" else \
        torch.tensor([[0, 17, 42, 99, 5, 17, 42]])
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False)
    assert generated.tolist() == tokens.tolist()


def test_load_time_kv_cache_check_catches_a_cache_the_attention_cannot_see():
    """Plant the upstream fault (the attention never sees the cache): the check that load_model
    runs reports the difference and warns with the versions; without the fault it agrees."""
    from importlib import metadata

    from interp_lib.models import KVCacheWarning, check_kv_cache, kv_cache_agrees

    model = il.load_model("toy-2l", device="cpu")
    assert kv_cache_agrees(model)[0]

    def hide_cache(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    handles = [block.attn.register_forward_pre_hook(hide_cache, with_kwargs=True) for block in model.blocks]
    agrees, difference = kv_cache_agrees(model)
    assert not agrees and difference > 1e-2
    with pytest.warns(KVCacheWarning, match=f"transformers {metadata.version('transformers')}"):
        assert check_kv_cache(model) is False
    for handle in handles:
        handle.remove()
    assert kv_cache_agrees(model)[0]
