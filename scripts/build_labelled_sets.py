"""Build the bundled labelled sets under data/labelled/ (fixed seed, deterministic).

  cloze.jsonl  multiple-choice next-word questions cut from the held-out test split of the
               bundled corpus (data/corpus/test.txt): a prompt (the preceding text of the same
               paragraph, ending right before a word), four single-token answer options (the true
               next word and three distractors drawn from the most frequent words of the train
               split) and the index of the true one. Scored by comparing the logits of the answer
               tokens: ``il.calibration.classify_labelled(model, il.data.load_labelled("cloze"))``.

Every option is one token of the bundled 4096-token tokenizer (data/tokenizer), leading space
included (" list"). Answer positions are balanced over the four slots, so a constant guess scores
exactly 25%. Only lowercase alphabetic words are used (as targets and distractors), which are
almost always single tokens in GPT-2's tokenizer too; ``load_labelled(..., tokenizer=...)`` drops
the rare item that is not.

Run:  python scripts/build_labelled_sets.py            (writes data/labelled/cloze.jsonl)
      python scripts/build_labelled_sets.py --out DIR  (elsewhere, e.g. to check reproducibility)
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

SEED = 0
N_ITEMS = 400
N_OPTIONS = 4
#: distractors come from this many most frequent (single-token, lowercase) train words
N_DISTRACTOR_POOL = 300
#: the prompt is the longest tail of the paragraph before the target that starts at a word and
#: has at most MAX_PROMPT_CHARS characters; targets with less than MIN_PROMPT_CHARS before them
#: in their paragraph are skipped (too little context to guess from)
MIN_PROMPT_CHARS = 40
MAX_PROMPT_CHARS = 100

# A target: a lowercase word after a space, ending at whitespace, punctuation that ends a
# phrase, or the end of the paragraph (not "os.path" or "snake_case" fragments).
TARGET_RE = re.compile(r"(?<= )([a-z]+)(?=[\s,;:!?)]|\.(?:\s|$)|$)")
WORD_RE = re.compile(r"(?<= )[a-z]+(?![A-Za-z0-9_])")


def single_token_words(tokenizer, words: list[str]) -> set[str]:
    """The words ``w`` for which ``" " + w`` is exactly one token."""
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return {w for w, ids in zip(words, encoded) if len(ids) == 1}


def distractor_pool(train_text: str, tokenizer, size: int) -> list[str]:
    """The ``size`` most frequent lowercase train words that are single tokens with a leading space."""
    counts = Counter(WORD_RE.findall(train_text))
    ranked = [w for w, _ in counts.most_common(5 * size)]
    single = single_token_words(tokenizer, ranked)
    pool = [w for w in ranked if w in single][:size]
    if len(pool) < size:
        raise RuntimeError(f"only {len(pool)} single-token frequent words found; expected {size}")
    return pool


def prompt_before(paragraph: str, start: int) -> str | None:
    """The tail of ``paragraph[:start]`` (which ends with a space) that starts at a word and has
    at most MAX_PROMPT_CHARS characters, without the trailing space; None if too short."""
    before = paragraph[:start].rstrip(" ")
    if len(before) < MIN_PROMPT_CHARS:
        return None
    tail = before[-MAX_PROMPT_CHARS:]
    if len(before) > MAX_PROMPT_CHARS:
        cut = tail.find(" ")
        if cut < 0:
            return None
        tail = tail[cut + 1:]
    return tail if len(tail) >= MIN_PROMPT_CHARS else None


def build_cloze(test_text: str, train_text: str, tokenizer, n_items: int = N_ITEMS,
                seed: int = SEED) -> list[dict]:
    rng = np.random.default_rng(seed)
    pool = distractor_pool(train_text, tokenizer, N_DISTRACTOR_POOL)
    paragraphs = [p for p in test_text.split("\n\n") if p.strip()]
    candidate_words = sorted({m.group(1) for p in paragraphs for m in TARGET_RE.finditer(p)})
    single = single_token_words(tokenizer, candidate_words)

    # Balanced answer slots: n_items / N_OPTIONS of each, in random order.
    slots = rng.permutation(np.arange(n_items) % N_OPTIONS)
    items: list[dict] = []
    # At most one question per paragraph, paragraphs visited in a seeded random order.
    for paragraph_index in rng.permutation(len(paragraphs)):
        if len(items) == n_items:
            break
        paragraph = paragraphs[paragraph_index]
        candidates = []
        for match in TARGET_RE.finditer(paragraph):
            word = match.group(1)
            prompt = prompt_before(paragraph, match.start(1)) if word in single else None
            if prompt is not None:
                candidates.append((prompt, word))
        if not candidates:
            continue
        prompt, word = candidates[int(rng.integers(len(candidates)))]
        others = [w for w in pool if w != word]
        distractors = [others[i] for i in rng.choice(len(others), size=N_OPTIONS - 1, replace=False)]
        label = int(slots[len(items)])
        options = distractors[:label] + [word] + distractors[label:]
        items.append({"id": f"cloze-{len(items):04d}", "prompt": prompt,
                      "options": [" " + w for w in options], "label": label, "answer": " " + word})
    if len(items) < n_items:
        raise RuntimeError(f"only {len(items)} questions could be cut from the test split; expected {n_items}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA / "labelled")
    parser.add_argument("--n-items", type=int, default=N_ITEMS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    test_text = (DATA / "corpus" / "test.txt").read_text(encoding="utf-8")
    train_text = (DATA / "corpus" / "train.txt").read_text(encoding="utf-8")
    items = build_cloze(test_text, train_text, tokenizer, n_items=args.n_items, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cloze.jsonl"
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {path} ({path.stat().st_size / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
