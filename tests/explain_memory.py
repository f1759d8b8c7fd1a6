"""Memory of the explainer on a model, each measurement in a fresh process (run by
test_real_models.py; prints one JSON line).

    python tests/explain_memory.py events MODEL N_WINDOWS WINDOW_LEN
        peak resident memory (RSS) that event collection over every head adds above its level
        after loading the model, building the windows and one warm-up batch
    python tests/explain_memory.py pipeline MODEL N_WINDOWS WINDOW_LEN OUT
        the heuristic explainer over every head plus the taxonomy (interp_lib.explain's own
        stages, default embedding), and the process's peak resident memory (VmHWM) at the end

RSS counts Python objects and PyTorch's CPU tensors alike (``tracemalloc`` sees only the
former).
"""

from __future__ import annotations

import json
import os
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak resident memory (MiB) while the block runs: the kernel's own high-water mark, reset
    at entry (writing 5 to /proc/self/clear_refs, Linux >= 4.0), so no short-lived buffer is
    missed as it could be by sampling."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = rss_mib()
        return self

    def __exit__(self, *exc):
        from interp_lib.artifacts import peak_rss_mib

        self.peak = peak_rss_mib()  # VmHWM, the high-water mark since the reset


def main(argv: list[str]) -> dict:
    import interp_lib as il
    from interp_lib.explain import events as E

    phase, model_name, n_windows, window_len = argv[0], argv[1], int(argv[2]), int(argv[3])
    model = il.load_model(model_name, device="cpu")
    if phase == "events":
        windows = E.sample_windows(model, "bundled", n_windows, window_len, seed=0)
        E.collect_events(model, windows[:16], "all", progress=False)  # warm-up: allocator, kernels
        with PeakRSS() as memory:
            result = E.collect_events(model, windows, "all", progress=False)
        return {"windows": int(windows.shape[0]), "tokens": int(windows.numel()),
                "events_mib": memory.peak - memory.start,
                "n_units": len(result.heads()),
                "n_events": sum(len(result.events(*key)) for key in result.heads())}
    if phase == "pipeline":
        from interp_lib.artifacts import peak_rss_mib
        from interp_lib.explain import pipeline

        config = il.explain.ExplainConfig(model=model_name, heads="all", dataset="bundled", windows=n_windows,
                                          window_len=window_len, top_k=12, seed=0)
        started = time.perf_counter()
        run = pipeline.run_explainer(config, argv[4], model=model, progress=False,
                                     stages=["sample", "events", "heuristic", "explain", "taxonomy"])
        records = run.records
        clustered = [r.family for r in records if r.family is not None and r.family >= 0]
        return {"seconds": time.perf_counter() - started, "peak_mib": peak_rss_mib(),
                "n_records": len(records), "n_explained": sum(r.explanation is not None for r in records),
                "n_families": len(set(clustered)), "n_clustered": len(clustered)}
    raise SystemExit(f"phase={phase!r}: expected 'events' or 'pipeline'")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
