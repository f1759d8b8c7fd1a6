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
    # the forged manifest entry no longer verifies (issue 29, item 5): refused before it is read
    with pytest.warns(UserWarning, match="unreadable|produced elsewhere"):
        result = Checkpointer(root).stage("scores", lambda: {"t": torch.arange(4)}, params={"n": 4})
    assert torch.equal(result["t"], torch.arange(4))
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="unreadable|produced elsewhere"):
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
    assert ("unreadable" in resumed.stderr or "produced elsewhere" in resumed.stderr) \
        and "recomputing" in resumed.stderr
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


# ----------------------------------------------------------------------------- LLM endpoints

PLANTED = "sk-PLANTED-hardening-0123456789abcdef"
LLM_FLAGS = ["--explainer", "test-model", "--scorers", "contrastive", "--refine-rounds", "0",
             "--skip", "taxonomy", "--max-retries", "1", "--timeout", "20"]


def _explaining_responder(body: dict) -> str:
    """Answers every explain prompt with a valid explanation."""
    return json.dumps({"explanation": "Attends from a token to the token right before it.",
                       "attends_from": "every token", "attends_to": "the previous token",
                       "positive_examples": ["one two three"], "negative_examples": ["a"]})


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_key_in_the_base_url_is_sent_as_bearer_and_written_nowhere(tmp_path, make_server):
    server = make_server(require_api_key=PLANTED, responder=_explaining_responder)
    url = server.url.replace("http://", f"http://user:{PLANTED}@")
    out = tmp_path / "run"
    done = _cli("explain", "--out", str(out), "--heads", "L0H0,L1H0", *SMALL, *LLM_FLAGS,
                "--base-url", url + "?api_key=" + PLANTED)
    assert done.returncode == 0, done.stderr
    assert "explained 2 of 2 heads" in done.stdout
    assert server.requests, "the server was reached"
    assert PLANTED not in done.stdout + done.stderr
    assert list((out / "llm_cache").rglob("*.jsonl")), "answers were cached"
    assert _files_containing(out, PLANTED) == []
    assert _files_containing(out, "user:") == []
    config = json.loads((out / "config.json").read_text())
    assert config["base_url"] == server.url


def test_refused_port_fails_fast_naming_the_url_then_a_rerun_explains_every_head(tmp_path, make_server):
    out = tmp_path / "run"
    dead = f"http://user:{PLANTED}@127.0.0.1:{_free_port()}/v1"
    refused = _cli("explain", "--out", str(out), "--heads", "L0H0,L1H0", *SMALL, *LLM_FLAGS,
                   "--max-retries", "5", "--base-url", dead)
    assert refused.returncode == 1
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "connection error" in error[0] and "127.0.0.1" in error[0], refused.stderr
    assert PLANTED not in refused.stdout + refused.stderr and _files_containing(out, PLANTED) == []
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    assert "explain" not in manifest["stages"]  # nothing of the failed stage is finished

    server = make_server(responder=_explaining_responder)
    fixed = _cli("explain", "--out", str(out), "--heads", "L0H0,L1H0", *SMALL, *LLM_FLAGS,
                 "--base-url", server.url)
    assert fixed.returncode == 0, fixed.stderr
    assert "explained 2 of 2 heads" in fixed.stdout


@pytest.mark.parametrize("fault", ["401", "html"])
def test_an_endpoint_that_refuses_or_answers_html_stops_the_run(tmp_path, make_server, fault):
    from interp_lib.cli import main

    if fault == "401":
        server = make_server(require_api_key="another-key", responder=_explaining_responder)
    else:
        server = make_server(responder=_explaining_responder, fault_rate=1.0, faults=("html",))
    out = tmp_path / "run"
    status = main(["explain", "--out", str(out), "--heads", "L0H0,L1H0", *SMALL, *LLM_FLAGS,
                   "--base-url", server.url])
    assert status == 1
    assert len(server.requests) <= 5  # stopped by the breaker, not every head retried
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    assert "explain" not in manifest["stages"]
    assert not list((out / "llm_cache").rglob("*.jsonl"))


