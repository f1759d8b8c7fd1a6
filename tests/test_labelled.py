"""Bundled labelled sets (data/labelled/) and il.data.load_labelled: the cloze set's promises
(single-token options, the true next word, balanced answers), reproducibility of its builder, the
tokenizer filter, and the SST-2 path through ``datasets`` (stubbed: no hub here)."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import interp_lib as il
from interp_lib.paths import data_dir, repo_root


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(data_dir() / "tokenizer")


@pytest.fixture(scope="module")
def cloze():
    return il.data.load_labelled("cloze")


def test_cloze_items_are_four_way_single_token_questions(cloze, tokenizer):
    assert len(cloze) == 400 and len({item["id"] for item in cloze}) == 400
    for item in cloze:
        assert set(item) == {"id", "prompt", "options", "label", "answer"}
        options = item["options"]
        assert len(options) == 4 and len(set(options)) == 4
        assert options[item["label"]] == item["answer"]
        for option in options:
            assert option.startswith(" ") and option[1:].isalpha() and option[1:].islower()
            assert len(tokenizer(option, add_special_tokens=False)["input_ids"]) == 1, option
        assert 40 <= len(item["prompt"]) <= 100 and not item["prompt"].endswith(" ")
    # a constant guess scores exactly chance
    assert collections.Counter(item["label"] for item in cloze) == {0: 100, 1: 100, 2: 100, 3: 100}


def test_cloze_answers_are_the_true_next_word_of_held_out_text(cloze):
    test_text = il.data.load_corpus("test")
    train_text = il.data.load_corpus("train")
    for item in cloze:
        assert item["prompt"] + item["answer"] in test_text, item["id"]
    # prompts come from held-out documents (the corpus is split by document)
    assert sum(item["prompt"] in train_text for item in cloze) <= 4  # boilerplate phrases may recur


def test_cloze_builder_is_reproducible(tmp_path):
    root = repo_root()
    if root is None:
        pytest.skip("needs a source checkout (scripts/)")
    subprocess.run([sys.executable, str(root / "scripts" / "build_labelled_sets.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    assert (tmp_path / "cloze.jsonl").read_bytes() == (data_dir() / "labelled" / "cloze.jsonl").read_bytes()


def test_tokenizer_filter_and_n(cloze):
    # the 512-token tokenizer splits many words: only items whose options stay single tokens are kept
    small = AutoTokenizer.from_pretrained(data_dir() / "tokenizer-512")
    kept = il.data.load_labelled("cloze", tokenizer=small)
    assert 0 < len(kept) < len(cloze)
    for item in kept:
        assert all(len(small(o, add_special_tokens=False)["input_ids"]) == 1 for o in item["options"])
    assert il.data.load_labelled("cloze", tokenizer=small, n=5) == kept[:5]
    assert il.data.load_labelled("cloze", n=7) == cloze[:7]


def test_load_labelled_bad_input():
    with pytest.raises(ValueError, match=r"name='imdb' is not a labelled set; expected one of \('cloze', 'sst2'\)"):
        il.data.load_labelled("imdb")
    with pytest.raises(ValueError, match="n=0: expected a positive integer"):
        il.data.load_labelled("cloze", n=0)


def test_sst2_items_through_datasets(monkeypatch):
    import datasets

    rows = [{"sentence": "a gorgeous , witty film . ", "label": 1, "idx": 0},
            {"sentence": "dull and overlong .", "label": 0, "idx": 1}]
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = il.data.load_labelled("sst2")
    assert calls == [(("glue", "sst2"), {"split": "validation"})]
    assert items[0] == {"id": "sst2-0000", "prompt": "Review: a gorgeous , witty film .\nSentiment:",
                        "options": [" negative", " positive"], "label": 1, "answer": " positive"}
    assert items[1]["label"] == 0 and items[1]["answer"] == " negative"
    assert il.data.load_labelled("sst2", n=1) == items[:1]


def test_sst2_offline_says_what_to_do(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"cannot load glue/sst2.*load_labelled\('cloze'\)"):
        il.data.load_labelled("sst2")


def test_provenance_documents_the_labelled_sets():
    text = Path(data_dir() / "PROVENANCE.md").read_text()
    assert "## labelled/" in text and "build_labelled_sets.py" in text and "cloze.jsonl" in text
