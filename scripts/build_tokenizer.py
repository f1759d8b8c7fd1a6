"""Train the bundled byte-level BPE tokenizer on data/corpus/train.txt (fixed, deterministic).

Writes an HF tokenizer (``tokenizer.json`` + config) to data/tokenizer/. The special token
``<|endoftext|>`` (id 0) serves as BOS, EOS and padding, as in GPT-2.
Run:  python scripts/build_tokenizer.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = "<|endoftext|>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus" / "train.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train([str(args.corpus)], vocab_size=args.vocab_size, min_frequency=2,
              special_tokens=[SPECIAL], show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=SPECIAL,
                                   eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL,
                                   model_max_length=1024)
    fast.save_pretrained(str(args.out))
    sample = "The function returns a list of strings."
    print(f"vocab {fast.vocab_size}; {sample!r} -> {fast.tokenize(sample)}")


if __name__ == "__main__":
    main()
