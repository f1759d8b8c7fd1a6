"""Bundled corpus and token batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import interp_lib as il
from interp_lib.paths import data_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(data_dir() / "tokenizer")


def test_corpus_splits_exist_and_share_no_paragraph():
    splits = {name: il.data.load_corpus(name) for name in il.data.BUNDLED_SPLITS}
    assert len(splits["train"]) > 1_000_000
    assert all(len(text) > 100_000 for text in splits.values())
    paragraphs = {name: {p for p in text.split("\n\n") if len(p) > 80} for name, text in splits.items()}
    assert not paragraphs["train"] & paragraphs["test"]
    assert not paragraphs["train"] & paragraphs["validation"]
    assert "def " in splits["code"] or ">>>" in splits["code"]
    with pytest.raises(ValueError, match="split='dev'"):
        il.data.load_corpus("dev")


def test_provenance_describes_every_bundled_item():
    provenance = (data_dir() / "PROVENANCE.md").read_text()
    for item in ("corpus", "tokenizer", "toy-lm", "toy-2l", "toy-1l", "licen"):
        assert item in provenance.lower()
    assert (data_dir() / "corpus" / "LICENSE-PSF.txt").is_file()


def test_text_windows_are_deduplicated_seeded_and_start_with_bos(tokenizer):
    text = "alpha beta gamma delta. " * 50 + il.data.load_corpus("validation")[:20_000]
    windows = il.data.text_windows(tokenizer, text, window_len=16, n_windows=50, seed=1)
    assert windows.shape == (50, 16)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert len({tuple(row.tolist()) for row in windows}) == len(windows)
    again = il.data.text_windows(tokenizer, text, window_len=16, n_windows=50, seed=1)
    other = il.data.text_windows(tokenizer, text, window_len=16, n_windows=50, seed=2)
    assert torch.equal(windows, again) and not torch.equal(windows, other)
    # the windows, joined, are the original text (no token lost inside a window)
    assert tokenizer.decode(windows[0, 1:]) in text


def test_text_windows_bad_input(tokenizer):
    with pytest.raises(ValueError, match="window_len"):
        il.data.text_windows(tokenizer, "some text", window_len=1)
    with pytest.raises(ValueError, match="too short"):
        il.data.text_windows(tokenizer, "tiny", window_len=64)
    with pytest.raises(ValueError, match="n_windows"):
        il.data.text_windows(tokenizer, "some text " * 100, window_len=8, n_windows=0)


def test_repeated_random_tokens():
    tokens = il.data.repeated_random_tokens(8, 10, vocab_size=50, n_repeats=3, seed=0, exclude=[7])
    assert tokens.shape == (8, 31)
    assert (tokens[:, 0] == 0).all()
    assert torch.equal(tokens[:, 1:11], tokens[:, 11:21]) and torch.equal(tokens[:, 1:11], tokens[:, 21:])
    assert ((tokens[:, 1:] >= 1) & (tokens[:, 1:] < 50) & (tokens[:, 1:] != 7)).all()
    with pytest.raises(ValueError, match="segment_length"):
        il.data.repeated_random_tokens(2, 0, vocab_size=50)


def test_load_texts_validates_dataset_name():
    assert il.data.load_texts("bundled", "test") == il.data.load_corpus("test")
    with pytest.raises(ValueError, match="dataset='imdb'"):
        il.data.load_texts("imdb")


def test_ioi_pairs_build_aligned_clean_and_abc_corrupted_prompts():
    model = il.load_model("toy-2l")
    # the toy tokenizer has no single-token person names: use single-token words as "names"
    words = [w for w in [" the", " of", " a", " in", " is", " for", " it", " be", " on", " by"]
             if model.to_tokens(w, prepend_bos=False).shape[-1] == 1]
    assert len(words) >= 5
    clean, corrupted, answer, wrong = il.data.ioi_pairs(model, 8, seed=1, names=words,
                                                        templates=["When{A} and{B} met,{S} wrote to"])
    assert clean.shape == corrupted.shape and clean.shape[0] == len(answer) == len(wrong) > 0
    for row in range(len(clean)):
        ids = clean[row].tolist()
        assert int(answer[row]) in ids and int(wrong[row]) in ids and answer[row] != wrong[row]
        assert ids.count(int(wrong[row])) >= 2          # the subject is named twice (ABB / BAB)
        assert int(answer[row]) not in corrupted[row].tolist()  # ABC: other names everywhere
    with pytest.raises(ValueError, match="single-token names"):
        il.data.ioi_pairs(model, 4, names=[" Zyxwvut", " Qqqqqq"])
    with pytest.raises(ValueError, match="n_prompts"):
        il.data.ioi_pairs(model, 0)
