"""Time TransformerLens' activation patching against interp_lib's on identical inputs.

For the head-by-position sweep (``attn_head_out``, ``[layer, pos, head]``) it runs
``transformer_lens.patching.get_act_patch_attn_head_out_by_pos`` (one forward pass per cell),
``interp_lib.patching.activation_patch`` (batched, exact) and ``attribution_patch`` (two forward
passes, one backward pass) on the same clean / corrupted tokens and metric, and prints the
speed-ups, the max abs difference from TransformerLens and the peak memory (resident set size
above the level before the sweep, sampled every 5 ms; each phase runs in a fresh process so
that memory freed by one phase cannot hide another's). It also times the engine with its fast
paths off (``shortcuts=False``), so the gain of the KV-cache / no-op / read-position shortcuts
and their agreement with plain passes show side by side. The exact phase's warm-up includes the
once-per-model check of those shortcuts.

Models: the bundled ``toy-lm`` and a randomly initialised GPT-2-small-shaped model
(``GPT2Config()`` defaults, 124M parameters) saved to a temporary directory and loaded through
``il.load_model`` like any local model.

Scenarios: ``one-token`` corrupts a single token a third of the way in (IOI-style prompts
differ in one name); ``all-tokens`` corrupts every token but the first (nothing to skip: the
worst case for interp_lib's shortcuts).

    python benchmarks/bench_patching.py                      # both models, a few minutes on 2 cores
    python benchmarks/bench_patching.py --models toy-lm --seq-len 20
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import interp_lib as il  # noqa: E402
from interp_lib import patching as P  # noqa: E402


class PeakRSS:
    """Peak resident set size (MiB) above the level at entry, sampled by a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.mib = (self.peak - self.start) / 2**20


def timed(fn):
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, memory.mib


