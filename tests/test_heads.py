"""interp_lib.heads: head scores, dynamic-threshold detection, P/R/F1, ablation, QK / OV circuits,
composition, head families. The science is checked on the bundled toy models (data/PROVENANCE.md:
toy-2l has previous-token head L0H2 and induction heads L1H0-L1H2; toy-1l has none)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import interp_lib as il
from interp_lib import heads as H

# scores are checked against TransformerLens (head_detector, composition scores): also run on the newest versions
pytestmark = pytest.mark.oracle

TOY_2L_INDUCTION = {(1, 0), (1, 1), (1, 2)}
TOY_2L_PREVIOUS = (0, 2)


@pytest.fixture(scope="module")
def toy_2l_induction(toy_2l):
    scores = H.head_scores(toy_2l, "induction")
    return scores, H.detect_heads(toy_2l, "induction", scores=scores)


# ------------------------------------------------------------------------ must show

def test_toy_2l_induction_heads_are_in_layer_1_and_match_ground_truth(toy_2l_induction):
    scores, detection = toy_2l_induction
    assert scores.shape == (2, 4)
    found = detection.head_set()
    assert found and all(layer == 1 for layer, _ in found)
    assert found == TOY_2L_INDUCTION == set(H.known_heads("toy-2l", "induction"))
    assert H.precision_recall_f1(detection, H.known_heads("toy-2l", "induction"))["f1"] == 1.0
    # the contract: an iterable of (layer, head, score) triples above the threshold
    for layer, head, score in detection:
        assert score > detection.threshold
        assert score == pytest.approx(float(scores[layer, head]))


def test_ablating_detected_induction_heads_removes_the_in_context_loss_drop(toy_2l, toy_2l_induction):
    _, detection = toy_2l_induction
    effects = H.ablation_effects(toy_2l, [(l, h) for l, h, _ in detection], length=47, n_sequences=16)
    clean = effects["clean_drop"].iloc[0]
    assert clean > 3.5  # second copy predicted far better than the first
    together = effects[effects["n_heads"] == len(detection)].iloc[0]
    assert together["drop"] < 0.3 * clean
    # per head: each single ablation hurts, none alone removes the drop (they are redundant)
    single = effects[effects["n_heads"] == 1]
    assert len(single) == len(detection)
    assert (single["fraction_removed"] > 0.0).all() and (single["fraction_removed"] < 0.9).all()
    # control: ablating the same number of non-induction heads leaves the drop mostly intact
    control = H.icl_loss_drop(toy_2l, [(0, 0), (0, 1), (1, 3)], length=47, n_sequences=16)
    assert control["drop"] > 0.5 * clean


def test_toy_1l_has_no_induction_heads(toy_1l):
    detection = H.detect_heads(toy_1l, "induction")
    assert len(detection) == 0
    assert H.head_scores(toy_1l, "induction").max() < 0.05
    assert H.precision_recall_f1(detection, H.known_heads("toy-1l", "induction"))["f1"] == 1.0


def _fixed_offset_hook(head: int, offset: int):
    """Replace one head's attention by 'attend exactly `offset` tokens back' (BOS if none)."""
    def hook(pattern, hook):
        n = pattern.shape[-1]
        queries = torch.arange(n)
        out = pattern.clone()
        out[:, head] = 0.0
        out[:, head, queries, (queries - offset).clamp_min(0)] = 1.0
        return out
    return hook


def test_a_fixed_offset_head_is_not_called_an_induction_head(toy_2l):
    # L1H3 made to attend 46 tokens back: exactly the induction target for repeats of length 47
    with toy_2l.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", _fixed_offset_hook(3, 46))]):
        naive = H.head_scores(toy_2l, "induction", repeat_lengths=[47])
        robust = H.head_scores(toy_2l, "induction")
        detection = H.detect_heads(toy_2l, "induction", scores=robust)
    assert naive[1, 3] > 0.99  # a single-length score would rank it first
    assert robust[1, 3] < 0.05
    assert (1, 3) not in detection.head_set()
    assert detection.head_set() == TOY_2L_INDUCTION
    # the hook was removed with the context: the real L1H3 is back
    assert H.head_scores(toy_2l, "induction", repeat_lengths=[47])[1, 3] < 0.05


