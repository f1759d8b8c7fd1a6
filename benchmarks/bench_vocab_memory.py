"""Peak memory of the calibration pipeline over the same tokens at vocabulary sizes 50k / 128k / 262k:
the all-logits path (``keep_logits="memory"``: every position's logits in one tensor) against the
streamed path (``keep_logits=True``: logits spilled to a LogitStore, temperature fitted by
streaming blocks through the NLL and its gradient).

The pipeline is notebook 01's: next-token predictions on a validation and a test split, then
``temperature_scaling_report`` (fit T on validation, ECE / NLL / Brier / bootstrap / reliability
on test). The model is a tiny random ``embedding -> linear`` language model of the given
vocabulary (its weights: 2 x vocab x d_model floats, printed), so the logits dominate as they do
for a real model's calibration. Each (vocabulary, path) runs in a fresh process; its peak is the
process's ``VmHWM`` minus its resident memory just before the pipeline (after building the model
and tokens). The streamed path's peak should stay flat in the vocabulary; the all-logits path's
grows with positions x vocabulary. Metrics of both paths are printed to show they agree.

    python benchmarks/bench_vocab_memory.py                       # 16 + 16 windows of 64 tokens
    python benchmarks/bench_vocab_memory.py --windows 8 --vocabs 50257 262144
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VOCABS = (50_257, 128_256, 262_144)


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(vocab: int, path: str, windows: int, window_len: int, d_model: int) -> dict:
    import torch

    from interp_lib import calibration as cal

    torch.manual_seed(0)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d_model)
            self.unembed = torch.nn.Linear(d_model, vocab, bias=False)

        def forward(self, tokens):
            return self.unembed(self.embed(tokens)) * 3.0

    model = TinyLM().eval()
    generator = torch.Generator().manual_seed(1)
    val = torch.randint(0, vocab, (windows, window_len), generator=generator)
    test = torch.randint(0, vocab, (windows, window_len), generator=generator)
    # planted structure so the model is right sometimes: the next token is often the current one + 1
    for tokens in (val, test):
        tokens[:, 1::2] = (tokens[:, 0::2] + 1) % vocab
    with torch.no_grad():  # the embedding of t points at the unembedding of t + 1
        model.embed.weight.copy_(torch.roll(model.unembed.weight, -1, dims=0))
    keep = "memory" if path == "all-logits" else True
    before = rss_mib("VmRSS")
    kwargs = {"keep_logits": keep, "batch_size": 4}
    if keep == "memory":
        kwargs["max_logits_bytes"] = 2 ** 40
    report = cal.temperature_scaling_report(cal.next_token_predictions(model, val, **kwargs),
                                            cal.next_token_predictions(model, test, **kwargs), n_boot=50)
    peak = rss_mib("VmHWM")
    return {"vocab": vocab, "path": path, "peak_above_mib": round(peak - before, 1),
            "weights_mib": round(2 * vocab * d_model * 4 / 2 ** 20, 1),
            "positions": 2 * windows * (window_len - 1), "temperature": report.temperature,
            "ece_after": report.summary()["ece_after"], "nll_after": report.summary()["nll_after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--windows", type=int, default=16, help="windows per split (default 16)")
    parser.add_argument("--window-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--worker", nargs=2, metavar=("VOCAB", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.windows, args.window_len, args.d_model)))
        return
    rows = []
    for vocab in args.vocabs:
        for path in ("all-logits", "streamed"):
            command = [sys.executable, __file__, "--worker", str(vocab), path, "--windows", str(args.windows),
                       "--window-len", str(args.window_len), "--d-model", str(args.d_model)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  done: vocab {vocab}, {path}", file=sys.stderr)
    positions = rows[0]["positions"]
    print(f"calibration pipeline over {positions} next-token positions (val + test), peak RSS above the "
          "level before it (MiB):")
    print(f"{'vocab':>8} {'weights':>8} {'all-logits':>11} {'streamed':>9} {'ratio':>6}  T (all / streamed)  "
          "ECE after (all / streamed)")
    for vocab in args.vocabs:
        old, new = (next(r for r in rows if r["vocab"] == vocab and r["path"] == p) for p in ("all-logits", "streamed"))
        print(f"{vocab:>8} {old['weights_mib']:>8.1f} {old['peak_above_mib']:>11.1f} {new['peak_above_mib']:>9.1f} "
              f"{old['peak_above_mib'] / max(new['peak_above_mib'], 1e-9):>6.1f}  "
              f"{old['temperature']:.6f} / {new['temperature']:.6f}  {old['ece_after']:.6f} / {new['ece_after']:.6f}")


if __name__ == "__main__":
    main()