def gpt2_small_random(seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(tempfile.mkdtemp(prefix="bench_gpt2_small_random_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # only used to label positions
        (path / name).write_bytes((il.paths.data_dir() / "tokenizer" / name).read_bytes())
    return str(path)


def make_pair(model, seq_len: int, batch: int, scenario: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    high = min(model.cfg.d_vocab, 4096)
    clean = torch.randint(0, high, (batch, seq_len), generator=generator)
    corrupted = clean.clone()
    changed = [seq_len // 3] if scenario == "one-token" else list(range(1, seq_len))
    for p in changed:
        corrupted[:, p] = (clean[:, p] + torch.randint(1, high, (batch,), generator=generator)) % high
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    answer = clean_logits[:, -1].argmax(-1)
    second = clean_logits[:, -1].topk(2).indices[:, 1]
    wrong = torch.where(corrupted_logits[:, -1].argmax(-1) == answer, second, corrupted_logits[:, -1].argmax(-1))
    metric = P.normalized_logit_diff_metric(clean_logits, corrupted_logits, answer, wrong)
    return clean, corrupted, metric


def worker(spec: dict) -> None:
    """One timed phase in a fresh process (so its peak memory is its own): prints a JSON line."""
    import json

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model = il.load_model(spec["model_path"], device="cpu")
    clean, corrupted, metric = make_pair(model, spec["seq_len"], spec["batch"], spec["scenario"])
    phase = spec["phase"]
    if phase == "tl":
        from transformer_lens import patching as tl_patching
        import tqdm.auto

        quiet = tqdm.auto.tqdm.__init__
        tqdm.auto.tqdm.__init__ = lambda self, *a, **k: quiet(self, *a, **{**k, "disable": True})

        def run():
            with torch.no_grad():
                _, cache = model.run_with_cache(clean)
                return tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    else:
        sweep = P.attribution_patch if phase == "attr" else P.activation_patch
        options = {"shortcuts": False} if phase == "plain" else {}
        # warm-up; for "exact" it also runs the once-per-model check of the fast path
        sweep(model, clean, corrupted, metric, "attn_head_out", layers=[0], positions=[-1], **options)

        def run():
            return sweep(model, clean, corrupted, metric, "attn_head_out", by_position=True, **options)
    result, seconds, mib = timed(run)
    torch.save(result.detach().cpu().float(), spec["out"])
    print(json.dumps({"seconds": seconds, "peak_mib": mib}))


def run_phase(spec: dict) -> tuple[torch.Tensor, float, float]:
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"phase {spec['phase']} failed:\n{out.stderr[-3000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return torch.load(spec["out"]), report["seconds"], report["peak_mib"]


def bench(name: str, model_path: str, seq_len: int, batch: int, scenario: str, threads, run_tl: bool = True) -> dict:
    model = il.load_model(model_path, device="cpu")
    n_cells = model.cfg.n_layers * seq_len * model.cfg.n_heads
    del model
    row = {"model": name, "scenario": scenario, "seq_len": seq_len, "batch": batch, "cells": n_cells}
    scratch = Path(tempfile.mkdtemp(prefix="bench_patching_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    spec = {"model_path": model_path, "seq_len": seq_len, "batch": batch, "scenario": scenario, "threads": threads}
    ours, row["ours_s"], row["ours_mib"] = run_phase({**spec, "phase": "exact", "out": str(scratch / "exact.pt")})
    approx, row["attr_s"], row["attr_mib"] = run_phase({**spec, "phase": "attr", "out": str(scratch / "attr.pt")})
    plain, row["plain_s"], row["plain_mib"] = run_phase({**spec, "phase": "plain", "out": str(scratch / "plain.pt")})
    row["plain_diff"] = float((plain - ours).abs().max())
    row["shortcut_speedup"] = row["plain_s"] / row["ours_s"]
    row["attr_vs_exact"] = P.patching_agreement(ours, approx, k=10)
    if run_tl:
        expected, row["tl_s"], row["tl_mib"] = run_phase({**spec, "phase": "tl", "out": str(scratch / "tl.pt")})
        row["max_abs_diff"] = float((expected - ours).abs().max())
        row["speedup_exact"] = row["tl_s"] / row["ours_s"]
        row["speedup_attr"] = row["tl_s"] / row["attr_s"]
    return row


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<22}{'scenario':<12}{'pos':>4}{'cells':>7} | {'TL exact':>9}{'ours exact':>11}"
              f"{'ratio':>8} | {'ours attr':>10}{'ratio':>9} | {'max|diff|':>10} | {'peak MiB TL/exact/attr':>23}"
              f" | attr~exact r | ours plain, fast/plain, max|diff|")
    print(header)
    print("-" * len(header))
    for r in rows:
        tl = f"{r['tl_s']:8.2f}s" if "tl_s" in r else f"{'-':>9}"
        ratio = f"{r['speedup_exact']:7.1f}x" if "tl_s" in r else f"{'-':>8}"
        ratio_attr = f"{r['speedup_attr']:8.0f}x" if "tl_s" in r else f"{'-':>9}"
        diff = f"{r['max_abs_diff']:10.2e}" if "tl_s" in r else f"{'-':>10}"
        memory = f"{r.get('tl_mib', float('nan')):6.0f} /{r['ours_mib']:6.0f} /{r['attr_mib']:6.0f}"
        print(f"{r['model']:<22}{r['scenario']:<12}{r['seq_len']:>4}{r['cells']:>7} | {tl}{r['ours_s']:10.2f}s"
              f"{ratio} | {r['attr_s']:9.2f}s{ratio_attr} | {diff} | {memory:>23} | "
              f"{r['attr_vs_exact']['pearson']:.3f} | {r['plain_s']:8.2f}s {r['shortcut_speedup']:5.1f}x "
              f"{r['plain_diff']:9.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-lm", "gpt2-small-random"])
    parser.add_argument("--scenarios", nargs="+", default=["one-token", "all-tokens"],
                        choices=["one-token", "all-tokens"])
    parser.add_argument("--seq-len", type=int, default=15, help="tokens per prompt for toy-lm (TL's 2,160-pass example: 15)")
    parser.add_argument("--gpt2-seq-len", type=int, default=10, help="tokens per prompt for the GPT-2-small-shaped model")
    parser.add_argument("--batch", type=int, default=1, help="prompts per clean / corrupted batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--gpt2-scenarios", nargs="+", default=["all-tokens"], choices=["one-token", "all-tokens"],
                        help="scenarios for the GPT-2-small-shaped model (TransformerLens takes minutes each)")
    parser.add_argument("--skip-tl", action="store_true", help="time interp_lib only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import json

        worker(json.loads(args.worker))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    for name in args.models:
        if name == "gpt2-small-random":
            path, seq_len, scenarios = gpt2_small_random(), args.gpt2_seq_len, args.gpt2_scenarios
        else:
            path, seq_len, scenarios = str(il.models.bundled_model_path(name)) if name in il.BUNDLED_MODELS else name, \
                args.seq_len, args.scenarios
        cfg = il.load_model(path, device="cpu").cfg
        print(f"{name}: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}, vocab {cfg.d_vocab}", flush=True)
        for scenario in scenarios:
            rows.append(bench(name, path, seq_len, args.batch, scenario, args.threads, run_tl=not args.skip_tl))
            print_table(rows[-1:])
            sys.stdout.flush()
    print()
    print_table(rows)
    print("\nratio = TransformerLens exact time / ours; 'attr~exact r' = Pearson r of attribution vs exact patching;"
          "\n'ours plain' = our engine with shortcuts=False (one plain pass per cell, batched), its time, how much"
          "\nfaster the checked fast path is, and the largest difference between the two.")


if __name__ == "__main__":
    main()