# ------------------------------------------------------------------------ short contexts

ADAPTED_128 = [11, 23, 47, 60]  # 61 needs 1 + 7 + 2 * 61 = 130 positions with offset 7


@pytest.fixture(scope="module")
def tiny_128(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 (4 heads, vocab 512) with a 128-token context."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2-128")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=128,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(il.paths.data_dir() / "tokenizer-512" / name, path / name)
    return il.load_model(str(path), device="cpu")


@pytest.fixture(scope="module")
def toy_2l_128(tmp_path_factory):
    """toy-2l with its position table cut to the first 128 rows (it was trained on 128-token
    sequences): the same forward pass on any sequence of at most 128 tokens."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("toy-2l-128") / "toy-2l-128"
    shutil.copytree(il.paths.data_dir() / "models" / "toy-2l", path)
    config = json.loads((path / "config.json").read_text())
    config["n_positions"] = 128
    (path / "config.json").write_text(json.dumps(config))
    weights = load_file(path / "model.safetensors")
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][:128].contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return il.load_model(str(path), device="cpu")


def _uniform_hook(pattern, hook):
    """Every head attends uniformly to all keys it may see."""
    causal = torch.tril(torch.ones(pattern.shape[-2:], dtype=pattern.dtype, device=pattern.device))
    return (causal / causal.sum(-1, keepdim=True)).expand_as(pattern).clone()


def test_default_repeat_lengths_fit_a_128_token_context_and_say_so(tiny_128, toy_2l):
    assert tiny_128.cfg.n_ctx == 128
    with pytest.warns(UserWarning, match=r"61 shrunk to 60; using \[11, 23, 47, 60\]") as caught:
        scores = H.head_scores(tiny_128, "induction", n_sequences=2)
    assert scores.shape == (2, 4) and len(caught) == 1 and caught[0].filename == __file__
    with pytest.warns(UserWarning, match="61 shrunk to 60") as caught:
        detection = H.detect_heads(tiny_128, "duplicate_token", n_sequences=2)
    assert len(caught) == 1  # scores and floor share one resolution of the lengths
    assert detection.repeat_lengths == ADAPTED_128
    assert H.Detection.from_dict(json.loads(json.dumps(detection.to_dict()))) == detection
    with pytest.warns(UserWarning, match="61 shrunk to 60"):
        assert H.head_scores_by_length(tiny_128, "induction", n_sequences=2).shape == (4, 2, 4)
    # offsets change what fits: 47 shrinks to (128 - 1 - 70) // 2 = 28 and 61 then repeats it
    with pytest.warns(UserWarning, match=r"47 shrunk to 28, 61 dropped; using \[11, 23, 28\]"):
        assert H.resolve_repeat_lengths(tiny_128, offsets=(0, 70)) == (11, 23, 28)
    # a model whose context fits the defaults (toy-2l: 256 positions) keeps them, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert H.resolve_repeat_lengths(toy_2l) == H.DEFAULT_REPEAT_LENGTHS


def test_too_short_context_and_explicit_lengths_that_do_not_fit_raise(tiny_128):
    with pytest.raises(ValueError) as error:
        H.head_scores(tiny_128, "induction", repeat_lengths=[11, 61])
    assert str(error.value) == ("repeat_lengths=[11, 61]: repeat length 61 with offset 7 needs 130 positions; "
                                "the model's context is 128")
    with pytest.raises(ValueError, match="needs 130 positions"):
        H.chance_score(tiny_128, "induction", repeat_lengths=[61])
    # with a 110-token prefix only one length fits ((128 - 111) // 2 = 8): no several-lengths rule
    with pytest.raises(ValueError) as error:
        H.detect_heads(tiny_128, "induction", offsets=(0, 110))
    message = str(error.value)
    assert "\n" not in message and "too short" in message and "context (128 positions)" in message
    assert "need at least 135 positions" in message  # 1 + 110 + 2 * 12: lengths 11 and 12


def test_chance_floor_uses_the_adapted_lengths(tiny_128):
    # oracle: heads that attend uniformly score exactly chance; chance_score is the highest
    # per-length value of such a head on the same probes
    hooks = [(f"blocks.{layer}.attn.hook_pattern", _uniform_hook) for layer in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tiny_128.hooks(fwd_hooks=hooks):
            by_length = H.head_scores_by_length(tiny_128, "induction", n_sequences=2)
            detection = H.detect_heads(tiny_128, "induction", n_sequences=2)
        chance = H.chance_score(tiny_128, "induction")
    torch.testing.assert_close(by_length, by_length[:, :1, :1].expand_as(by_length))  # all heads alike
    assert chance == pytest.approx(float(by_length[:, 0, 0].max()), rel=1e-5)
    assert chance == pytest.approx(H.chance_score(tiny_128, "induction", repeat_lengths=ADAPTED_128))
    assert detection.floor == pytest.approx(max(2 * chance, 0.1)) and len(detection) == 0


def test_toy_2l_induction_heads_found_with_a_128_token_context(toy_2l, toy_2l_128):
    with pytest.warns(UserWarning, match="61 shrunk to 60"):
        scores = H.head_scores(toy_2l_128, "induction")
        detection = H.detect_heads(toy_2l_128, "induction", scores=scores)
    assert detection.head_set() == TOY_2L_INDUCTION == set(H.known_heads("toy-2l", "induction"))
    assert detection.repeat_lengths == ADAPTED_128
    # the same probes on the full 256-position model give the same scores
    torch.testing.assert_close(scores, H.head_scores(toy_2l, "induction", repeat_lengths=ADAPTED_128))
    # the several-lengths rule still rejects a head fixed at the longest adapted length's target
    with toy_2l_128.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", _fixed_offset_hook(3, 59))]):
        naive = H.head_scores(toy_2l_128, "induction", repeat_lengths=[60])
        with pytest.warns(UserWarning, match="61 shrunk to 60"):
            robust = H.detect_heads(toy_2l_128, "induction")
    assert naive[1, 3] > 0.99
    assert robust.head_set() == TOY_2L_INDUCTION


def test_k_composition_from_previous_token_head_to_induction_heads_is_among_the_highest(toy_2l):
    frame = H.composition_frame(toy_2l, "K")
    pairs = frame[(frame["source"] == "L0H2") & frame["target"].isin([f"L1H{h}" for _, h in TOY_2L_INDUCTION])]
    assert len(pairs) == 3
    assert (pairs["rank"] <= 4).all(), frame.head(6)  # top quarter of the 16 layer-0 -> layer-1 pairs
    scores = H.composition_scores(toy_2l, "K")
    for _, head in TOY_2L_INDUCTION:  # for every induction head, L0H2 is its strongest K source
        assert int(scores[0, :, 1, head].argmax()) == TOY_2L_PREVIOUS[1]


def test_composition_scores_equal_transformer_lens(toy_2l):
    for mode in "QKV":
        ours = H.composition_scores(toy_2l, mode)
        reference = toy_2l.all_composition_scores(mode)
        reference = getattr(reference, "scores", reference).detach().cpu()
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", H.KINDS)
@pytest.mark.parametrize("exclude_bos,exclude_current", [(False, False), (True, False), (True, True)])
def test_detector_scores_equal_transformer_lens_head_detector(toy_2l, kind, exclude_bos, exclude_current):
    # detect_head runs on a TransformerBridge: compare with it directly, on natural text
    from transformer_lens.head_detector import detect_head

    text = il.data.load_corpus("validation")[:300]
    expected = detect_head(toy_2l, text, f"{kind}_head", exclude_bos=exclude_bos,
                           exclude_current_token=exclude_current)
    ours = H.detector_scores(toy_2l, toy_2l.to_tokens(text), kind, exclude_bos, exclude_current)
    torch.testing.assert_close(ours, expected.float(), atol=1e-6, rtol=1e-5)


def test_detector_scores_average_over_prompts_like_head_detector(toy_2l):
    from transformer_lens.head_detector import detect_head

    corpus = il.data.load_corpus("validation")
    texts = [corpus[:200], corpus[200:450]]
    expected = detect_head(toy_2l, texts, "induction_head", exclude_bos=True)
    ours = torch.stack([H.detector_scores(toy_2l, toy_2l.to_tokens(t), "induction", True) for t in texts]).mean(0)
    torch.testing.assert_close(ours, expected.float(), atol=1e-6, rtol=1e-5)


def test_previous_token_score_is_the_head_detector_diagonal(toy_2l):
    # with BOS excluded from queries and keys, our previous-token score is the mean of the
    # detector's diagonal; on one sequence they rank the same head first
    text = il.data.load_corpus("validation")[:300]
    tokens = toy_2l.to_tokens(text)
    ours = H.head_scores(toy_2l, "previous_token", tokens=tokens)
    patterns = H.attention_patterns(toy_2l, tokens)
    q = torch.arange(2, tokens.shape[1])
    torch.testing.assert_close(ours, patterns[..., q, q - 1].mean((1, 3)))
    assert divmod(int(ours.argmax()), 4) == TOY_2L_PREVIOUS


# ------------------------------------------------------------------------ other behaviour

def test_previous_token_head_detected_on_natural_text(toy_2l):
    scores = H.head_scores(toy_2l, "previous_token", n_sequences=16, dataset="bundled")
    detection = H.detect_heads(toy_2l, "previous_token", scores=scores)
    assert TOY_2L_PREVIOUS in detection.head_set()
    assert detection[0][:2] == TOY_2L_PREVIOUS
    metrics = H.precision_recall_f1(detection, H.known_heads("toy-2l", "previous_token"))
    assert metrics["recall"] == 1.0


def test_scores_do_not_depend_on_call_order_or_mutate_patterns(toy_2l):
    tokens = H.repeat_probe_tokens(toy_2l, 20, 0, 4)
    first = H.attention_patterns(toy_2l, tokens)
    H.head_scores(toy_2l, "induction", repeat_lengths=[20], offsets=[0], n_sequences=4, exclude_bos=True)
    torch.testing.assert_close(H.attention_patterns(toy_2l, tokens), first)
    torch.testing.assert_close(first.sum(-1), torch.ones_like(first.sum(-1)))


def test_dynamic_threshold_rules():
    scores = torch.tensor([[0.01, 0.02, 0.015, 0.03], [0.8, 0.75, 0.02, 0.01]])
    # mean + k*std is inflated by the outliers themselves (k=1 here); the robust z-score is not
    for rule, k in (("robust_z", 3.5), ("mean_std", 1.0), ("largest_gap", 1.0)):
        threshold = H.dynamic_threshold(scores, rule, k=k)
        assert 0.03 < threshold < 0.75, rule
    assert H.dynamic_threshold(torch.full((2, 4), 0.01), floor=0.2) == 0.2
    detection = H.detect_from_scores(scores, "induction")
    assert [d[:2] for d in detection] == [(1, 0), (1, 1)]
    assert H.Detection.from_dict(detection.to_dict()) == detection


def test_precision_recall_f1():
    metrics = H.precision_recall_f1([(1, 0, 0.9), (1, 3, 0.4)], [(1, 0), (1, 1)])
    assert metrics["precision"] == 0.5 and metrics["recall"] == 0.5 and metrics["f1"] == 0.5
    assert H.precision_recall_f1([], [(0, 1)])["f1"] == 0.0
    assert H.precision_recall_f1([], [])["f1"] == 1.0


def test_gpt2_small_ground_truth_table():
    table = H.known_heads("gpt2")
    assert set(table["induction"]) == {(5, 1), (5, 5), (6, 9), (7, 2), (7, 10)}
    assert set(table["previous_token"]) == {(4, 11), (2, 2)}
    assert set(table["duplicate_token"]) == {(0, 1), (0, 10), (3, 0)}
    # the IOI circuit's classes (Wang et al. 2022) are roles too
    assert set(H.known_heads("gpt2", "name mover")) == {(9, 9), (9, 6), (10, 0)}
    assert {"s2 inhibition", "negative name mover", "backup name mover"} <= set(table)


def test_qk_and_ov_circuits(toy_2l):
    full = H.full_qk_circuit(toy_2l, 1, 0)
    assert full.shape == (512, 512)
    positional = H.positional_qk_circuit(toy_2l, *TOY_2L_PREVIOUS, n_positions=120)
    queries = torch.arange(10, 120)
    # the previous-token head's positional QK circuit peaks at the previous position
    assert (positional[queries].argmax(-1) == queries - 1).float().mean() > 0.7
    copying = H.ov_copying_score(toy_2l)
    assert copying.shape == (2, 4)
    assert all(copying[layer, head] > 0.9 for layer, head in TOY_2L_INDUCTION)  # induction heads copy
    tokens = H.repeat_probe_tokens(toy_2l, 10, 0, 2)
    interaction = H.qk_interaction(toy_2l, tokens, 1, 0, query_position=15)
    assert interaction.shape == (2, 21)
    assert torch.isinf(interaction[:, 16:]).all()
    assert (interaction[:, :16].argmax(-1) == 15 - 9).all()  # the induction target


def test_head_families_separate_induction_and_previous_token_heads(toy_2l):
    families = H.head_families(H.attention_statistics(toy_2l, n_sequences=8))
    assert tuple(families.columns[:4]) == il.units.UNIT_COLUMNS and (families["kind"] == "head").all()
    assert (families["unit"] == [il.units.Head(l, i).label for l, i in zip(families["layer"], families["index"])]).all()
    by_head = dict(zip(families["unit"], families["family_name"]))
    assert {by_head[f"L1H{h}"] for _, h in TOY_2L_INDUCTION} == {"induction"}
    assert by_head["L0H2"] == "previous_token"
    assert len(families[families["family_name"] == "induction"]) == 3
    table = H.families_table(families)
    assert set(table.columns) >= {"family_name", "members", *H.STAT_NAMES}
    induction = table[table["family_name"] == "induction"]
    assert induction["members"].iloc[0] == ", ".join(f"L1H{h}" for _, h in sorted(TOY_2L_INDUCTION))


# ------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("call, words", [
    (lambda m: H.head_scores(m, "inductoin"), ["kind", "inductoin"]),
    (lambda m: H.head_scores(m, "induction", repeat_lengths=[]), ["repeat_lengths"]),
    (lambda m: H.head_scores(m, "induction", repeat_lengths=[200]), ["repeat_lengths=[200]", "repeat length 200",
                                                                       "needs 408 positions", "context is 256"]),
    (lambda m: H.attention_patterns(m, torch.zeros(1, 5, dtype=torch.long), layers=[5]), ["layers=[5]", "[0, 1]"]),
    (lambda m: H.attention_patterns(m, torch.zeros(1, 5, dtype=torch.long), layers=[-1]), ["layers=[-1]", "[0, 1]"]),
    (lambda m: H.attention_patterns(m, torch.zeros(1, 5, dtype=torch.long), layers=1), ["layers=1", "[0, 1]"]),
    (lambda m: H.head_scores(m, "induction", n_sequences=0), ["n_sequences"]),
    (lambda m: H.head_scores(m, "previous_token", seq_len=1), ["seq_len"]),
    (lambda m: H.head_scores(m, "induction", tokens=torch.zeros(1, 5, dtype=torch.long)), ["tokens", "kind"]),
    (lambda m: H.detect_heads(m, "induction", scores=torch.zeros(2, 4), rule="magic"), ["rule", "magic"]),
    (lambda m: H.detect_heads(m, "induction", scores=torch.zeros(2, 4), k=-1), ["k=-1"]),
    (lambda m: H.detect_from_scores(torch.zeros(8)), ["scores", "n_layers, n_heads"]),
    (lambda m: H.icl_loss_drop(m, ["L7H0"]), ["L7H0", "layer"]),
    (lambda m: H.icl_loss_drop(m, [(1, 0)], method="median"), ["method", "median"]),
    (lambda m: H.composition_scores(m, "X"), ["mode", "'X'"]),
    (lambda m: H.known_heads("gpt9"), ["model_name", "gpt9"]),
    (lambda m: H.qk_interaction(m, torch.zeros(1, 5, dtype=torch.long), 0, 0, query_position=9), ["query_position"]),
    (lambda m: H.head_families(__import__("pandas").DataFrame({"bos": [0.1]})), ["stats", "attention_statistics"]),
])
def test_bad_inputs_raise_value_error_naming_the_argument(toy_2l, call, words):
    with pytest.raises(ValueError) as error:
        call(toy_2l)
    for word in words:
        assert word in str(error.value)


def test_one_layer_model_has_no_composition_pairs(toy_1l):
    assert H.composition_frame(toy_1l, "K").empty
    assert H.composition_scores(toy_1l, "K").abs().sum() == 0


# ------------------------------------------------------------------------ grouped-query attention, RoPE

from test_patching_oracle import tiny_llama  # noqa: E402,F401 - fixture: 2 layers, 4 query heads, 2 kv heads, RoPE


def _attn_inputs(model, layer, n_pos=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.cfg.d_vocab, (2, n_pos), generator=generator)
    tokens[:, 0] = 0
    _, cache = model.run_with_cache(tokens)
    return tokens, cache, cache[f"blocks.{layer}.ln1.hook_normalized"]


@pytest.mark.parametrize("layer", [0, 1])
def test_circuits_use_the_key_value_head_each_query_head_reads(tiny_llama, layer):
    model = tiny_llama
    assert model.W_K.shape[1] == model.cfg.n_key_value_heads == 2 and model.cfg.n_heads == 4
    assert [H.kv_head(model, h) for h in range(4)] == [0, 0, 1, 1]
    _, cache, x = _attn_inputs(model, layer)
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
    q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
    attn_out = torch.zeros_like(cache[f"blocks.{layer}.hook_attn_out"])
    for head in range(4):
        with torch.no_grad():
            # QK: the un-rotated bilinear form equals hook_q . hook_k of the shared key head
            bilinear = (x @ H.qk_circuit(model, layer, head).AB @ x.transpose(1, 2))
            torch.testing.assert_close(bilinear, q[:, :, head] @ k[:, :, head // 2].transpose(1, 2),
                                       atol=1e-5, rtol=1e-4)
            # at equal positions the rotation cancels: the diagonal of the real scores
            scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][:, head]
            torch.testing.assert_close(bilinear.diagonal(dim1=1, dim2=2) / 4.0, scores.diagonal(dim1=1, dim2=2),
                                       atol=1e-5, rtol=1e-4)
            attn_out += pattern[:, head] @ (x @ H.ov_circuit(model, layer, head).AB)
    # OV: the heads' pattern-weighted OV outputs add up to the attention block's output
    torch.testing.assert_close(attn_out, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=1e-4)


def test_full_qk_and_copying_score_on_a_grouped_query_model(tiny_llama):
    model = tiny_llama
    with torch.no_grad():
        W_E, W_U = model.W_E.double(), model.W_U.double()
        for layer, head in [(0, 1), (1, 3)]:
            kv = head // 2
            expected = W_E @ model.W_Q[layer, head].double() @ model.W_K[layer, kv].T.double() @ W_E.T / 4.0
            torch.testing.assert_close(H.full_qk_circuit(model, layer, head), expected.float(), atol=1e-5, rtol=1e-4)
            eig = torch.linalg.eigvals(W_E @ model.W_V[layer, kv].double() @ model.W_O[layer, head].double() @ W_U)
            assert H.ov_copying_score(model, layer, head) == pytest.approx(float(eig.real.sum() / eig.abs().sum()),
                                                                           abs=1e-4)
    assert H.ov_copying_score(model).shape == (2, 4)


def _pairwise_composition(model, mode):
    """Elhage et al.'s score one pair at a time from FactoredMatrix circuits (the oracle)."""
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_layers, model.cfg.n_heads)
    for la in range(model.cfg.n_layers):
        for ha in range(model.cfg.n_heads):
            ov_a = H.ov_circuit(model, la, ha)
            for lb in range(la + 1, model.cfg.n_layers):
                for hb in range(model.cfg.n_heads):
                    m_b = {"Q": H.qk_circuit(model, lb, hb), "K": H.qk_circuit(model, lb, hb).T,
                           "V": H.ov_circuit(model, lb, hb)}[mode]
                    out[la, ha, lb, hb] = float((ov_a @ m_b).norm() / (ov_a.norm() * m_b.norm()))
    return out


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_on_grouped_query_attention_equal_pairwise_circuits(tiny_llama, mode):
    with torch.no_grad():
        expected = _pairwise_composition(tiny_llama, mode)
    ours = H.composition_scores(tiny_llama, mode)
    assert ours.shape == (2, 4, 2, 4)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert ours[0, :, 1].min() > 0  # every layer-0 -> layer-1 pair is scored


