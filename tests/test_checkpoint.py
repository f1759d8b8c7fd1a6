"""Checkpointer: memoisation, params hashing, secrets, atomic writes, damage, bad input, and a
real kill-and-resume of a subprocess (SIGKILL in the middle of a stage)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from interp_lib.checkpoint import (
    MANIFEST_NAME,
    REDACTED,
    Checkpointer,
    _host,
    default_root,
    in_colab,
    is_secret_key,
    params_hash,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Summary:
    layer: int
    scores: torch.Tensor


def _our_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _temp_files(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ----------------------------------------------------------------------------- memoisation


def test_stage_computes_once_then_loads_tensor_and_dataframe(tmp_path):
    calls = {"tensor": 0, "frame": 0}

    def make_tensor():
        calls["tensor"] += 1
        return torch.linspace(0, 1, 7).reshape(7, 1) * torch.arange(3)

    def make_frame():
        calls["frame"] += 1
        return pd.DataFrame({"layer": [0, 1, 2], "accuracy": [0.5, 0.75, 0.875]})

    ckpt = Checkpointer(tmp_path)
    params = {"layer": 3, "n": 100}
    first_tensor = ckpt.stage("tensor", make_tensor, params=params)
    first_frame = ckpt.stage("frame", make_frame, params=params)
    again_tensor = ckpt.stage("tensor", make_tensor, params=dict(params))
    # A fresh Checkpointer on the same root (as after a restart) loads too.
    again_frame = Checkpointer(tmp_path).stage("frame", make_frame, params=params)

    assert calls == {"tensor": 1, "frame": 1}
    assert torch.equal(first_tensor, again_tensor)
    pd.testing.assert_frame_equal(first_frame, again_frame)
    assert ckpt.has("tensor", params=params) and ckpt.has("frame")
    assert torch.equal(ckpt.load("tensor"), first_tensor)


def test_round_trips_dataclass_numpy_and_nested_containers(tmp_path):
    ckpt = Checkpointer(tmp_path)
    value = {"summary": Summary(2, torch.tensor([0.25, 0.5])), "array": np.arange(6).reshape(2, 3),
             "items": [1, "two", (3.0, None)]}
    ckpt.stage("mixed", lambda: value)
    loaded = Checkpointer(tmp_path).load("mixed")
    assert loaded["summary"].layer == 2 and torch.equal(loaded["summary"].scores, value["summary"].scores)
    np.testing.assert_array_equal(loaded["array"], value["array"])
    assert loaded["items"] == value["items"]


def test_force_recomputes(tmp_path):
    ckpt = Checkpointer(tmp_path)
    counter = iter(range(10))
    assert ckpt.stage("s", lambda: next(counter)) == 0
    assert ckpt.stage("s", lambda: next(counter)) == 0
    assert ckpt.stage("s", lambda: next(counter), force=True) == 1


def test_verbose_says_loaded_or_computed(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, verbose=True)
    ckpt.stage("s", lambda: 1)
    ckpt.stage("s", lambda: 1)
    out = capsys.readouterr().out
    assert "stage s: computed in" in out and "stage s: loaded from" in out


# ----------------------------------------------------------------------------- params


def test_changed_params_recompute_and_replace_the_old_result(tmp_path):
    ckpt = Checkpointer(tmp_path)
    calls = []

    def compute(layer):
        calls.append(layer)
        return torch.full((2,), float(layer))

    ckpt.stage("events", lambda: compute(3), params={"layer": 3})
    old_file = ckpt.manifest["stages"]["events"]["file"]
    result = ckpt.stage("events", lambda: compute(4), params={"layer": 4})
    assert calls == [3, 4] and torch.equal(result, torch.full((2,), 4.0))

    entry = ckpt.manifest["stages"]["events"]
    assert entry["params"] == {"layer": 4}
    assert entry["params_hash"] == params_hash({"layer": 4})
    assert entry["file"] != old_file and not (tmp_path / old_file).exists()
    assert ckpt.has("events", params={"layer": 4}) and not ckpt.has("events", params={"layer": 3})
    # Back to the first params: recomputed, never served from the other params' result.
    ckpt.stage("events", lambda: compute(3), params={"layer": 3})
    assert calls == [3, 4, 3]
    assert sorted(p.name for p in tmp_path.glob("events-*.safetensors")) == [ckpt.manifest["stages"]["events"]["file"]]


def test_manifest_records_provenance(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.stage("s", lambda: [1, 2], params={"seed": 0, "path": Path("data/x.txt"),
                                           "weights": torch.ones(3), "frame": pd.DataFrame({"a": [1]})})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    entry = manifest["stages"]["s"]
    assert set(entry) >= {"params", "params_hash", "file", "bytes", "finished_at", "seconds",
                          "library_version"}
    assert entry["finished_at"].endswith("Z") and entry["seconds"] >= 0
    assert entry["params"]["seed"] == 0 and entry["params"]["path"] == {"__path__": "data/x.txt"}
    assert entry["params"]["weights"]["__tensor__"]["shape"] == [3]
    assert (tmp_path / entry["file"]).stat().st_size == entry["bytes"]
    from importlib import metadata
    assert entry["versions"]["transformers"] == metadata.version("transformers")
    assert entry["versions"]["transformer-lens"] == metadata.version("transformer-lens")


def test_params_hash_is_key_order_independent_and_stable_across_processes():
    forward = {"layer": 3, "n": 100, "nested": {"a": 1.5, "b": [1, 2]}, "path": Path("runs/x"),
               "weights": torch.arange(4, dtype=torch.float32), "array": np.eye(2)}
    backward = dict(reversed(list(forward.items())))
    backward["nested"] = {"b": [1, 2], "a": 1.5}
    assert params_hash(forward) == params_hash(backward)
    assert params_hash({**forward, "layer": 4}) != params_hash(forward)
    assert params_hash({**forward, "weights": torch.arange(4, dtype=torch.float64)}) != params_hash(forward)

    code = textwrap.dedent("""
        from pathlib import Path
        import numpy as np, torch
        from interp_lib.checkpoint import params_hash
        print(params_hash({"layer": 3, "n": 100, "nested": {"a": 1.5, "b": [1, 2]},
                           "path": Path("runs/x"), "weights": torch.arange(4, dtype=torch.float32),
                           "array": np.eye(2)}))
    """)
    other = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(), capture_output=True,
                           text=True, timeout=120, check=True)
    assert other.stdout.strip() == params_hash(forward)


def test_model_object_as_param_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"params\['model'\].*torch.nn.Module"):
        Checkpointer(tmp_path).stage("s", lambda: 1, params={"model": torch.nn.Linear(2, 2)})


# ----------------------------------------------------------------------------- secrets


def test_secret_key_matching():
    for key in ["api_key", "OPENAI_API_KEY", "apiKey", "x-api-key", "apikey", "hf_token", "token",
                "accessToken", "client_secret", "Password", "Authorization"]:
        assert is_secret_key(key), key
    # Ordinary language-model params must stay in the hash.
    for key in ["max_tokens", "n_tokens", "tokenizer", "layer", "keys", "seed"]:
        assert not is_secret_key(key), key


def test_secrets_never_reach_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-env-789")
    ckpt = Checkpointer(tmp_path)
    params = {"api_key": "sk-planted-123", "model": "gpt2", "max_tokens": 64,
              "client": {"headers": {"Authorization": "Bearer sk-planted-456"}},
              "key": "sk-planted-env-789"}  # an innocuous name, but the value is $OPENAI_API_KEY
    ckpt.stage("explain", lambda: {"text": "a head that copies"}, params=params)

    entry = ckpt.manifest["stages"]["explain"]
    assert entry["params"]["api_key"] == REDACTED
    assert entry["params"]["client"]["headers"]["Authorization"] == REDACTED
    assert entry["params"]["key"] == REDACTED
    assert entry["params"]["max_tokens"] == 64  # not a secret
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"sk-planted" not in path.read_bytes(), path
    # Secrets are out of the hash: a rotated key reuses the result.
    rotated = {**params, "api_key": "sk-other"}
    assert ckpt.has("explain", params=rotated)


def test_result_equal_to_openai_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-result-000")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="stage 'leak'"):
        ckpt.stage("leak", lambda: os.environ["OPENAI_API_KEY"])
    assert not ckpt.has("leak") and _our_files(tmp_path) == []


# ----------------------------------------------------------------------------- atomicity, damage


def test_no_temp_files_after_success_or_failure(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.stage("a", lambda: torch.zeros(100))
    ckpt.stage("a", lambda: torch.ones(100), params={"v": 2})
    assert _temp_files(tmp_path) == []
    assert sorted(_our_files(tmp_path)) == sorted([MANIFEST_NAME, ckpt.manifest["stages"]["a"]["file"]])

    def boom():
        raise RuntimeError("compute failed")

    with pytest.raises(RuntimeError, match="compute failed"):
        ckpt.stage("b", boom)
    with pytest.raises(Exception):  # a lambda cannot be pickled: the write fails midway
        ckpt.stage("c", lambda: {"fn": lambda: 1})
    assert _temp_files(tmp_path) == []
    assert not ckpt.has("b") and not ckpt.has("c")


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.stage("a", lambda: 1)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, timeout=60, check=True)
    dead_pid = int(finished.stdout)  # exited: its pid names no live writer
    host = _host()
    dead = tmp_path / f".a-0123456789abcdef.pt.{host}-{dead_pid}.k2j4.tmp"
    alive = tmp_path / f".b-0123456789abcdef.pt.{host}-{os.getpid()}.x9y8.tmp"
    dead.write_bytes(b"half a pickle")
    alive.write_bytes(b"being written")
    Checkpointer(tmp_path)
    assert not dead.exists() and alive.exists()


def test_truncated_stage_file_is_recomputed_with_warning(tmp_path):
    ckpt = Checkpointer(tmp_path)
    calls = []
    compute = lambda: calls.append(1) or torch.arange(1000)  # noqa: E731
    ckpt.stage("s", compute)
    path = tmp_path / ckpt.manifest["stages"]["s"]["file"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match=path.name):
        result = ckpt.stage("s", compute)
    assert len(calls) == 2 and torch.equal(result, torch.arange(1000))
    assert torch.equal(ckpt.load("s"), result)


def test_garbled_stage_file_of_same_size_is_recomputed_with_warning(tmp_path):
    ckpt = Checkpointer(tmp_path)
    calls = []
    compute = lambda: calls.append(1) or {"x": torch.arange(10)}  # noqa: E731
    ckpt.stage("s", compute)
    path = tmp_path / ckpt.manifest["stages"]["s"]["file"]
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(RuntimeError, match=path.name):
        ckpt.load("s")
    with pytest.warns(UserWarning, match=path.name):
        result = ckpt.stage("s", compute)
    assert len(calls) == 2 and torch.equal(result["x"], torch.arange(10))


def test_corrupt_manifest_warns_and_recomputes(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.stage("s", lambda: 1)
    (tmp_path / MANIFEST_NAME).write_text('{"stages": {"s": ')
    with pytest.warns(UserWarning, match=MANIFEST_NAME):
        assert ckpt.stage("s", lambda: 2) == 2
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["stages"]["s"]["params_hash"]


# ----------------------------------------------------------------------------- load / clear


def test_load_unknown_stage_names_it(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.stage("a", lambda: 1, params={"n": 1})
    with pytest.raises(KeyError, match="'missing'"):
        ckpt.load("missing")
    with pytest.raises(KeyError, match="under these params"):
        ckpt.load("a", params={"n": 2})
    assert ckpt.load("a", params={"n": 1}) == 1


def test_clear_one_or_all_leaves_other_files(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.stage("a", lambda: 1)
    ckpt.stage("b", lambda: 2)
    (tmp_path / "notes.txt").write_text("keep me")
    ckpt.clear("a")
    assert not ckpt.has("a") and ckpt.has("b") and list(ckpt.manifest["stages"]) == ["b"]
    ckpt.clear("never-ran")  # no-op
    ckpt.clear()
    assert _our_files(tmp_path) == ["notes.txt"] and ckpt.manifest["stages"] == {}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["", "a/b", "../escape", "a\\b", "with space", ".hidden", "é", 3, None])
def test_bad_stage_name(tmp_path, name):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="name="):
        ckpt.stage(name, lambda: 1)
    with pytest.raises(ValueError, match="name="):
        ckpt.has(name)


def test_bad_compute_fn_and_params(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="compute_fn=.*callable"):
        ckpt.stage("s", 42)
    with pytest.raises(ValueError, match="params=.*dict"):
        ckpt.stage("s", lambda: 1, params=[("layer", 3)])
    with pytest.raises(ValueError, match="params=.*dict"):
        ckpt.has("s", params="layer=3")
    with pytest.raises(ValueError, match="root="):
        Checkpointer(root=42)
    assert _our_files(tmp_path) == []


def test_root_under_a_regular_file_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    root = blocker / "runs"
    with pytest.raises((ValueError, PermissionError)) as info:
        Checkpointer(root)
    message = str(info.value)
    assert str(root) in message and "\n" not in message
    with pytest.raises(ValueError, match="not_a_dir"):
        Checkpointer(blocker)  # the root itself is a file


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_root_is_permission_error(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            Checkpointer(root)
    finally:
        root.chmod(0o700)


# ----------------------------------------------------------------------------- roots


def test_default_root_and_colab_detection(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_LIB_RUNS", str(tmp_path / "env-runs"))
    assert default_root() == (tmp_path / "env-runs").resolve()
    monkeypatch.delenv("INTERP_LIB_RUNS")
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not in_colab()
    # from a source checkout, runs/ sits at its root whatever the working directory
    from interp_lib.paths import repo_root

    expected = repo_root() / "runs" if repo_root() is not None else (tmp_path / "runs").resolve()
    assert default_root() == expected
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    assert in_colab()


# ----------------------------------------------------------------------------- kill and resume

PIPELINE = textwrap.dedent('''
    """Three stages; stage2 can be made slow (SLOW_STAGE2=1) so the test can kill it midway."""
    import json, os, sys, time
    from pathlib import Path

    import torch
    from interp_lib.checkpoint import Checkpointer

    root, log = Path(sys.argv[1]), Path(sys.argv[2])
    marker = root.parent / (root.name + ".stage2_started")

    def note(line):
        with open(log, "a") as handle:
            handle.write(line + "\\n")

    def stage1():
        note("computing stage1")
        torch.manual_seed(0)
        return torch.randn(50)

    def stage2(x):
        note("computing stage2")
        marker.write_text("stage2 started")
        if os.environ.get("SLOW_STAGE2") == "1":
            time.sleep(30)
        return {"mean": x.mean().item(), "top": x.topk(3).indices.tolist()}

    def stage3(x, stats):
        note("computing stage3")
        return {"n_above_mean": int((x > stats["mean"]).sum()), **stats}

    ckpt = Checkpointer(root)
    params = {"n": 50, "seed": 0}
    x = ckpt.stage("stage1", stage1, params=params)
    stats = ckpt.stage("stage2", lambda: stage2(x), params=params)
    final = ckpt.stage("stage3", lambda: stage3(x, stats), params=params)
    print(json.dumps(final, sort_keys=True))
''')


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"pipeline exited early with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_mid_stage_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    root, log = tmp_path / "resumed", tmp_path / "resumed.log"
    marker = tmp_path / "resumed.stage2_started"
    env = _subprocess_env()

    stderr_path = tmp_path / "killed.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(log)],
                                env={**env, "SLOW_STAGE2": "1"}, stdout=subprocess.DEVNULL,
                                stderr=stderr)
        try:
            _wait_for(marker, proc, timeout=120)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert log.read_text().splitlines() == ["computing stage1", "computing stage2"], stderr_path.read_text()
    killed_manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert list(killed_manifest["stages"]) == ["stage1"]

    resumed = subprocess.run([sys.executable, str(script), str(root), str(log)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    lines = log.read_text().splitlines()
    assert lines.count("computing stage1") == 1  # loaded on the rerun, not recomputed
    assert lines.count("computing stage2") == 2  # the killed attempt and the rerun
    assert lines.count("computing stage3") == 1

    fresh_root, fresh_log = tmp_path / "fresh", tmp_path / "fresh.log"
    fresh = subprocess.run([sys.executable, str(script), str(fresh_root), str(fresh_log)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(resumed.stdout) == json.loads(fresh.stdout)
    assert fresh_log.read_text().splitlines() == ["computing stage1", "computing stage2",
                                                  "computing stage3"]

    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert sorted(manifest["stages"]) == ["stage1", "stage2", "stage3"]
    for entry in manifest["stages"].values():
        assert (root / entry["file"]).stat().st_size == entry["bytes"]
    assert _temp_files(root) == []


# ----------------------------------------------------------------------------- shared homes: artifacts, runtime


def test_atomic_writes_keep_the_old_file_when_killed_midway_and_leave_no_temp(tmp_path):
    import stat

    from interp_lib import artifacts

    target = tmp_path / "made" / "data.json"  # the folder is created
    size = artifacts.atomic_write_json(target, {"a": [1, 2.5], "b": "x"})
    assert size == len(target.read_bytes()) and json.loads(target.read_text()) == {"a": [1, 2.5], "b": "x"}
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600

    seen = []

    def half_then_killed(handle):
        handle.write(b'{"a": ')
        seen.extend(p.name for p in target.parent.iterdir() if p.name != "data.json")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts.atomic_write(target, half_then_killed)
    assert json.loads(target.read_text()) == {"a": [1, 2.5], "b": "x"}
    assert [p.name for p in target.parent.iterdir()] == ["data.json"]
    # the temp file named its writer, as Checkpointer's clean-up of dead writers expects
    match = artifacts.TEMP_FILE_RE.fullmatch(seen[0])
    assert match and match["target"] == "data.json" and int(match["pid"]) == os.getpid()

    with pytest.raises(ValueError):  # JSON has no NaN: refused unless asked for
        artifacts.atomic_write_json(target, {"x": float("nan")})
    artifacts.atomic_write_text(target, "é\n")
    assert target.read_bytes() == "é\n".encode()


def test_checkpoint_files_get_an_ordinary_mode(tmp_path):
    import stat

    ckpt = Checkpointer(tmp_path)
    ckpt.stage("a", lambda: torch.zeros(3))
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (MANIFEST_NAME, ckpt.manifest["stages"]["a"]["file"]):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_jsonable_makes_standard_json():
    from interp_lib.artifacts import jsonable

    @dataclasses.dataclass
    class Row:
        name: str
        values: tuple
        extra: dict

    row = Row("L0H1", (np.float32(0.5), torch.tensor(2), float("nan")), {3: np.int64(4), "inf": float("-inf")})
    expected = {"name": "L0H1", "values": [0.5, 2, None], "extra": {"3": 4, "inf": None}}
    assert jsonable(row) == expected
    assert json.loads(json.dumps(jsonable([row]), allow_nan=False)) == [expected]


def test_auto_resolution_lives_in_runtime(tmp_path, monkeypatch):
    import interp_lib as il
    from interp_lib import runtime

    for name in ("COLAB_RELEASE_TAG", "INTERP_LIB_MODEL", "INTERP_LIB_ENSEMBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert runtime.resolve_model_name("auto") == "toy-lm"  # models.DEFAULT_MODEL
    assert runtime.resolve_model_name("auto", default="toy-2l") == "toy-2l"
    assert runtime.resolve_model_name("gpt2-medium") == "gpt2-medium"
    assert runtime.resolve_dataset("auto") == "bundled" and runtime.resolve_dataset("wikitext") == "wikitext"
    assert runtime.resolve_compare_models() == ["toy-lm", "toy-2l", "toy-1l"]
    assert runtime.resolve_ensemble_members() == ["toy-lm"]
    monkeypatch.setenv("INTERP_LIB_RUNS", str(tmp_path / "runs"))
    assert runtime.resolve_output_dir("auto", "05_x") == (tmp_path / "runs" / "05_x").resolve()
    assert (tmp_path / "runs" / "05_x").is_dir()
    monkeypatch.setenv("INTERP_LIB_MODEL", str(tmp_path / "mine"))
    assert runtime.resolve_model_name("auto", default="toy-2l") == str(tmp_path / "mine")
    monkeypatch.delenv("INTERP_LIB_MODEL")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    assert runtime.resolve_model_name("auto") == "gpt2"
    assert runtime.resolve_model_name("auto", colab_default="gpt2-xl") == "gpt2-xl"
    assert runtime.resolve_dataset("auto") == "wikitext"
    assert runtime.resolve_ensemble_members() == ["gpt2", "distilgpt2"]
    with pytest.raises(ValueError, match="model_name=''"):
        runtime.resolve_model_name("")
    # the old homes hand out the same functions
    assert il.checkpoint.in_colab is runtime.in_colab and il.checkpoint.default_root is runtime.default_root
    assert il.notebook.resolve_model_name is runtime.resolve_model_name
    assert il.calibration.resolve_compare_models is runtime.resolve_compare_models
    assert il.selective.resolve_ensemble_members is runtime.resolve_ensemble_members


def test_a_fitted_temperature_scaler_round_trips_by_its_declared_fields_only():
    """Notebooks 01 / 02 checkpoint a fitted TemperatureScaler (not a dataclass): it is stored
    and rebuilt by its ``__stored_fields__``, transforms as before, and a field it does not
    declare is refused on load."""
    import json

    import interp_lib.safe_serialize as S
    from interp_lib.calibration import TemperatureScaler

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=gen) * 3
    labels = torch.randint(0, 7, (200,), generator=gen)
    scaler = TemperatureScaler().fit(logits, labels)
    back = S.loads(S.dumps({"scaler": scaler}))["scaler"]
    assert isinstance(back, TemperatureScaler) and back.temperature_ == scaler.temperature_
    torch.testing.assert_close(back.transform(logits), scaler.transform(logits), atol=0, rtol=0)

    node = {S._TAG: "object", "cls": "interp_lib.calibration:TemperatureScaler", "state": {"_lock": None}}
    with pytest.raises(ValueError, match="declares no field"):
        S._Decoder({}).decode(node)
