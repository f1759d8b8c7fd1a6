"""The shipped toy models show the phenomena the notebooks and tests rely on.

toy-2l: a previous-token head in layer 0 feeding induction heads in layer 1, verified on
repeat lengths never seen in training, with ablation. toy-1l: no induction. toy-lm:
miscalibrated next-token confidence that temperature scaling repairs; position is linearly
recoverable from its residual stream. These fail if a rebuilt model lacks the science.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import interp_lib as il

pytestmark = pytest.mark.oracle  # the science the bundled models were built to show: also run on the newest versions

# Segment lengths never seen in training (training used 5..40; see training.json). Shorter
# unseen repeats (length 3) are not copied by toy-2l: data/PROVENANCE.md records that limit.
HELD_OUT_LENGTHS = (47, 53, 61)


@torch.no_grad()
def induction_profile(model, length: int, n: int = 32, seed: int = 0, ablate: list[tuple[int, int]] = ()):
    tokens = il.data.repeated_random_tokens(n, length, vocab_size=model.cfg.d_vocab, seed=seed)

    def zero_heads(z, hook):
        layer = int(hook.name.split(".")[1])
        for ablated_layer, head in ablate:
            if ablated_layer == layer:
                z[:, :, head] = 0.0
        return z

    hooks = [(f"blocks.{layer}.attn.hook_z", zero_heads) for layer in {layer for layer, _ in ablate}]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    if hooks:
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    queries = torch.arange(length + 1, 2 * length + 1)
    induction = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][:, :, queries, queries - length + 1]
                             .mean((0, 2)) for layer in range(model.cfg.n_layers)])
    every = torch.arange(2, 2 * length + 1)
    previous = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][:, :, every, every - 1].mean((0, 2))
                            for layer in range(model.cfg.n_layers)])
    return {"induction": induction, "previous": previous,
            "loss_first": nll[:, :length].mean().item(), "loss_second": nll[:, length:].mean().item()}


def induction_heads(profile, threshold=0.3):
    return [(int(l), int(h)) for l, h in zip(*torch.where(profile["induction"] > threshold))]


def test_training_record_states_the_held_out_lengths():
    record = json.loads((il.models.bundled_model_path("toy-2l") / "training.json").read_text())
    low, high = record["train_segment_lengths"]
    assert all(not low <= length <= high for length in HELD_OUT_LENGTHS)


@pytest.mark.parametrize("length", HELD_OUT_LENGTHS)
def test_toy_2l_has_induction_heads_in_layer_1_on_unseen_lengths(toy_2l, length):
    profile = induction_profile(toy_2l, length)
    heads = induction_heads(profile)
    assert heads, f"no head attends to the induction target: {profile['induction']}"
    assert all(layer == 1 for layer, _ in heads)
    assert profile["previous"][0].max() > 0.5, "layer 0 should hold a previous-token head"
    # in-context learning: the second copy is predicted far better than chance
    assert profile["loss_first"] > 5.0
    assert profile["loss_second"] < 1.5


def test_ablating_toy_2l_induction_heads_removes_the_in_context_drop(toy_2l):
    length = 47
    profile = induction_profile(toy_2l, length)
    heads = induction_heads(profile)
    ablated = induction_profile(toy_2l, length, ablate=heads)
    drop = profile["loss_first"] - profile["loss_second"]
    ablated_drop = ablated["loss_first"] - ablated["loss_second"]
    assert drop > 3.5
    assert ablated_drop < 0.3 * drop, (drop, ablated_drop)
    # ablating the same number of non-induction heads leaves the drop mostly intact
    others = [(1, h) for h in range(toy_2l.cfg.n_heads) if (1, h) not in heads][: len(heads)]
    if others:
        control = induction_profile(toy_2l, length, ablate=others)
        assert control["loss_first"] - control["loss_second"] > 0.5 * drop


@pytest.mark.parametrize("length", HELD_OUT_LENGTHS)
def test_toy_1l_has_no_induction_head(toy_1l, length):
    profile = induction_profile(toy_1l, length)
    assert profile["induction"].max() < 0.1
    # it may learn "tokens seen earlier are likely", but cannot copy the specific next token
    assert profile["loss_second"] > 2.0


@pytest.fixture(scope="module")
def toy_lm_heldout(toy_lm):
    windows = il.data.text_windows(toy_lm, il.data.load_corpus("test"), 64, 96, seed=0)
    with torch.no_grad():
        logits = torch.cat([toy_lm(windows[i:i + 32])[:, :-1] for i in range(0, len(windows), 32)])
    return logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1)


def reference_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    bins = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for low, high in zip(bins[:-1], bins[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return total


def test_toy_lm_is_miscalibrated_and_temperature_scaling_repairs_it(toy_lm_heldout):
    logits, targets = toy_lm_heldout
    half = len(targets) // 2

    def ece(scaled):
        probs = scaled.softmax(-1)
        confidence, prediction = probs.max(-1)
        return reference_ece(confidence.numpy(), (prediction == targets[half:]).numpy())

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits[:half] / log_t.exp(), targets[:half])
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = log_t.exp().item()
    before, after = ece(logits[half:]), ece(logits[half:] / temperature)
    assert before > 0.03, f"toy-lm should be measurably miscalibrated, ECE={before:.4f}"
    assert temperature > 1.05, "toy-lm is overconfident: the fitted temperature should exceed 1"
    assert after < 0.5 * before, (before, after, temperature)


def test_toy_lm_predicts_held_out_text(toy_lm_heldout):
    logits, targets = toy_lm_heldout
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    counts = torch.bincount(targets, minlength=logits.shape[-1]).double() + 1
    unigram = -(counts / counts.sum()).log()[targets].mean().item()  # optimistic: fit on the test set
    assert loss < unigram - 1.0, (loss, unigram)


def test_position_is_linearly_recoverable_from_toy_lm_residual_stream(toy_lm):
    from sklearn.linear_model import LogisticRegression

    windows = il.data.text_windows(toy_lm, il.data.load_corpus("validation"), 32, 160, seed=0)
    hooks = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")
    with torch.no_grad():
        _, cache = toy_lm.run_with_cache(windows, names_filter=lambda name: name in hooks)
    positions = np.broadcast_to(np.arange(1, 32), (len(windows), 31))
    chance = 1 / 31
    train, test = slice(0, 120), slice(120, 160)  # split by sequence: no leakage

    def probe_accuracy(acts, labels):
        flat = lambda part: acts[part].reshape(-1, acts.shape[-1])  # noqa: E731
        probe = LogisticRegression(max_iter=3000).fit(flat(train), labels[train].ravel())
        return probe.score(flat(test), positions[test].ravel())

    embedding = cache["blocks.0.hook_resid_pre"][:, 1:].numpy()  # skip BOS
    after_layer_0 = cache["blocks.0.hook_resid_post"][:, 1:].numpy()
    assert probe_accuracy(embedding, positions) > 0.6
    accuracy = probe_accuracy(after_layer_0, positions)
    assert accuracy > 5 * chance, f"layer-0 position probe accuracy {accuracy:.3f} (chance {chance:.3f})"
    # control task: the same probe on labels shuffled within each training sequence
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(row) for row in positions])
    assert probe_accuracy(after_layer_0, shuffled) < 2 * chance
