"""`interp-lib run`: real papermill executions of tiny notebooks (no model), metrics, bad input.

Each executed notebook starts a real kernel (a few seconds), so the series here are small. The
runner itself puts this checkout on the kernels' PYTHONPATH, so no environment set-up is needed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from interp_lib.cli import main
from interp_lib.runner import aggregate, load_metrics, record_metrics

PARAMETERS = 'model_name = "auto"\nseed = 0\noutput_dir = "auto"\n'


def write_notebook(folder: Path, stem: str, parameters: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {stem}"),
                nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def series(tmp_path) -> Path:
    """01_toy records metrics (value = seed * scale); 02_plain declares `width`, not `scale`,
    and records nothing (no interp_lib import: a fast kernel)."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder, "01_toy", PARAMETERS + "scale = 1.0\n",
                   "from interp_lib.runner import record_metrics\n"
                   'record_metrics({"value": seed * scale, "const": 1.0}, output_dir, "01_toy", '
                   "seed=seed, model=model_name)")
    write_notebook(folder, "02_plain", PARAMETERS + "width = 3\n",
                   "assert isinstance(width, int) and seed >= 0\n"
                   "assert 'scale' not in globals()")
    return folder


def read_run(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_two_seeds_execute_the_series_and_aggregate(series, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--notebooks-dir", str(series), "--seeds", "3", "5", "-p", "scale", "2.5",
                 "-p", "width", "7", "--model", "toy-2l", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out

    for seed in (3, 5):
        for stem in ("01_toy", "02_plain"):
            executed = nbformat.read(out / f"seed-{seed}" / f"{stem}.ipynb", as_version=4)
            injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
            assert len(injected) == 1
            assert f"seed = {seed}" in injected[0].source
            assert repr(str(out / f"seed-{seed}")) in injected[0].source.replace('"', "'")
            # -p scale goes only to the notebook that declares it, -p width only to the other
            assert ("scale = 2.5" in injected[0].source) == (stem == "01_toy")
            assert ("width = 7" in injected[0].source) == (stem == "02_plain")
        record = json.loads((out / f"seed-{seed}" / "metrics" / "01_toy.json").read_text())
        assert 20 < record.pop("peak_rss_mib") < 4000  # the kernel's peak memory, in MiB
        assert record == {"notebook": "01_toy", "metrics": {"value": seed * 2.5, "const": 1.0},
                          "seed": seed, "model": "toy-2l"}
        assert not (out / f"seed-{seed}" / "metrics" / "02_plain.json").exists()

    run = read_run(out)
    assert run["seeds"] == [3, 5] and run["status"] == "ok" and run["finished"]
    assert run["params"] == {"scale": 2.5, "width": 7} and run["model"] == "toy-2l"
    from importlib import metadata
    assert run["environment"]["packages"]["transformers"] == metadata.version("transformers")
    assert [(r["seed"], r["notebook"], r["status"]) for r in run["runs"]] == [
        (3, "01_toy", "ok"), (3, "02_plain", "ok"), (5, "01_toy", "ok"), (5, "02_plain", "ok")]
    assert all(r["seconds"] > 0 for r in run["runs"])
    # each notebook's peak memory comes from its metrics file (none for the one that records none)
    assert [r["peak_rss_mib"] for r in run["runs"]] == [
        json.loads((out / f"seed-{s}" / "metrics" / "01_toy.json").read_text())["peak_rss_mib"] if nb == "01_toy"
        else None for s, nb in ((3, "01_toy"), (3, "02_plain"), (5, "01_toy"), (5, "02_plain"))]
    assert "01_toy: ok in" in captured.out and "MiB" in captured.out
    assert run["runs"][0]["metrics"] == "seed-3/metrics/01_toy.json"
    assert run["runs"][1]["metrics"] is None

    table = pd.read_csv(out / "aggregate.csv")
    assert list(table.columns) == ["notebook", "model", "params", "metric", "n", "mean", "std",
                                   "ci95_low", "ci95_high", "seed_3", "seed_5"]
    assert set(table["model"]) == {"toy-2l"} and set(table["params"]) == {'{"scale": 2.5}'}
    value = table.set_index("metric").loc["value"]
    samples = np.array([3 * 2.5, 5 * 2.5])
    mean, std = samples.mean(), samples.std(ddof=1)
    half = stats.t.ppf(0.975, df=1) * std / math.sqrt(2)  # 12.706 * std / sqrt(2)
    assert value["n"] == 2 and value["notebook"] == "01_toy"
    assert value["mean"] == pytest.approx(10.0)
    assert value["std"] == pytest.approx(std)
    assert value["ci95_low"] == pytest.approx(mean - half)
    assert value["ci95_high"] == pytest.approx(mean + half)
    assert (value["seed_3"], value["seed_5"]) == (7.5, 12.5)
    const = table.set_index("metric").loc["const"]
    assert (const["mean"], const["std"], const["ci95_low"], const["ci95_high"]) == (1, 0, 1, 1)
    markdown = (out / "aggregate.md").read_text()
    assert "| 01_toy | value | 2 | 10 |" in markdown
    assert "seed_3" in markdown


def test_one_seed_writes_a_summary(series, tmp_path, capsys):
    out = tmp_path / "single"
    assert main(["run", "01", "--notebooks-dir", str(series), "--seeds", "2",
                 "--out", str(out), "--no-progress"]) == 0
    assert "01_toy" in capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert "| 01_toy | value | 2 |" in summary and "| 01_toy | const | 1 |" in summary
    assert not (out / "aggregate.csv").exists()
    assert [r["notebook"] for r in read_run(out)["runs"]] == ["01_toy"]
    # the results page, written by the run: every recorded metric, its run's command and status
    page = (out / "results.md").read_text()
    assert "### 01_toy (01_toy)" in page and "| value | 1 | 2 |" in page and "status ok" in page
    entry = read_run(out)["runs"][0]
    assert (f"per notebook: 01_toy {entry['seconds']:.0f} s, {entry['peak_rss_mib']:.0f} MiB. "
            f"Total {entry['seconds'] / 60:.1f} min.") in page
    assert not (out / "seed-2" / "02_plain.ipynb").exists()


def test_failing_notebook_is_recorded_and_other_seeds_still_run(tmp_path, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder, "01_fragile", PARAMETERS,
                   "if seed == 1:\n    raise RuntimeError('boom on seed 1')")
    write_notebook(folder, "02_after", PARAMETERS, "x = 1")
    out = tmp_path / "out"
    code = main(["run", "--notebooks-dir", str(folder), "--seeds", "1", "2", "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    failed_copy = out / "seed-1" / "01_fragile.ipynb"
    assert str(failed_copy) in err and "RuntimeError: boom on seed 1" in err
    assert "Traceback" not in err
    assert failed_copy.is_file()
    outputs = [o for c in nbformat.read(failed_copy, 4).cells if c.cell_type == "code"
               for o in c.get("outputs", [])]
    assert any(o.get("ename") == "RuntimeError" for o in outputs)
    run = read_run(out)
    assert run["status"] == "failed"
    statuses = {(r["seed"], r["notebook"]): r["status"] for r in run["runs"]}
    # policy: the rest of the failed seed and the other seeds still run
    assert statuses == {(1, "01_fragile"): "failed", (1, "02_after"): "ok",
                        (2, "01_fragile"): "ok", (2, "02_after"): "ok"}
    assert run["runs"][0]["error"] == "RuntimeError: boom on seed 1"
    # run.json keeps the whole message and the failing cell, the tables list the failure
    failure = run["runs"][0]["failure"]
    source = "if seed == 1:\n    raise RuntimeError('boom on seed 1')"
    assert failure == {"type": "RuntimeError", "message": "boom on seed 1",
                       "cell_index": 2, "execution_count": 3, "cell_source": source}
    # the index is the cell's in the notebook as written (not counting papermill's cells)
    assert failure["cell_index"] == 2
    assert nbformat.read(folder / "01_fragile.ipynb", 4).cells[2].source == source
    assert run["runs"][1]["failure"] is None
    assert ("| 01_fragile | - | 1 | RuntimeError: boom on seed 1 | 2 | seed-1/01_fragile.ipynb |"
            in (out / "aggregate.md").read_text())
    assert (out / "seed-2" / "02_after.ipynb").is_file()


def test_fail_fast_skips_the_rest_and_tables_survive_no_metrics(tmp_path, capsys):
    write_notebook(tmp_path, "01_fragile", PARAMETERS,
                   "if seed == 1:\n    raise RuntimeError('boom on seed 1')")
    out = tmp_path / "out"
    code = main(["run", "01", "--notebooks-dir", str(tmp_path), "--seeds", "1", "2",
                 "--fail-fast", "--out", str(out), "--no-progress"])
    assert code == 1
    assert "Traceback" not in capsys.readouterr().err
    assert [r["status"] for r in read_run(out)["runs"]] == ["failed", "skipped"]
    assert not (out / "seed-2" / "01_fragile.ipynb").exists()
    assert pd.read_csv(out / "aggregate.csv").empty


def test_undeclared_parameter_is_refused_before_running(series, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "01", "--notebooks-dir", str(series), "-p", "sclae", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: parameter 'sclae' is not declared by any selected notebook "
                          "(01_toy.ipynb declares: model_name, seed, output_dir, scale)")
    assert "did you mean 'scale'" in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing executed, no output folder

    assert main(["run", "--notebooks-dir", str(series), "-p", "seed", "1", "--out", str(out)]) == 2
    assert "use --seeds" in capsys.readouterr().err
    assert not out.exists()

    # a numeric parameter given text is refused too (a typo would otherwise fail mid-run)
    assert main(["run", "--notebooks-dir", str(series), "-p", "scale", "2x", "--out", str(out)]) == 2
    assert ("parameter 'scale': 01_toy.ipynb declares a float (default 1.0), got text '2x'"
            in capsys.readouterr().err)
    assert not out.exists()


def test_notebook_without_the_contract_parameters_is_refused(tmp_path, capsys):
    write_notebook(tmp_path, "00_bare", "n = 1\n", "pass")
    assert main(["run", "--notebooks-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "00_bare.ipynb does not follow the notebook contract" in err
    assert "missing: model_name, seed, output_dir" in err


def test_unwritable_out_is_refused_with_its_path(series, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "runs"  # parent is a regular file: not creatable even as root
    assert main(["run", "--notebooks-dir", str(series), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output folder {out} is not writable") and len(err.splitlines()) == 1


def test_unknown_selector_and_empty_folder(series, tmp_path, capsys):
    assert main(["run", "07", "--notebooks-dir", str(series)]) == 2
    err = capsys.readouterr().err
    assert "unknown notebook '07' (available: 01_toy, 02_plain)" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", "--notebooks-dir", str(empty)]) == 2
    assert f"no notebooks found in {empty}" in capsys.readouterr().err

    assert main(["run", "--notebooks-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_argparse_errors_and_help_return_codes(capsys):
    assert main(["run", "--seeds", "zero"]) == 2
    assert "invalid int value: 'zero'" in capsys.readouterr().err
    assert main(["run", "--seeds", "1", "1"]) == 2
    assert "listed more than once" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert main([]) == 2


def test_record_metrics_writes_json_atomically(tmp_path):
    path = record_metrics({"loss": np.float32(0.5), "acc": torch.tensor(0.25), "n": 3},
                          tmp_path, "05_x", seed=np.int64(4), where=tmp_path)
    assert path == tmp_path / "metrics" / "05_x.json"
    record = json.loads(path.read_text())
    assert record.pop("peak_rss_mib") > 0
    assert record == {
        "notebook": "05_x", "metrics": {"loss": 0.5, "acc": 0.25, "n": 3.0},
        "seed": 4, "where": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["05_x.json"]  # no temp file left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_recorded_peak_memory_is_the_process_high_water_mark(tmp_path):
    """Planted: a child touches 300 MiB, frees it, then records; the file's peak is the kernel's
    own high-water mark (/proc's VmHWM, read right after, not ru_maxrss, which can carry the
    size of the pytest process that started it) and includes the 300 MiB."""
    import subprocess
    script = ("import numpy as np, json, sys\n"
              "from interp_lib.artifacts import record_metrics\n"
              "a = np.ones(300 * 2**20 // 8); del a\n"
              "path = record_metrics({'x': 1.0}, sys.argv[1], '00_x')\n"
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
              "print(json.dumps([json.loads(path.read_text())['peak_rss_mib'], int(hwm) / 1024]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    recorded, high_water = json.loads(done.stdout)
    assert recorded > 300
    assert recorded == pytest.approx(high_water, abs=2)


@pytest.mark.parametrize("metrics, message", [
    ({}, "empty"),
    ([("a", 1.0)], "expected a dict"),
    ({"loss": float("nan")}, "metrics['loss']: expected a finite real number, got nan"),
    ({"ok": 1.0, "inf": np.inf}, "metrics['inf']"),
    ({"flag": True}, "metrics['flag']"),
    ({"text": "0.5"}, "metrics['text']"),
    ({"vec": torch.ones(2)}, "metrics['vec']: expected a finite real number, got an array of shape (2,)"),
    ({"z": 1 + 2j}, "metrics['z']"),
    ({"none": None}, "metrics['none']"),
    ({1: 0.5}, "metrics key 1"),
])
def test_record_metrics_rejects_bad_metrics(tmp_path, metrics, message):
    with pytest.raises(ValueError) as raised:
        record_metrics(metrics, tmp_path, "00_x")
    assert message in str(raised.value)
    assert not (tmp_path / "metrics").exists()


def test_record_metrics_rejects_bad_notebook_and_context(tmp_path):
    with pytest.raises(ValueError, match="notebook='a/b'"):
        record_metrics({"x": 1.0}, tmp_path, "a/b")
    with pytest.raises(ValueError, match="context model="):
        record_metrics({"x": 1.0}, tmp_path, "00_x", model=object())


def test_load_metrics_and_aggregate(tmp_path):
    for seed, value in [(0, 1.0), (1, 2.0), (10, 6.0)]:
        record_metrics({"b": value, "a": -value}, tmp_path / f"seed-{seed}", "00_x")
    record_metrics({"only": 4.0}, tmp_path / "seed-1", "01_y")
    frame = load_metrics(tmp_path)
    assert list(frame.columns) == ["model", "params", "seed", "notebook", "metric", "value"]
    assert frame["seed"].tolist() == [0, 0, 1, 1, 1, 10, 10]  # numeric, not string, order
    assert frame["metric"].tolist()[:2] == ["b", "a"]  # recorded order kept

    table = aggregate(frame).set_index("metric")
    b = np.array([1.0, 2.0, 6.0])
    half = stats.t.ppf(0.975, 2) * b.std(ddof=1) / math.sqrt(3)
    assert table.loc["b", "mean"] == pytest.approx(3.0)
    assert table.loc["b", "ci95_low"] == pytest.approx(3.0 - half)
    assert table.loc["b", "ci95_high"] == pytest.approx(3.0 + half)
    assert table.loc["a", "mean"] == pytest.approx(-3.0)
    only = table.loc["only"]
    assert only["n"] == 1 and only["mean"] == 4.0 and math.isnan(only["std"])
    assert math.isnan(only["ci95_low"]) and math.isnan(only["seed_0"]) and only["seed_1"] == 4.0

    assert list(aggregate(frame, confidence=0.9).columns)[7:9] == ["ci90_low", "ci90_high"]
    with pytest.raises(ValueError, match="several values"):
        aggregate(pd.concat([frame, frame.head(1)]))
    with pytest.raises(ValueError, match="missing column"):
        aggregate(frame.drop(columns="seed"))

    # a single output folder loads too; its seed comes from the file
    single = tmp_path / "single"
    record_metrics({"m": 1.0}, single, "02_z", seed=7)
    assert load_metrics(single).iloc[0].tolist() == [None, "{}", 7, "02_z", "m", 1.0]


# --------------------------------------------------------------------------------------------
# Grids (models x -p values x seeds) and merging run folders
# --------------------------------------------------------------------------------------------

GRID_VALUE = 'value = {"toy-lm": 100.0, "toy-2l": 200.0}[model_name] + 10 * scale + seed'


@pytest.fixture
def grid_series(tmp_path) -> Path:
    """01_grid records a value planted from its whole configuration; 02_free does not declare
    `scale`, so it must run once per model and seed, not once per scale."""
    folder = tmp_path / "grid_notebooks"
    folder.mkdir()
    write_notebook(folder, "01_grid", PARAMETERS + "scale = 1\n",
                   "from interp_lib.runner import record_metrics\n" + GRID_VALUE + "\n"
                   'record_metrics({"value": value}, output_dir, "01_grid")')
    write_notebook(folder, "02_free", PARAMETERS,
                   "from interp_lib.runner import record_metrics\n"
                   'record_metrics({"n": float(len(model_name) + seed)}, output_dir, "02_free")')
    return folder


def planted(model: str, scale: int, seed: int) -> float:
    return {"toy-lm": 100.0, "toy-2l": 200.0}[model] + 10 * scale + seed


def test_grid_keeps_configurations_apart_and_aggregate_merges_shards(grid_series, tmp_path, capsys):
    shard0, shard1 = tmp_path / "shard0", tmp_path / "shard1"
    grid = ["--model", "toy-lm", "toy-2l", "-p", "scale", "1", "-p", "scale", "2"]
    assert main(["run", "--notebooks-dir", str(grid_series), *grid, "--seeds", "0",
                 "--out", str(shard0), "--no-progress"]) == 0
    capsys.readouterr()
    run = read_run(shard0)
    configs = {(r["notebook"], r["model"], json.dumps(r["params"]), r["seed"]): r for r in run["runs"]}
    # 01_grid: 2 models x 2 scales; 02_free: 2 models only (no duplicate executions)
    assert sorted(configs) == sorted(
        [("01_grid", m, json.dumps({"scale": s}), 0) for m in ("toy-lm", "toy-2l") for s in (1, 2)]
        + [("02_free", m, "{}", 0) for m in ("toy-lm", "toy-2l")])
    assert run["grid"] == {"scale": [1, 2]} and run["models"] == ["toy-lm", "toy-2l"]
    for (stem, model, params, seed), entry in configs.items():
        assert entry["status"] == "ok" and entry["attempts"] == 1
        scale = json.loads(params).get("scale")
        folder = f"model={model}" + (f",scale={scale}" if scale else "")
        assert entry["config"] == folder and entry["output"] == f"{folder}/seed-0/{stem}.ipynb"
        assert entry["parameters"]["output_dir"] == str(shard0 / folder / "seed-0")
        assert (shard0 / entry["output"]).is_file()
        record = json.loads((shard0 / entry["metrics"]).read_text())
        expected = planted(model, scale, seed) if stem == "01_grid" else len(model) + seed
        assert record["metrics"] == {"value" if stem == "01_grid" else "n": expected}

    # every row of the tables carries its whole configuration
    rows = pd.read_csv(shard0 / "metrics.csv")
    assert list(rows.columns) == ["model", "params", "seed", "notebook", "metric", "value"]
    for row in rows[rows["notebook"] == "01_grid"].itertuples():
        assert row.value == planted(row.model, json.loads(row.params)["scale"], row.seed)
    assert len(pd.read_csv(shard0 / "aggregate.csv")) == 6  # one seed: n = 1 per configuration

    # a second shard with another seed, run elsewhere, merged by `interp-lib aggregate`
    assert main(["run", "01", "--notebooks-dir", str(grid_series), *grid, "--seeds", "1",
                 "--out", str(shard1), "--no-progress"]) == 0
    merged = tmp_path / "merged"
    assert main(["aggregate", str(shard0), str(shard1), "--out", str(merged)]) == 0
    assert "merged 10 values from 2 folder(s)" in capsys.readouterr().out
    table = pd.read_csv(merged / "aggregate.csv")
    grid_rows = table[table["notebook"] == "01_grid"]
    assert len(grid_rows) == 4 and (grid_rows["n"] == 2).all()
    for row in grid_rows.itertuples():
        scale = json.loads(row.params)["scale"]
        samples = np.array([planted(row.model, scale, 0), planted(row.model, scale, 1)])
        low, high = stats.t.interval(0.95, 1, loc=samples.mean(), scale=stats.sem(samples))
        assert row.mean == pytest.approx(samples.mean()) and row.std == pytest.approx(samples.std(ddof=1))
        assert (row.ci95_low, row.ci95_high) == (pytest.approx(low), pytest.approx(high))
        assert (row.seed_0, row.seed_1) == tuple(samples)
    free = table[table["notebook"] == "02_free"]
    assert len(free) == 2 and (free["n"] == 1).all() and free["seed_1"].isna().all()
    assert set(pd.read_csv(merged / "metrics.csv")["run"]) == {str(shard0), str(shard1)}
    assert "| 01_grid | toy-lm |" in (merged / "aggregate.md").read_text()

    # the same results twice would count their seeds twice: refused with both folders named
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shard0, copy)
    assert main(["aggregate", str(shard0), str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shard0} and {copy} both hold seed 0") and len(err.splitlines()) == 1
    assert main(["aggregate", str(shard0), str(shard0)]) == 2
    assert f"{shard0} is listed twice" in capsys.readouterr().err
    assert main(["aggregate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_grid_input_errors(grid_series, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "--notebooks-dir", str(grid_series), "-p", "scale", "1", "-p", "scale", "1",
                 "--out", str(out)]) == 2
    assert "error: -p scale 1: this value is given twice" in capsys.readouterr().err
    assert main(["run", "--notebooks-dir", str(grid_series), "--model", "toy-lm", "toy-lm",
                 "--out", str(out)]) == 2
    assert "--model: 'toy-lm' is listed more than once" in capsys.readouterr().err
    # every alternative is checked before anything runs
    assert main(["run", "--notebooks-dir", str(grid_series), "-p", "scale", "1", "-p", "scale", "x",
                 "--out", str(out)]) == 2
    assert "parameter 'scale': 01_grid.ipynb declares a int (default 1), got text 'x'" \
        in capsys.readouterr().err
    assert main(["run", "--notebooks-dir", str(grid_series), "--address", "x:1", "--out", str(out)]) == 2
    assert "--address: only used with --executor ray" in capsys.readouterr().err
    assert not out.exists()


def test_out_as_an_fsspec_url(series, tmp_path, capsys):
    """--out memory://... (a real fsspec filesystem, in this process): the executed copies,
    metrics, run.json and tables all land there; an unknown protocol is one line."""
    import fsspec

    fs = fsspec.filesystem("memory")
    url = f"memory://runs-{tmp_path.name}"
    assert main(["run", "01", "--notebooks-dir", str(series), "--seeds", "1", "2", "-p", "scale", "3",
                 "--out", url, "--no-progress"]) == 0
    assert f"results in {url}" in capsys.readouterr().out
    root = url[len("memory://"):]
    run = json.loads(fs.cat_file(f"{root}/run.json"))
    assert run["status"] == "ok" and [r["status"] for r in run["runs"]] == ["ok", "ok"]
    for seed in (1, 2):
        record = json.loads(fs.cat_file(f"{root}/seed-{seed}/metrics/01_toy.json"))
        assert record["metrics"] == {"value": seed * 3.0, "const": 1.0}
        assert fs.exists(f"{root}/seed-{seed}/01_toy.ipynb")
    with fs.open(f"{root}/aggregate.csv") as handle:
        table = pd.read_csv(handle).set_index("metric")
    assert table.loc["value", "mean"] == pytest.approx(4.5) and table.loc["value", "n"] == 2
    assert fs.exists(f"{root}/aggregate.md") and fs.exists(f"{root}/metrics.csv")

    assert main(["run", "01", "--notebooks-dir", str(series), "--out", "nosuchfs://x/y"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out nosuchfs://x/y: ") and len(err.splitlines()) == 1


def test_record_metrics_has_one_home_and_run_manifests_round_trip(tmp_path):
    import interp_lib as il
    from interp_lib import artifacts

    assert il.record_metrics is il.runner.record_metrics is artifacts.record_metrics
    assert il.runner.UsageError is il.cli.UsageError is il.errors.UsageError
    assert artifacts.read_run_manifest(tmp_path) is None
    record = {"argv": ["interp-lib", "run"], "started": "now", "path": tmp_path, "nan": float("nan")}
    path = artifacts.write_run_manifest(tmp_path, record)
    assert path == tmp_path / "run.json"
    back = artifacts.read_run_manifest(tmp_path)
    assert back["argv"] == record["argv"] and back["path"] == str(tmp_path) and math.isnan(back["nan"])
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="run.json: not a run.json written by interp-lib run"):
        artifacts.read_run_manifest(tmp_path)
    with pytest.raises(ValueError, match="run.json: not a run.json"):
        load_metrics(tmp_path)
