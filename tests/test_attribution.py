"""Top predictions, held-out loss, and the attention view used by the tour notebook."""

from __future__ import annotations

import math

import pytest
import torch

import interp_lib as il


def test_top_predictions_are_sorted_probabilities_of_the_next_token(toy_lm):
    table = il.attribution.top_predictions(toy_lm, "The function returns a list of", k=5)
    assert list(table.columns) == ["rank", "token", "token_id", "probability", "logit"]
    assert table["probability"].is_monotonic_decreasing and (table["probability"] <= 1).all()
    with torch.no_grad():
        probs = toy_lm(toy_lm.to_tokens("The function returns a list of"))[0, -1].softmax(-1)
    assert table["token_id"].iloc[0] == probs.argmax().item()
    assert table["probability"].iloc[0] == pytest.approx(probs.max().item(), rel=1e-5)


def test_top_predictions_bad_input(toy_lm):
    with pytest.raises(ValueError, match="k=0"):
        il.attribution.top_predictions(toy_lm, "abc", k=0)
    with pytest.raises(ValueError, match="position=99"):
        il.attribution.top_predictions(toy_lm, "abc", position=99)
    with pytest.raises(ValueError, match="text_or_tokens"):
        il.attribution.top_predictions(toy_lm, "")


@pytest.mark.oracle
def test_next_token_loss_matches_the_model_loss(toy_lm):
    windows = il.data.text_windows(toy_lm, il.data.load_corpus("validation"), 32, 10, seed=0)
    stats = il.attribution.next_token_loss(toy_lm, windows, batch_size=3)
    with torch.no_grad():
        expected = toy_lm(windows, return_type="loss").item()
    assert stats["loss"] == pytest.approx(expected, rel=1e-4)
    assert stats["n_tokens"] == 10 * 31
    assert 0 < stats["top1_accuracy"] < 1 and stats["loss"] < math.log(toy_lm.cfg.d_vocab)
    with pytest.raises(ValueError, match="tokens has shape"):
        il.attribution.next_token_loss(toy_lm, windows[0])


def test_attention_view_renders_the_layer_pattern(toy_2l):
    tokens, pattern = il.plots.attention_pattern(toy_2l, "a b c a b c", layer=0)
    assert pattern.shape == (toy_2l.cfg.n_heads, len(tokens), len(tokens))
    assert torch.allclose(pattern.sum(-1), torch.ones(pattern.shape[:2]))
    assert torch.all(pattern.triu(1) == 0)  # causal
    html = str(il.plots.attention_view(toy_2l, "a b c a b c", layer=1, heads=[0, 2]))
    assert "L1H0" in html and "L1H2" in html and "L1H1" not in html
    with pytest.raises(ValueError, match="layer=5"):
        il.plots.attention_view(toy_2l, "abc", layer=5)
    with pytest.raises(ValueError, match="heads="):
        il.plots.attention_view(toy_2l, "abc", layer=0, heads=[9])


def test_attention_view_takes_token_ids_as_they_are(toy_2l):
    # random tokens: the induction heads of toy-2l attend to the token after the earlier copy
    tokens = il.heads.repeat_probe_tokens(toy_2l, 12, 0, 1, seed=3)[0]
    words, pattern = il.plots.attention_pattern(toy_2l, tokens, layer=1)
    assert len(words) == len(tokens) == pattern.shape[-1]
    query = len(tokens) - 1                      # last token of the second copy
    assert pattern[0, query].argmax() == query - 12 + 1  # L1H0: the token after its first occurrence
    _, same = il.plots.attention_pattern(toy_2l, tokens[None], layer=1)
    assert torch.equal(pattern, same)
    with pytest.raises(ValueError, match="token ids must be in"):
        il.plots.attention_pattern(toy_2l, torch.tensor([0, 10**6]), layer=0)
    with pytest.raises(ValueError, match="expected a string or an integer token tensor"):
        il.plots.attention_pattern(toy_2l, torch.zeros(2, 3, dtype=torch.long), layer=0)