def test_failed_requests_are_not_cached_and_a_rerun_retries_them(tmp_path, make_server, capsys):
    from interp_lib.cli import main

    # the first two requests get a 500 twice (max_retries=1): both heads fail, transiently
    server = make_server(responder=_explaining_responder, fault_sequence=["500"] * 4)
    args = ["explain", "--out", str(tmp_path / "run"), "--heads", "L0H0,L1H0", *SMALL,
            *LLM_FLAGS, "--concurrency", "1", "--base-url", server.url]
    assert main(args) == 1
    first = capsys.readouterr()
    assert "explained 0 of 2 heads" in first.out and "not saved as finished" in first.err
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest.json").read_text())
    assert "explain" not in manifest["stages"] and "score" not in manifest["stages"]
    assert "sample" in manifest["stages"] and "causal" in manifest["stages"]
    sent = len(server.requests)
    assert main(args) == 0  # same endpoint, now healthy: the failed requests are sent again
    second = capsys.readouterr()
    assert "explained 2 of 2 heads (2 retried after failing in an earlier run)" in second.out
    assert len(server.requests) > sent
    assert not (tmp_path / "run" / "unfinished.json").exists()
    sent = len(server.requests)
    assert main(args) == 0  # now finished: nothing is sent
    assert len(server.requests) == sent


def test_response_bodies_are_capped_while_read_and_never_cached(tmp_path, make_server):
    from interp_lib.explain.client import ChatRequest, EndpointError, LLMClient

    def huge(body):  # a "valid" 20 MB answer, far beyond max_tokens
        return "word " * (4 << 20)

    server = make_server(responder=huge, ignore_max_tokens=True)
    client = LLMClient("m", base_url=server.url, cache_dir=tmp_path / "cache", progress=False,
                       max_retries=0)
    with pytest.raises(EndpointError, match="response body too large"):
        client.chat_many([ChatRequest([{"role": "user", "content": f"q{i}"}], max_tokens=64)
                          for i in range(2)])
    assert not list((tmp_path / "cache").rglob("*.jsonl"))

    # two 300 MB bodies with no Content-Length, at once: cut while they stream in
    import resource

    streaming = make_server(fault_rate=1.0, faults=("oversized",), oversized_bytes=300 << 20)
    client = LLMClient("m", base_url=streaming.url, progress=False, max_retries=0,
                       max_response_bytes=1 << 20, concurrency=2)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(EndpointError, match=r"limit is 1048576 bytes"):
        client.chat_many([ChatRequest([{"role": "user", "content": f"q{i}"}]) for i in range(2)])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 200 << 10, f"peak memory grew by {grown} KiB"
    with pytest.raises(ValueError, match="max_response_bytes=10"):
        LLMClient("m", base_url=streaming.url, max_response_bytes=10)


# ----------------------------------------------------------------------------- 8: one writer


def test_a_second_run_into_a_busy_folder_stops_and_loses_nothing(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "interp_lib.cli", "explain", "--out", str(out),
                              "--heads", "L0H0", *SMALL], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".lock"
        for _ in range(6000):
            if lock.exists() or first.poll() is not None:
                break
            import time

            time.sleep(0.01)
        assert lock.exists(), "the first run holds the folder's lock"
        second = _cli("explain", "--out", str(out), "--heads", "L1H0", *SMALL)
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: run folder") and "in use" in errors[0]
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    from interp_lib.explain.records import load_records

    assert [r.label for r in load_records(out / "records.json")[0]] == ["L0H0"]
    assert not (out / ".lock").exists()
    # once the first run is done, the second one runs
    after = _cli("explain", "--out", str(out), "--heads", "L1H0", *SMALL)
    assert after.returncode == 0, after.stderr


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    from interp_lib.checkpoint import RunFolderBusyError, RunLock, _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / ".lock").write_text(json.dumps({"host": _host(), "pid": int(dead), "token": "x"}))
    with RunLock(tmp_path, "test"):
        with pytest.raises(RunFolderBusyError, match="in use by test"):
            RunLock(tmp_path, "other").acquire()
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------- 3 and 7: interp-lib run

NOTEBOOKS = REPO_ROOT / "notebooks"


@pytest.mark.parametrize("stem", ["06_positional_probing", "07_head_explainer", "08_head_taxonomy"])
def test_papermill_parses_every_parameter_the_cell_assigns(stem):
    import papermill

    from interp_lib.runner import _cell_assignments

    path = NOTEBOOKS / f"{stem}.ipynb"
    assigned = _cell_assignments(path)
    assert {"model_name", "seed", "output_dir"} <= set(assigned)
    assert sorted(papermill.inspect_notebook(str(path))) == sorted(assigned)


def test_the_runner_accepts_every_declared_parameter_of_the_series():
    from interp_lib.runner import _cell_assignments, find_series, inspect_notebooks, plan_parameters

    plans = inspect_notebooks(find_series(NOTEBOOKS))
    for plan in plans:
        assert set(_cell_assignments(plan.path)) <= set(plan.declared), plan.stem
    chosen = plan_parameters(plans, [("explainer", "gpt-4o-mini"), ("base_url", "http://127.0.0.1:8000/v1"),
                                     ("compare", "toy-2l,toy-lm"), ("probe_layers", "[0, 1]")])
    assert chosen["07_head_explainer"] == {"explainer": "gpt-4o-mini", "base_url": "http://127.0.0.1:8000/v1"}
    assert chosen["08_head_taxonomy"]["compare"] == "toy-2l,toy-lm"
    assert chosen["06_positional_probing"] == {"probe_layers": [0, 1]}


