"""Train the bundled toy models (HF GPT-2 directories under data/models/), each with a fixed seed.

  toy-lm  GPT-2 architecture (4 layers, MLPs) trained on data/corpus/train.txt for many epochs,
          so its next-token confidence on held-out text is measurably miscalibrated.
  toy-2l  two attention-only-style layers (MLP output fixed at zero) trained on sequences of
          uniformly random tokens with repeated segments of varied length, position and gap,
          so copying pays off on most tokens; forms a previous-token head feeding an induction
          head. Induction is verified on repeat lengths never seen in training.
  toy-1l  the same data and recipe with one layer: it cannot compose heads, so it cannot form
          an induction head.

Run:  python scripts/train_toy_models.py toy-2l   (or toy-1l, toy-lm, all)
Each model directory gets ``training.json`` with the recipe, seed, timings and final metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
BOS = 0
# Segment lengths seen in training; evaluation uses lengths outside this range.
TRAIN_SEGMENT_LENGTHS = (5, 40)
HELD_OUT_SEGMENT_LENGTHS = (3, 47, 61)
# The recipes of the shipped models (command-line flags override).
MODEL_DEFAULTS = {
    "toy-lm": {"steps": 3000, "batch": 16, "d_model": 128, "lr": 2e-3},
    "toy-2l": {"steps": 6000, "batch": 64, "d_model": 64, "lr": 1e-3},
    "toy-1l": {"steps": 6000, "batch": 64, "d_model": 64, "lr": 1e-3},
}


def sinusoidal(n_positions: int, d_model: int) -> torch.Tensor:
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10_000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


def repeat_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int,
                 skip_bigram_rows: float = 0.0, permutation: np.ndarray | None = None) -> torch.Tensor:
    """Random tokens where a segment recurs: either periodically (S S S ...) after a random
    prefix, or twice with random filler between; lengths, starts and gaps vary per row.

    A fraction ``skip_bigram_rows`` of rows instead follow ``t[i+1] = permutation[t[i-1]]`` half
    of the time (random otherwise): a signal that rewards attending to the previous token
    directly, as n-gram statistics do in natural text.
    """
    tokens = rng.integers(1, vocab, size=(batch, seq_len))
    tokens[:, 0] = BOS
    lo, hi = TRAIN_SEGMENT_LENGTHS
    for row in range(batch):
        length = int(rng.integers(lo, hi + 1))
        if skip_bigram_rows and rng.random() < skip_bigram_rows:  # no draw when off: same stream
            follow = rng.random(seq_len) < 0.5
            for i in range(3, seq_len):
                if follow[i]:
                    tokens[row, i] = permutation[tokens[row, i - 2]]
        elif rng.random() < 0.5:  # periodic repeats after a random prefix
            start = int(rng.integers(1, 1 + max(1, seq_len - 2 * length - 1)))
            segment = tokens[row, start:start + length].copy()
            reps = math.ceil((seq_len - start) / length)
            tokens[row, start:] = np.tile(segment, reps)[: seq_len - start]
        else:  # one copy after a random gap
            first = int(rng.integers(1, seq_len - 2 * length))
            second = int(rng.integers(first + length, seq_len - length + 1))
            tokens[row, second:second + length] = tokens[row, first:first + length]
    return torch.from_numpy(tokens)


@torch.no_grad()
def induction_report(model: GPT2LMHeadModel, vocab: int, seed: int = 1234) -> dict:
    """Attention of every head to the induction target / previous token, and loss on the first
    vs second copy, on BOS + S + S with S of held-out lengths."""
    model.eval()
    rng = np.random.default_rng(seed)
    report = {}
    for length in HELD_OUT_SEGMENT_LENGTHS:
        segment = rng.integers(1, vocab, size=(32, length))
        tokens = torch.from_numpy(np.concatenate([np.full((32, 1), BOS), segment, segment], axis=1))
        out = model(tokens, output_attentions=True, labels=tokens)
        logits = out.logits[:, :-1].log_softmax(-1)
        nll = -logits.gather(-1, tokens[:, 1:, None])[..., 0]
        first = nll[:, : length].mean().item()
        second = nll[:, length + 1:].mean().item()
        queries = torch.arange(length + 1, 2 * length + 1)
        per_head_induction, per_head_prev = [], []
        for attn in out.attentions:  # [batch, head, q, k]
            per_head_induction.append(attn[:, :, queries, queries - length + 1].mean((0, 2)).tolist())
            allq = torch.arange(2, 2 * length + 1)
            per_head_prev.append(attn[:, :, allq, allq - 1].mean((0, 2)).tolist())
        report[f"L={length}"] = {
            "loss_first_copy": round(first, 3), "loss_second_copy": round(second, 3),
            "induction_attention": [[round(x, 3) for x in layer] for layer in per_head_induction],
            "previous_token_attention": [[round(x, 3) for x in layer] for layer in per_head_prev],
        }
    model.train()
    return report


def train_induction(n_layer: int, out: Path, args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or DATA / "tokenizer-512")
    vocab = len(tokenizer)
    config = GPT2Config(vocab_size=vocab, n_positions=args.n_positions, n_embd=args.d_model,
                        n_layer=n_layer, n_head=args.n_heads, n_inner=4 * args.d_model,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=BOS, eos_token_id=BOS)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for block in model.transformer.h:  # attention-only style: MLP output fixed at zero
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
        if args.positions == "sinusoidal":
            model.transformer.wpe.weight.copy_(sinusoidal(args.n_positions, args.d_model) * args.pos_scale)
    frozen = {id(p) for block in model.transformer.h for p in block.mlp.parameters()}
    if args.positions == "sinusoidal":
        frozen.add(id(model.transformer.wpe.weight))
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    permutation = np.concatenate([[BOS], 1 + np.random.default_rng(args.seed + 1).permutation(vocab - 1)])
    history = []
    start = time.time()
    for step in range(1, args.steps + 1):
        tokens = repeat_batch(rng, args.batch, args.seq_len, vocab, args.skip_bigram_rows, permutation)
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            report = induction_report(model, vocab)
            best = max(max(layer) for layer in report["L=47"]["induction_attention"])
            entry = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1),
                     "max_induction_attention_L47": round(best, 3),
                     "loss_second_copy_L47": report["L=47"]["loss_second_copy"]}
            history.append(entry)
            print(json.dumps(entry), flush=True)
    save(model, tokenizer, out, {
        "recipe": "induction", "n_layer": n_layer, "args": vars(args) | {"out": str(out)},
        "train_segment_lengths": TRAIN_SEGMENT_LENGTHS, "history": history,
        "held_out_report": induction_report(model, vocab),
    })


def train_lm(out: Path, args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or DATA / "tokenizer")
    text = (DATA / "corpus" / "train.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    val_text = (DATA / "corpus" / "validation.txt").read_text(encoding="utf-8")
    val_ids = torch.tensor(tokenizer(val_text)["input_ids"], dtype=torch.long)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.d_model,
                        n_layer=args.n_layer, n_head=args.n_heads, n_inner=4 * args.d_model,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=BOS, eos_token_id=BOS)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup)
        * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)) * 0.9 + 0.1)
    window = args.seq_len - 1  # BOS is prepended to every window, as load_model users do
    history = []
    start = time.time()

    def batch_from(source: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
        starts = generator.integers(0, len(source) - window, size=args.batch)
        rows = torch.stack([source[s:s + window] for s in starts])
        return torch.cat([torch.full((args.batch, 1), BOS), rows], dim=1)

    for step in range(1, args.steps + 1):
        tokens = batch_from(ids, rng)
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                val = model(batch_from(val_ids, np.random.default_rng(0)), labels=None).logits
            model.train()
            entry = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1),
                     "val_loss": round(held_out_loss(model, val_ids, window), 4)}
            history.append(entry)
            print(json.dumps(entry), flush=True)
    save(model, tokenizer, out, {"recipe": "language-model", "args": vars(args) | {"out": str(out)},
                                 "train_tokens": len(ids), "history": history})


@torch.no_grad()
def held_out_loss(model: GPT2LMHeadModel, ids: torch.Tensor, window: int, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, len(ids) // window)
    rows = ids[: n * window].view(n, window)
    tokens = torch.cat([torch.full((n, 1), BOS), rows], dim=1)
    loss = model(tokens, labels=tokens).loss.item()
    model.train()
    return loss


def save(model: GPT2LMHeadModel, tokenizer, out: Path, info: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["toy-lm", "toy-2l", "toy-1l"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="default: data/tokenizer (toy-lm), data/tokenizer-512 (toy-1l, toy-2l)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=4, help="toy-lm only")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--positions", choices=["learned", "sinusoidal"], default="sinusoidal",
                        help="toy-1l / toy-2l: frozen sinusoidal (default) or learned positions")
    parser.add_argument("--pos-scale", type=float, default=0.05,
                        help="scale of the frozen sinusoidal table (token embeddings start at std 0.02)")
    parser.add_argument("--skip-bigram-rows", type=float, default=0.0,
                        help="fraction of induction-training rows with t[i+1]=perm(t[i-1]) structure")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shipped models used 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or DATA / "models" / args.model
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model == "toy-lm":
        train_lm(out, args)
    else:
        train_induction(2 if args.model == "toy-2l" else 1, out, args)


if __name__ == "__main__":
    main()
