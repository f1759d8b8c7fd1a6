"""Time and size streaming event collection (``il.explain.events.collect_events``) against a bare
forward pass over the same windows.

* Throughput: a bare forward pass (``model(batch)`` under ``torch.inference_mode``, same batch
  size) against ``collect_events`` over all heads (top-k, random and quantile events, both hooks),
  interleaved ``--repeats`` times in one process, best time of each; ratio = bare time / events
  time (target >= 0.7: collection costs at most ~1.4 forward passes).
* Peak memory, for ``N`` and ``2N`` windows: each phase in a fresh process, the resident set size
  (RSS) above its level just before the phase (after loading the model, building the windows and
  one warm-up batch), sampled every 5 ms. RSS counts Python objects and CPU tensor storage alike
  (PyTorch's CPU allocator is not seen by ``tracemalloc``). On CUDA the peak of
  ``torch.cuda.max_memory_allocated`` above the level before the phase is printed as well. A
  streaming collector's peak should not grow with the corpus: ratio 2N / N ~ 1.0.

Models: the bundled ``toy-lm`` and a randomly initialised GPT-2-small-shaped model (124M
parameters; built as in ``bench_patching.py`` and loaded through ``il.load_model``).

    python benchmarks/bench_events.py                            # both models, a few minutes on 2 cores
    python benchmarks/bench_events.py --models toy-lm --windows 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import interp_lib as il  # noqa: E402
from bench_patching import PeakRSS, gpt2_small_random  # noqa: E402  (same RSS sampler, same model)
from interp_lib.explain import events as E  # noqa: E402


def make_windows(model, n_windows: int, window_len: int) -> torch.Tensor:
    # the bundled validation split has ~2,400 distinct 64-token windows: room for N and 2N
    return E.sample_windows(model, "bundled", n_windows, window_len, seed=0)


def bare_forward(model, windows: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            model(windows[start:start + batch_size].to(model.cfg.device))


def collect(model, windows: torch.Tensor, batch_size: int, salience: str):
    return E.collect_events(model, windows, "all", top_k=20, n_random=10, n_quantile=10, salience=salience,
                            batch_size=batch_size, progress=False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(spec: dict) -> None:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model = il.load_model(spec["model_path"], device=device)
    windows = make_windows(model, spec["n_windows"], spec["window_len"])
    batch_size, salience = spec["batch_size"], spec["salience"]
    warm = windows[:batch_size]
    bare_forward(model, warm, batch_size)
    collect(model, warm, batch_size, salience)
    sync(device)
    if spec["phase"] == "timing":
        times = {"bare": [], "events": []}
        for _ in range(spec["repeats"]):
            for name, run in (("bare", lambda: bare_forward(model, windows, batch_size)),
                              ("events", lambda: collect(model, windows, batch_size, salience))):
                start = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - start)
        cfg = model.cfg  # what a collector that keeps the corpus's z (float32) until the end would hold
        z_mib = windows.numel() * cfg.n_layers * cfg.n_heads * cfg.d_head * 4 / 2**20
        print(json.dumps({"bare_s": min(times["bare"]), "events_s": min(times["events"]),
                          "tokens": windows.numel(), "corpus_z_mib": z_mib}))
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_start = torch.cuda.memory_allocated()
    run = (lambda: bare_forward(model, windows, batch_size)) if spec["phase"] == "bare" else \
        (lambda: collect(model, windows, batch_size, salience))
    with PeakRSS() as memory:
        result = run()
        sync(device)
    out = {"rss_mib": memory.mib}
    if cuda:
        out["cuda_mib"] = (torch.cuda.max_memory_allocated() - cuda_start) / 2**20
    if result is not None:  # the events kept do not grow with the corpus either
        out["n_events"] = sum(len(result.events(*key)) for key in result.heads())
    print(json.dumps(out))


def run_worker(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"phase {spec['phase']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, path: str, args, n_windows: int) -> dict:
    spec = {"model_path": path, "window_len": args.window_len, "batch_size": args.batch_size,
            "threads": args.threads, "device": args.device, "salience": args.salience, "repeats": args.repeats}
    row = {"model": name, "windows": n_windows}
    timing = run_worker({**spec, "phase": "timing", "n_windows": n_windows})
    row.update(timing)
    row["throughput_ratio"] = timing["bare_s"] / timing["events_s"]
    for phase in ("bare", "events"):
        for scale in (1, 2):
            memory = run_worker({**spec, "phase": phase, "n_windows": n_windows * scale})
            row[f"{phase}_rss_{scale}N"] = memory["rss_mib"]
            if "cuda_mib" in memory:
                row[f"{phase}_cuda_{scale}N"] = memory["cuda_mib"]
            if "n_events" in memory:
                row[f"n_events_{scale}N"] = memory["n_events"]
    return row


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}" if b > 0.5 else "  n/a"  # below 0.5 MiB the baseline is sampler noise


def print_rows(rows: list[dict]) -> None:
    header = (f"{'model':<20}{'N':>5}{'tokens':>8} | {'bare':>7}{'events':>8}{'ratio':>7} {'(>=0.7)':<8}| "
              f"{'RSS MiB bare N/2N':>18} | {'RSS MiB events N/2N':>20}{'2N/N':>6} {'(~1.0)':<7}| events kept N/2N")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<20}{r['windows']:>5}{r['tokens']:>8} | {r['bare_s']:6.2f}s{r['events_s']:7.2f}s"
              f"{r['throughput_ratio']:7.2f} {'':<8}| {r['bare_rss_1N']:8.1f} /{r['bare_rss_2N']:7.1f} | "
              f"{r['events_rss_1N']:9.1f} /{r['events_rss_2N']:8.1f}{ratio(r['events_rss_2N'], r['events_rss_1N'])}"
              f" {'':<7}| {r['n_events_1N']} / {r['n_events_2N']}")
        print(f"{'':<20}  events peak grew {r['events_rss_2N'] - r['events_rss_1N']:+.1f} MiB from N to 2N; "
              f"for scale, the corpus's hook_z alone is {r['corpus_z_mib']:.0f} MiB at N, "
              f"{2 * r['corpus_z_mib']:.0f} MiB at 2N (what a non-streaming collector would add)")
        if "events_cuda_1N" in r:
            print(f"{'':<20}  CUDA peak allocated MiB: bare {r['bare_cuda_1N']:.1f} / {r['bare_cuda_2N']:.1f}, "
                  f"events {r['events_cuda_1N']:.1f} / {r['events_cuda_2N']:.1f} "
                  f"(2N/N {ratio(r['events_cuda_2N'], r['events_cuda_1N'])})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy-lm", "gpt2-small-random"])
    parser.add_argument("--windows", type=int, default=256, help="N for toy-lm (memory also at 2N)")
    parser.add_argument("--gpt2-windows", type=int, default=48, help="N for the GPT-2-small-shaped model")
    parser.add_argument("--window-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--salience", default="z_norm", choices=E.SALIENCE)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, salience "
          f"{args.salience}, window_len {args.window_len}, batch {args.batch_size}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    for name in args.models:
        if name == "gpt2-small-random":
            path, n_windows = gpt2_small_random(), args.gpt2_windows
        else:
            path = str(il.models.bundled_model_path(name)) if name in il.models.BUNDLED_MODELS else name
            n_windows = args.windows
        rows.append(bench(name, path, args, n_windows))
        print_rows(rows[-1:])
        sys.stdout.flush()
    print()
    print_rows(rows)
    print("\nratio = bare forward time / collect_events time (throughput of collection relative to a bare "
          "forward pass); RSS = peak resident memory above the level before the phase; 2N/N = events peak "
          "memory at twice the windows over that at N.")


if __name__ == "__main__":
    main()