@pytest.mark.parametrize("key, value, message", [
    ("top_k", "true", "'top_k': 07_head_explainer.ipynb expects an integer at least 1 (declared default 12), got True"),
    ("top_k", "0", "'top_k': 07_head_explainer.ipynb expects an integer at least 1"),
    ("max_cost_usd", "-1", "'max_cost_usd': 07_head_explainer.ipynb expects a number more than 0"),
    ("dry_run", "1", "'dry_run': 07_head_explainer.ipynb expects true or false"),
    ("n_windows", "nan", "'n_windows': 07_head_explainer.ipynb expects an integer at least 1 (declared default 48), got 'nan'"),
])
def test_parameter_values_are_checked_before_a_kernel_starts(tmp_path, capsys, key, value, message):
    from interp_lib.cli import main

    out = tmp_path / "series"
    assert main(["run", "07", "-p", key, value, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.iterdir())  # no run.json, no executed notebook


@pytest.mark.parametrize("key, value", [
    ("base_url", f"http://user:{PLANTED}@127.0.0.1:8000/v1"),
    ("base_url", f"http://127.0.0.1:8000/v1?api_key={PLANTED}"),
    ("explainer", PLANTED),
    ("api_key", "anything"),
    ("hf_token", "anything"),
])
def test_credentials_on_the_run_command_line_are_refused_and_written_nowhere(tmp_path, capsys, key, value):
    from interp_lib.cli import main

    out = tmp_path / "series"
    assert main(["run", "07", "08", "-p", key, value, "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "looks like a credential" in lines[0] and "$INTERP_LIB_API_KEY" in lines[0]
    assert PLANTED not in captured.out + captured.err
    assert not out.exists() or _files_containing(out, PLANTED) == []


def test_a_run_into_a_busy_folder_is_refused(tmp_path, capsys):
    from interp_lib.checkpoint import RunLock
    from interp_lib.cli import main

    out = tmp_path / "series"
    with RunLock(out, "another run"):
        assert main(["run", "00", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another run" in err[0]
    assert not (out / "run.json").exists()


# ----------------------------------------------------------------------------- 9: smaller inputs


def test_attribution_inputs_are_one_line_errors_naming_the_argument(toy_lm):
    from interp_lib.attribution import next_token_loss, top_predictions

    vocab, n_ctx = toy_lm.cfg.d_vocab, toy_lm.cfg.n_ctx
    cases = [
        (next_token_loss, torch.tensor([[1, vocab]]), rf"tokens holds token id {vocab}: expected ids in \[0, {vocab - 1}\]"),
        (next_token_loss, torch.tensor([[1, -3]]), r"tokens holds token id -3"),
        (next_token_loss, torch.zeros(1, n_ctx + 1, dtype=torch.long), rf"tokens has {n_ctx + 1} positions: the model's context is {n_ctx}"),
        (next_token_loss, torch.zeros(2, 4), r"tokens has dtype torch.float32: expected integer token ids"),
        (top_predictions, torch.tensor([vocab + 5]), rf"text_or_tokens holds token id {vocab + 5}"),
        (top_predictions, torch.zeros(n_ctx + 2, dtype=torch.long), rf"text_or_tokens has {n_ctx + 2} positions"),
        (top_predictions, torch.tensor([1.0, 2.0]), r"text_or_tokens has dtype torch.float32"),
        (top_predictions, "word " * (n_ctx + 5), r"text_or_tokens has \d+ positions: the model's context is"),
    ]
    for function, argument, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            function(toy_lm, argument)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="batch_size=0"):
        next_token_loss(toy_lm, torch.zeros(1, 4, dtype=torch.long), batch_size=0)
    assert len(top_predictions(toy_lm, "The cat sat on the", k=3)) == 3


def test_explain_out_under_a_file_and_a_bad_scheme_fail_before_any_stage(tmp_path, capsys):
    from interp_lib.cli import main

    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["explain", "--out", str(blocker / "run"), "--model", "toy-2l", "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "out=" in err[0] and "is a file" in err[0], captured.err

    out = tmp_path / "run"
    assert main(["explain", "--out", str(out), "--explainer", "m", "--no-progress",
                 "--base-url", f"ftp://user:{PLANTED}@127.0.0.1/v1"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "base_url='ftp://127.0.0.1/v1': expected an http(s) URL" in err[0]
    assert "[sample]" not in captured.out and PLANTED not in captured.out + captured.err
    assert not out.exists()
