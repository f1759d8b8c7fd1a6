"""What explaining every head of the GPT-2 family costs: the explainer's dry run, scaled by head count.

GPT-2's weights cannot be downloaded here, but what the dry run counts does not depend on them:
requests follow from the configuration (events per head, scorers, refinement rounds), tokens from
the tokenizer and the window length. So this script runs the real ``--dry-run`` of ``interp-lib
explain`` on a one-layer GPT-2-small-shaped model with random weights and the real GPT-2 tokenizer
(12 heads, d_model 768, 1,024 positions, 50,257 tokens), with the configuration the README gives
for GPT-2, reads the predicted requests, tokens and dollars per head, and multiplies by the heads
of gpt2 (144), gpt2-medium (384), gpt2-large (720) and gpt2-xl (1,200).

Wall time is an estimate with stated assumptions: ``requests / concurrency x latency`` (the
client keeps ``concurrency`` requests in flight; ``--latency`` seconds per request is an
assumption, not a measurement) or the provider's tokens-per-minute limit, whichever binds. With
``--batch-api`` the scoring requests cost half (explanations and revisions stay at the standard
price) and each Batch API round answers within 24 hours.

    .venv/bin/python benchmarks/explain_cost.py [--windows 1500] [--window-len 192] [--top-k 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

GPT2_FAMILY = {"gpt2": (12, 12), "gpt2-medium": (24, 16), "gpt2-large": (36, 20), "gpt2-xl": (48, 25)}


def build_model(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from interp_lib.data import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=768, n_head=12, n_positions=1024, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=382,
                        help="windows of the bundled validation text (382 of 192 tokens exist; the README's GPT-2 "
                             "run samples 1,500 WikiText windows: requests per head depend on the events kept, "
                             "top-k, not on how many windows they are drawn from)")
    parser.add_argument("--window-len", type=int, default=192)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--explainer", default="gpt-4o-mini")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=2.0, help="assumed seconds per request")
    parser.add_argument("--tpm", type=float, default=2_000_000, help="assumed provider tokens-per-minute limit")
    args = parser.parse_args()

    from interp_lib.explain.config import ExplainConfig
    from interp_lib.explain.pipeline import run_explainer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "gpt2-shaped")
        config = ExplainConfig(model=str(model_dir), heads="all", dataset="bundled", windows=args.windows,
                               window_len=args.window_len, top_k=args.top_k, explainer=args.explainer,
                               base_url="http://127.0.0.1:9/v1", dry_run=True, concurrency=args.concurrency)
        start = time.perf_counter()
        run = run_explainer(config, Path(tmp) / "run", progress=True)
        seconds = time.perf_counter() - start
    from interp_lib.explain.client import BATCH_DISCOUNT

    dry = run.usage["dry_run"]
    rounds = config.refine_rounds
    n_heads = 12
    per_head = {key: value / n_heads for key, value in dry.items() if isinstance(value, (int, float))}
    print(f"\ndry run on a 1-layer GPT-2-shaped model (12 heads, GPT-2 tokenizer), {args.windows} windows x "
          f"{args.window_len} tokens, top-k {args.top_k}, explainer {args.explainer} ({seconds:.0f} s):")
    print(json.dumps(dry, indent=1))
    tokens_per_call = per_head.get("tokens", 0) / max(per_head["calls"], 1e-9)
    print(f"\n| model | heads | requests | tokens | USD (standard) | USD (Batch API) | wall time at "
          f"{args.concurrency} in flight x {args.latency:g} s | at {args.tpm / 1e6:g}M tokens/min |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    total = {"heads": 0, "calls": 0.0, "tokens": 0.0, "usd": 0.0}
    rows = list(GPT2_FAMILY.items()) + [("all four", None)]
    for name, shape in rows:
        heads = shape[0] * shape[1] if shape else total["heads"]
        calls = per_head["calls"] * heads
        tokens = per_head.get("tokens", 0.0) * heads
        usd = per_head["estimated_cost_usd"] * heads
        # --batch-api sends the scoring requests (score stage, and refinement's scores) at half
        # price; explanations and revisions (one per head per round) stay at the standard price
        direct = per_head["explain_cost_usd"] * (1 + rounds) + per_head["taxonomy_cost_usd"]
        batch_usd = (direct + BATCH_DISCOUNT * (per_head["estimated_cost_usd"] - direct)) * heads
        if shape:
            total["heads"] += heads
        hours = calls / args.concurrency * args.latency / 3600
        tpm_hours = tokens / args.tpm / 60
        print(f"| {name} | {heads:,} | {calls:,.0f} | {tokens / 1e6:,.1f}M | ${usd:,.2f} | ${batch_usd:,.2f} | "
              f"{hours:,.1f} h | {tpm_hours:,.1f} h |")
    print(f"\n(~{tokens_per_call:,.0f} tokens per request; the dry run counts completions at their full max_tokens, "
          "so tokens and dollars are upper bounds)")


if __name__ == "__main__":
    main()
