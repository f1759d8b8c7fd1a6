"""`interp-lib run --executor ray` on a real local Ray cluster (2 CPUs), against the local executor.

The tiny notebooks here run real papermill kernels. One of them kills the Ray worker that runs it
(its kernel's parent process) the first time, after finishing a checkpointed stage: Ray must
retry the task, the notebook must resume from its checkpoint, and the run must end with every
result exactly once. Skipped where Ray (the `[cluster]` extra) is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from interp_lib.cli import main
from interp_lib.runner import attempt_pids

ray = pytest.importorskip("ray")

PARAMETERS = 'model_name = "auto"\nseed = 0\noutput_dir = "auto"\n'


def write_notebook(folder: Path, stem: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(textwrap.dedent(source)) for source in cells]
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray head with 2 CPUs for the whole module (started once: ~10 s)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def crashing_series(tmp_path) -> tuple[Path, Path]:
    """01_sweep computes a planted value (counting its computations; in a checkpointed stage for
    the task that will be killed),
    then -- only for toy-lm / seed 0, only under a Ray worker, only the first time -- kills the
    worker process running it, as an out-of-memory kill or a lost node would."""
    folder, markers = tmp_path / "notebooks", tmp_path / "markers"
    folder.mkdir()
    markers.mkdir()
    write_notebook(folder, "01_sweep", f"""
        import os, pathlib, signal
        from interp_lib.runner import record_metrics

        markers = pathlib.Path({str(markers)!r})
        def compute():
            with open(markers / f"computed-{{model_name}}-{{seed}}", "a") as log:
                log.write("x")
            return {{"value": {{"toy-lm": 100.0, "toy-2l": 200.0}}[model_name] + seed}}
        if (model_name, seed) == ("toy-lm", 0):  # the task to be killed: checkpointed (imports torch)
            from interp_lib.checkpoint import Checkpointer
            value = Checkpointer(pathlib.Path(output_dir) / "ckpt").stage(
                "value", compute, params={{"model": model_name, "seed": seed}})["value"]
        else:
            value = compute()["value"]
        """, f"""
        parent = pathlib.Path(f"/proc/{{os.getppid()}}/cmdline").read_bytes()
        killed = markers / f"killed-{{model_name}}-{{seed}}"
        if (model_name, seed) == ("toy-lm", 0) and parent.startswith(b"ray::") and not killed.exists():
            killed.write_text(str(os.getppid()))
            os.kill(os.getppid(), signal.SIGKILL)  # the Ray worker running this task dies
            os._exit(1)
        record_metrics({{"value": value, "const": 1.0}}, output_dir, "01_sweep")
        """)
    return folder, markers


def sorted_metrics(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / "metrics.csv")
    return frame.sort_values(["model", "seed", "metric"]).reset_index(drop=True)


def test_ray_sweep_equals_local_and_survives_a_killed_worker(ray_cluster, crashing_series,
                                                            tmp_path, capsys):
    folder, markers = crashing_series
    sweep = ["run", "--notebooks-dir", str(folder), "--model", "toy-lm", "toy-2l",
             "--seeds", "0", "1", "--no-progress"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main([*sweep, "--out", str(local)]) == 0
    assert not list(markers.glob("killed-*"))  # the local executor is never killed
    for path in markers.glob("computed-*"):
        path.unlink()

    assert main([*sweep, "--out", str(on_ray), "--executor", "ray", "--max-retries", "2"]) == 0
    out = capsys.readouterr().out
    assert "[seed 0, model=toy-lm] 01_sweep: ok" in out and "(attempt 2)" in out

    # the worker really died once, and the task was retried on another worker
    killed_pid = int((markers / "killed-toy-lm-0").read_text())
    run = json.loads((on_ray / "run.json").read_text())
    assert run["executor"] == "ray" and run["status"] == "ok"
    assert run["ray"]["cpus"] == 2 and run["ray"]["max_retries"] == 2
    attempts = {(r["model"], r["seed"]): r["attempts"] for r in run["runs"]}
    assert attempts == {("toy-lm", 0): 2, ("toy-lm", 1): 1, ("toy-2l", 0): 1, ("toy-2l", 1): 1}
    pids = attempt_pids(on_ray, "model=toy-lm/seed-0/01_sweep.ipynb")
    assert len(pids) == 2 and pids[0] == killed_pid and pids[1] != killed_pid

    # resumed from its checkpoint: the stage finished before the kill was not computed again
    for model in ("toy-lm", "toy-2l"):
        for seed in (0, 1):
            assert (markers / f"computed-{model}-{seed}").read_text() == "x"

    # nothing lost, nothing duplicated: the same rows as the local executor's, once each
    assert sorted_metrics(on_ray).equals(sorted_metrics(local))
    assert len(sorted_metrics(on_ray)) == 8
    assert pd.read_csv(on_ray / "aggregate.csv").equals(pd.read_csv(local / "aggregate.csv"))
    executed = sorted(p.relative_to(on_ray) for p in on_ray.rglob("01_sweep.ipynb"))
    assert executed == sorted(p.relative_to(local) for p in local.rglob("01_sweep.ipynb"))
    assert len(executed) == 4


def test_ray_failures_and_resource_errors(ray_cluster, tmp_path, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder, "01_fails", "raise ValueError(f'bad seed {seed}')")
    out = tmp_path / "out"
    # a notebook's own exception is recorded as on the local executor, never retried
    assert main(["run", "--notebooks-dir", str(folder), "--seeds", "0", "1", "--executor", "ray",
                 "--out", str(out), "--no-progress"]) == 1
    runs = json.loads((out / "run.json").read_text())["runs"]
    assert [(r["status"], r["attempts"], r["error"]) for r in runs] == [
        ("failed", 1, "ValueError: bad seed 0"), ("failed", 1, "ValueError: bad seed 1")]
    assert runs[0]["failure"]["cell_index"] == 1
    capsys.readouterr()
    # a task no node could ever hold is refused up front
    assert main(["run", "--notebooks-dir", str(folder), "--executor", "ray", "--cpus-per-task", "8",
                 "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--cpus-per-task 8.0 / --gpus-per-task 0.0: the Ray cluster has 2 CPUs" in err


def test_ray_writes_to_an_fsspec_url(ray_cluster, tmp_path, capsys):
    """--out as a URL (file:// here; s3:// or gs:// where their package is installed): each task
    runs in a scratch folder on its worker and uploads; the driver uploads run.json and tables."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder, "01_url", "from interp_lib.runner import record_metrics\n"
                                     "record_metrics({'twice': 2.0 * seed}, output_dir, '01_url')")
    target = tmp_path / "bucket" / "run"
    assert main(["run", "--notebooks-dir", str(folder), "--seeds", "3", "4", "--executor", "ray",
                 "--out", f"file://{target}", "--no-progress"]) == 0
    assert f"results in file://{target}" in capsys.readouterr().out
    run = json.loads((target / "run.json").read_text())
    assert run["status"] == "ok" and [r["attempts"] for r in run["runs"]] == [1, 1]
    assert [r["parameters"]["output_dir"] for r in run["runs"]] == [
        f"file://{target}/seed-3", f"file://{target}/seed-4"]
    for seed in (3, 4):
        assert (target / f"seed-{seed}" / "01_url.ipynb").is_file()
        record = json.loads((target / f"seed-{seed}" / "metrics" / "01_url.json").read_text())
        assert record["metrics"] == {"twice": 2.0 * seed}
    table = pd.read_csv(target / "aggregate.csv")
    assert table["mean"].tolist() == [7.0] and table["n"].tolist() == [2]


