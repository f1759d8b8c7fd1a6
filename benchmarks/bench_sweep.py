"""Time a 4-task sweep: `interp-lib run` with the local executor against a local Ray cluster.

The sweep is 2 models x 2 seeds of one notebook (default: a generated notebook whose kernel does
``--work`` seconds-worth of single-threaded CPU work, a stand-in for an analysis notebook; or
``--notebook PATH`` for a real one, e.g. notebooks/00_tour.ipynb with ``--models toy-lm toy-2l``).
Both executors run the same sweep into separate folders; the Ray cluster gets ``--num-cpus``
CPUs (one per task). One run each: the ratio is a single measurement on whatever else the
machine is doing at the time.

    python benchmarks/bench_sweep.py
    python benchmarks/bench_sweep.py --num-cpus 4 --work 20
    python benchmarks/bench_sweep.py --notebook notebooks/00_tour.ipynb --models toy-lm toy-2l
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interp_lib.runner import RunConfig, run_series  # noqa: E402

WORK_NOTEBOOK_CELL = """
import time
from interp_lib.runner import record_metrics
start, total, i = time.process_time(), 0, 0
while time.process_time() - start < work:  # CPU time, so the work is the same under contention
    total += sum(k * k for k in range(10_000))
    i += 1
record_metrics({"rounds": float(i)}, output_dir, "01_work")
"""


def write_work_notebook(folder: Path, work: float) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(
        f'model_name = "auto"\nseed = 0\noutput_dir = "auto"\nwork = {float(work)}\n',
        metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(WORK_NOTEBOOK_CELL)]
    path = folder / "01_work.ipynb"
    nbformat.write(nb, path)
    return path


def timed_run(config: RunConfig) -> float:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = run_series(config)
    if status != 0:
        raise SystemExit(f"the {config.executor} sweep failed (exit {status}); see {config.out}/run.json")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", default=None, help="a notebook to sweep (default: generated)")
    parser.add_argument("--models", nargs=2, default=["toy-lm", "toy-2l"], metavar="NAME")
    parser.add_argument("--seeds", nargs=2, type=int, default=[0, 1], metavar="SEED")
    parser.add_argument("--work", type=float, default=8.0,
                        help="CPU seconds of work per task in the generated notebook (default 8)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        tmp_path = Path(tmp)
        notebook = Path(args.notebook).resolve() if args.notebook else \
            write_work_notebook(tmp_path, args.work)
        common = dict(notebooks=[str(notebook)], seeds=list(args.seeds), models=list(args.models),
                      progress=False)
        local = timed_run(RunConfig(**common, out=str(tmp_path / "local")))
        started = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - started
        try:
            on_ray = timed_run(RunConfig(**common, out=str(tmp_path / "ray"), executor="ray"))
        finally:
            ray.shutdown()
    cores = os.cpu_count()
    print(f"4-task sweep ({notebook.name}, models {' '.join(args.models)}, seeds "
          f"{' '.join(map(str, args.seeds))}; machine: {cores} cores, Ray: {args.num_cpus} CPUs)")
    print(f"  local executor: {local:7.1f} s")
    print(f"  ray executor:   {on_ray:7.1f} s  (+ {startup:.1f} s to start the local Ray cluster)")
    print(f"  speed-up local/ray: {local / on_ray:.2f}x ({local / (on_ray + startup):.2f}x "
          "counting the cluster start-up)")


if __name__ == "__main__":
    main()