@pytest.mark.parametrize("model_name", ["toy_2l", "tiny_llama"])
def test_qk_interaction_equals_the_attention_score_hook(model_name, request):
    model = request.getfixturevalue(model_name)
    tokens, cache, _ = _attn_inputs(model, 1, n_pos=12)
    for head in range(model.cfg.n_heads):
        for query_position in (5, -1):
            ours = H.qk_interaction(model, tokens, 1, head, query_position=query_position)
            expected = cache["blocks.1.attn.hook_attn_scores"][:, head, query_position].float()
            finite = torch.isfinite(expected)
            assert torch.equal(torch.isfinite(ours), finite)
            torch.testing.assert_close(ours[finite], expected[finite], atol=1e-5, rtol=1e-4)


def test_positional_qk_circuit_on_a_rotary_model_is_a_one_line_value_error(tiny_llama):
    with pytest.raises(ValueError) as error:
        H.positional_qk_circuit(tiny_llama, 0, 0)
    message = str(error.value)
    assert "\n" not in message and "rotary" in message and "qk_interaction" in message


def test_induction_pvalues_find_the_planted_heads_with_fdr_control(toy_2l, toy_1l):
    """Planted truth: toy-2l's induction heads are L1H0-L1H2 (verified by ablation); toy-1l cannot
    form any. The paired test against a non-repeating control at the same positions, with
    Benjamini-Hochberg over all heads, must find exactly those."""
    from scipy import stats as scipy_stats

    from interp_lib import stats

    frame = H.induction_pvalues(toy_2l, n_sequences=16)
    assert sorted(frame.loc[frame["significant"], "unit"]) == ["L1H0", "L1H1", "L1H2"]
    assert tuple(frame.columns[:4]) == il.units.UNIT_COLUMNS
    assert not H.induction_pvalues(toy_1l, n_sequences=16)["significant"].any()
    # the adjusted p-values are BH's of the raw ones (oracle: scipy)
    assert frame["adjusted"].to_numpy() == pytest.approx(scipy_stats.false_discovery_control(frame["pvalue"]))
    adjusted, _ = stats.benjamini_hochberg(frame["pvalue"])
    assert frame["adjusted"].to_numpy() == pytest.approx(adjusted)
    with pytest.raises(ValueError, match="n_sequences=2"):
        H.induction_pvalues(toy_2l, n_sequences=2)