def test_without_ray_installed_local_runs_and_ray_is_one_line_error(tmp_path):
    """In a fresh interpreter where `import ray` fails: the local executor never imports Ray,
    --executor ray stops with one line saying how to install it."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder, "01_plain", "x = seed + 1")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # `import ray` raises ImportError, as when it is not installed
        from interp_lib.cli import main
        common = ["run", "--notebooks-dir", {str(folder)!r}, "--no-progress"]
        assert main(common + ["--out", {str(tmp_path / 'local')!r}]) == 0
        assert main(common + ["--out", {str(tmp_path / 'ray')!r}, "--executor", "ray"]) == 2
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --executor ray needs Ray, which is not installed: pip install "
                      "'interp-lib[cluster]' (ray>=2.60,<3)"]
    assert not (tmp_path / "ray").exists()


SMALL_EXPLAIN = dict(model="toy-2l", windows=24, window_len=32, top_k=8, n_random=6, n_quantile=4,
                     batch_size=8)


def test_explain_in_two_shards_equals_the_unsharded_run_and_resumes(ray_cluster, tmp_path, capsys):
    """`interp-lib explain --executor ray --shards 2` (offline: the heuristic explainer, the
    contrastive scorer and the causal check) merges into the records of the one-process run;
    a rerun loads every shard's finished stages."""
    from interp_lib.explain.config import ExplainConfig
    from interp_lib.explain.pipeline import run_explainer
    from interp_lib.explain.records import load_records

    options = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_EXPLAIN.items()]
    sharded = tmp_path / "sharded"
    args = ["explain", "--out", str(sharded), "--no-progress", "--embedding", "tfidf",
            "--executor", "ray", "--shards", "2", *options]
    assert main(args) == 0
    assert "explained 8 of 8 heads in 2 shard(s)" in capsys.readouterr().out
    records, meta = load_records(sharded / "records.json")
    assert meta["config"]["shards"] == ["L0H0..L0H3", "L1H0..L1H3"]
    assert (sharded / "report.md").is_file() and (sharded / "viewer.html").stat().st_size > 0
    assert all(r.family is not None for r in records)  # one taxonomy over both shards

    single = run_explainer(ExplainConfig(**SMALL_EXPLAIN, embedding="tfidf"), tmp_path / "single",
                           skip=["taxonomy"], progress=False)
    assert [r.label for r in records] == [r.label for r in single.records]
    for merged, alone in zip(records, single.records):
        assert merged.explanation.text == alone.explanation.text
        assert merged.heuristic.text == alone.heuristic.text
        assert merged.scores.keys() == alone.scores.keys()
        for name in merged.scores:  # batching differs by shard: float noise only
            assert merged.scores[name].score == pytest.approx(alone.scores[name].score, abs=1e-5)
        assert merged.causal_effect == pytest.approx(alone.causal_effect, abs=1e-5)
        assert [e.to_dict() for e in merged.top_events] == [e.to_dict() for e in alone.top_events]

    # resumed per shard: a rerun recomputes no stage of either shard
    manifests = sorted((sharded / "shards").glob("*/checkpoints/manifest.json"))
    assert len(manifests) == 2
    before = [m.read_text() for m in manifests]
    assert main(args) == 0
    assert [m.read_text() for m in manifests] == before
    again, _ = load_records(sharded / "records.json")
    assert [r.to_dict() for r in again] == [r.to_dict() for r in records]
