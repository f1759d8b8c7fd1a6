"""Issue 18, "Hardening": each probe that found a defect, reproduced and now refused or survived.

1. a pickle payload planted in a run folder is never executed (marker file);
2. a stage file altered without changing its size is detected and recomputed;
3. a key given in a URL or as a parameter is written nowhere;
4. a dead / refusing endpoint fails fast, naming the URL and the cause, exit != 0;
5. failed requests and stages are not cached: a rerun against a working server explains all;
6. response bodies are capped while they are read;
7. every declared notebook parameter is accepted, and checked before a kernel starts;
8. two runs into one folder cannot lose data;
9. bad inputs to attribution and the CLI are one-line errors naming the argument.

Real files, real subprocesses and real HTTP servers on 127.0.0.1; nothing timed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from interp_lib.checkpoint import Checkpointer

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "toy-2l", "--windows", "12", "--window-len", "16", "--top-k", "4",
         "--n-random", "3", "--n-quantile", "2", "--batch-size", "6", "--no-progress"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "interp_lib.cli", *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


class _Payload:
    """Unpickling this creates ``marker`` (what an attacker's payload would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_pickle(root: Path, stage: str, marker: Path) -> None:
    """Replace a finished stage's file by a pickle payload and make the manifest agree with it
    (size and SHA-256), as someone sharing a run folder could."""
    import hashlib

    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["stages"][stage]
    data = pickle.dumps(_Payload(marker))
    (root / entry["file"]).write_bytes(data)
    entry["bytes"] = len(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    # the old format too: a manifest naming a torch.save pickle
    legacy = root / f"{stage}-{'0' * 16}.pt"
    torch.save(_Payload(marker), legacy)


# ----------------------------------------------------------------------------- 1 and 2


def test_pickle_payload_in_a_checkpoint_is_never_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    root = tmp_path / "ckpt"
    ckpt = Checkpointer(root)
    ckpt.stage("scores", lambda: {"t": torch.arange(4)}, params={"n": 4})
    _plant_pickle(root, "scores", marker)
    with pytest.warns(UserWarning, match="unreadable"):
        result = Checkpointer(root).stage("scores", lambda: {"t": torch.arange(4)}, params={"n": 4})
    assert torch.equal(result["t"], torch.arange(4))
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="unreadable"):
        _plant_pickle(root, "scores", marker)
        Checkpointer(root).load("scores")
    assert not marker.exists()

    # a manifest of the old format that names the .pt pickle: never loaded either
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format"] = 1
    manifest["stages"]["scores"]["file"] = f"scores-{'0' * 16}.pt"
    manifest["stages"]["scores"]["bytes"] = (root / f"scores-{'0' * 16}.pt").stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="old pickle format"):
        Checkpointer(root).stage("scores", lambda: {"t": torch.arange(4)}, params={"n": 4})
    assert not marker.exists()


def test_pickle_payload_in_an_explain_run_folder_is_never_executed(tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "payload-ran"
    first = _cli("explain", "--out", str(out), "--heads", "L0H0,L1H0", *SMALL)
    assert first.returncode == 0, first.stderr
    _plant_pickle(out / "checkpoints", "sample", marker)
    resumed = _cli("explain", "--out", str(out), "--heads", "L0H0,L1H0", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert not marker.exists()
    assert "unreadable" in resumed.stderr and "recomputing" in resumed.stderr
    assert "explained 2 of 2 heads" in resumed.stdout


def test_a_changed_int64_of_the_same_size_is_detected_and_recomputed(tmp_path):
    ckpt = Checkpointer(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(1000, 1016, dtype=torch.int64)

    ckpt.stage("ids", compute, params={"n": 16})
    path = tmp_path / ckpt.manifest["stages"]["ids"]["file"]
    data = bytearray(path.read_bytes())
    at = bytes(data).index((1005).to_bytes(8, "little"))
    data[at:at + 8] = (1006).to_bytes(8, "little")  # one int64 changed, size unchanged
    path.write_bytes(bytes(data))
    assert ckpt.has("ids", {"n": 16})  # size matches: only the content hash can tell
    with pytest.raises(RuntimeError, match="content changed"):
        ckpt.load("ids", {"n": 16})
    with pytest.warns(UserWarning, match="content changed"):
        again = ckpt.stage("ids", compute, params={"n": 16})
    assert torch.equal(again, torch.arange(1000, 1016)) and len(calls) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ckpt.load("ids", {"n": 16}), again)  # the recomputed file is sound


def test_results_that_cannot_be_stored_without_pickle_are_refused_by_path(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError, match=r"result\['model'\] is a torch.nn.modules.linear:Linear"):
        ckpt.stage("bad", lambda: {"model": torch.nn.Linear(2, 2)})
    assert not ckpt.has("bad")
