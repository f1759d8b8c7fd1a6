"""Time edge attribution patching (EAP, EAP-IG) against exact edge patching on the same edges.

Exact edge patching (``interp_lib.circuits.exact_edge_effects``) runs the model once per edge
(the clean run with that one edge carrying its corrupted value; patched copies side by side
along the batch). EAP scores every edge of the graph from two forward passes and one backward
pass; EAP-IG from ``steps`` forward / backward passes (inputs variant) or ``steps`` per
upstream layer (activations variant). Exact patching of *all* edges is too slow on larger
models, so it runs on a random subset of ``--exact-edges`` edges and its time is extrapolated
linearly to the whole graph (the cost is one patched pass per edge). Printed side by side:
seconds, the ratio exact(all edges, extrapolated) / method, and each method's agreement with
the exact effects on the subset (Spearman correlation; top-10 overlap by |effect|).

    python benchmarks/bench_circuits.py                          # toy-2l, a few seconds
    python benchmarks/bench_circuits.py --model smollm2-135m --prompts 4 --length 8 --exact-edges 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import interp_lib as il  # noqa: E402
from interp_lib import circuits as C  # noqa: E402
from interp_lib import heads as H  # noqa: E402
from interp_lib import patching as P  # noqa: E402


def task(model, n_prompts: int, length: int, seed: int = 0):
    """Repeated random tokens: clean BOS + S + S, corrupted BOS + S' + S (as notebook 10)."""
    clean = H.repeat_probe_tokens(model, length, 0, n_prompts, seed=seed)
    corrupted = clean.clone()
    corrupted[:, 1:length + 1] = H.repeat_probe_tokens(model, length, 0, n_prompts, seed=seed + 1000)[:, 1:length + 1]
    position = 2 * length - 1
    return clean, corrupted, C.logit_diff_metric(clean[:, position + 1], corrupted[:, length], position)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy-2l")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--exact-edges", type=int, default=0, help="edges patched exactly (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = il.load_model(args.model, device="cpu")
    graph = C.edge_graph(model)
    clean, corrupted, metric = task(model, args.prompts, args.length, args.seed)
    C.check_edge_hooks(model)  # once per model, outside the timings
    C.edge_scores(model, clean[:1], corrupted[:1], metric, "eap", progress=False)  # warm-up: first autograd pass
    subset = graph.valid.clone()
    if args.exact_edges and args.exact_edges < graph.n_edges:
        u, v = graph.valid.nonzero(as_tuple=True)
        keep = torch.randperm(len(u), generator=torch.Generator().manual_seed(args.seed))[:args.exact_edges]
        subset = torch.zeros_like(graph.valid)
        subset[u[keep], v[keep]] = True
    n_subset = int(subset.sum())
    print(f"{args.model}: {graph.n_edges:,} edges; {args.prompts} prompts of {clean.shape[1]} tokens; "
          f"exact patching on {n_subset:,} edges; torch threads {torch.get_num_threads()}")
    exact_s, exact = timed(lambda: C.exact_edge_effects(model, clean, corrupted, metric, edges=subset, progress=False))
    exact_all = exact_s * graph.n_edges / n_subset
    rows = [("exact edge patching", exact_s, exact_all, None)]
    for method in C.METHODS:
        seconds, scores = timed(lambda: C.edge_scores(model, clean, corrupted, metric, method, steps=args.steps,
                                                      progress=False))
        k = min(10, n_subset)
        agreement = P.patching_agreement(exact[subset], scores.scores[subset], k=k) if n_subset >= 2 else None
        rows.append((f"{method}" + ("" if method == "eap" else f" ({args.steps} steps)"), seconds, seconds, agreement))
    print(f"{'method':34s} {'seconds':>9s} {'all edges s':>12s} {'exact/method':>13s} {'spearman':>9s} {'top-10':>7s}")
    for name, seconds, all_edges, agreement in rows:
        ratio = exact_all / all_edges
        spearman = "" if agreement is None else f"{agreement['spearman']:.3f}"
        overlap = "" if agreement is None else f"{agreement['top_k_overlap']:.2f}"
        print(f"{name:34s} {seconds:9.2f} {all_edges:12.2f} {ratio:13.1f} {spearman:>9s} {overlap:>7s}")


if __name__ == "__main__":
    main()
