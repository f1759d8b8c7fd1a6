"""Issue 29, "Hardening, round 2": each defect the second probe found, reproduced as the hostile
user or endpoint would, and now refused or survived. One test per item of the issue, named after
it (the number in the name is the item's).

Real files, real symlinks, real subprocesses and real HTTP servers on 127.0.0.1; nothing timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp_lib.checkpoint import Checkpointer

from test_hardening import _cli, _env  # the first round's CLI runner

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "toy-2l", "--windows", "12", "--window-len", "16", "--top-k", "4",
         "--n-random", "3", "--n-quantile", "2", "--batch-size", "6", "--no-progress"]
PLANTED = "sk-PLANTED-hardening2-0123456789abcdef"
LLM_FLAGS = ["--explainer", "test-model", "--scorers", "contrastive", "--refine-rounds", "0",
             "--skip", "taxonomy", "--max-retries", "1", "--timeout", "20"]


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and needle.encode() in p.read_bytes()]


def _explaining_responder(body: dict) -> str:
    return json.dumps({"explanation": "Attends from a token to the token right before it.",
                       "attends_from": "every token", "attends_to": "the previous token",
                       "positive_examples": ["one two three"], "negative_examples": ["a"]})


# ----------------------------------------------------------------------------- High


def test_1_a_manifest_file_outside_the_run_folder_is_never_deleted(tmp_path):
    victim = tmp_path / "victim" / "data.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    absolute = tmp_path / "absolute.txt"
    absolute.write_text("precious too")
    root = tmp_path / "runs" / "a" / "ckpt"
    for planted in ("../../../victim/data.txt", str(absolute)):
        ckpt = Checkpointer(root)
        ckpt.stage("scores", lambda: torch.arange(4), params={"n": 4})
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["stages"]["scores"]["file"] = planted  # what someone sharing the folder could do
        (root / "manifest.json").write_text(json.dumps(manifest))
        assert (root / planted).resolve().exists()
        # same params: the entry is refused (not a plain name inside the folder) and recomputed
        with pytest.warns(UserWarning, match="not a plain stage file name"):
            again = Checkpointer(root).stage("scores", lambda: torch.arange(4), params={"n": 4})
        assert torch.equal(again, torch.arange(4))
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["stages"]["scores"]["file"] = planted
        (root / "manifest.json").write_text(json.dumps(manifest))
        # other params: recomputed and the old file "removed" -- never the one outside the folder
        Checkpointer(root).stage("scores", lambda: torch.arange(5), params={"n": 5})
        assert Checkpointer(root).manifest["stages"]["scores"]["file"].startswith("scores-")
    assert victim.read_text() == "precious"
    assert absolute.read_text() == "precious too"


def test_2_links_planted_in_a_run_folder_are_refused_and_never_written_through(tmp_path, capsys):
    from interp_lib.artifacts import atomic_write_text
    from interp_lib.cli import main

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    assert main(["explain", "--out", str(out), "--heads", "L0H0", *SMALL]) == 0
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(victim)  # the explain config would be written through it
    capsys.readouterr()
    assert main(["explain", "--out", str(out), "--heads", "L0H0", *SMALL]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "config.json is a link to" in lines[0] and "outside the folder" in lines[0]
    assert victim.read_text() == "precious"

    # interp-lib run: an executed notebook planted as a link, a seed folder linking elsewhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for plant in ("notebook", "folder"):
        series = tmp_path / f"series-{plant}"
        (series / "seed-0").mkdir(parents=True)
        if plant == "notebook":
            (series / "seed-0" / "00_tour.ipynb").symlink_to(victim)
        else:
            (series / "seed-0").rmdir()
            (series / "seed-0").symlink_to(elsewhere, target_is_directory=True)
        assert main(["run", "00", "--out", str(series), "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "seed-0" in lines[0] and "is a link to" in lines[0], lines
        assert victim.read_text() == "precious" and not any(elsewhere.iterdir())
        assert not (series / "run.json").exists()

    # the one writer of a run folder replaces a link by a new file, never writes through it
    link = out / "usage.json"
    link.symlink_to(victim)
    atomic_write_text(link, "{}")
    assert not link.is_symlink() and link.read_text() == "{}" and victim.read_text() == "precious"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1?auth=SECRET-auth-0123",
                                 "http://127.0.0.1:9/v1?sig=SECRET-sig-0123&x=1",
                                 "http://127.0.0.1:9/v1#token=SECRET-frag-0123"])
def test_3_a_query_string_or_fragment_in_a_run_parameter_is_refused(tmp_path, capsys, url):
    from interp_lib.cli import main

    out = tmp_path / "series"
    assert main(["run", "07", "-p", "base_url", url, "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "looks like a credential" in lines[0] and "query string" in lines[0]
    assert "SECRET" not in captured.out + captured.err
    assert not out.exists() or _files_containing(out, "SECRET") == []
    # a plain URL is still accepted as before
    from interp_lib.runner import find_series, inspect_notebooks, plan_parameters

    plans = inspect_notebooks([p for p in find_series(REPO_ROOT / "notebooks") if p.stem.startswith("07")])
    assert plan_parameters(plans, [("base_url", "http://127.0.0.1:9/v1")])["07_head_explainer"] == {
        "base_url": "http://127.0.0.1:9/v1"}


def test_4_an_endpoint_that_echoes_the_key_has_it_scrubbed_everywhere(tmp_path, make_server, capsys,
                                                                     monkeypatch):
    from interp_lib.cli import main

    def echoing(body: dict) -> str:  # a hostile endpoint repeats the Bearer value it received
        return json.dumps({"explanation": f"Attends to the previous token. Your key is {PLANTED}.",
                           "attends_from": PLANTED, "attends_to": "the previous token",
                           "positive_examples": [f"one {PLANTED}"], "negative_examples": ["a"]})

    server = make_server(require_api_key=PLANTED, responder=echoing)
    out = tmp_path / "run"
    monkeypatch.setenv("INTERP_LIB_API_KEY", PLANTED)
    assert main(["explain", "--out", str(out), "--heads", "L0H0,L1H0", *SMALL, *LLM_FLAGS,
                 "--base-url", server.url]) == 0
    done = capsys.readouterr()
    assert "explained 2 of 2 heads" in done.out
    assert PLANTED not in done.out + done.err
    assert _files_containing(out, PLANTED) == []
    assert "<api key>" in (out / "records.json").read_text()  # the answer kept, the key cut out
    assert list((out / "llm_cache").rglob("*.jsonl"))


def _forge_stage(root: Path, stage: str, value) -> None:
    """Replace a finished stage's data and make the manifest's size and SHA-256 agree, as someone
    editing a shared run folder could (without the signing key)."""
    import hashlib

    from interp_lib import safe_serialize

    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["stages"][stage]
    data = safe_serialize.dumps(value)
    (root / entry["file"]).write_bytes(data)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_5_a_run_folder_or_cache_edited_elsewhere_is_named_and_recomputed(tmp_path, make_server, monkeypatch):
    from interp_lib.explain.client import ChatRequest, LLMClient
    from interp_lib.signing import KEY_DIR_ENV, key_path

    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "keys"))
    root = tmp_path / "ckpt"
    truth = {"effect": torch.tensor([0.25, 0.5])}
    Checkpointer(root).stage("causal", lambda: truth, params={"n": 2})
    assert key_path() == tmp_path / "keys" / "signing.key"
    assert (key_path().stat().st_mode & 0o777) == 0o600  # created on first use, private
    assert not _files_containing(root, key_path().read_text().strip())  # the key is not in the folder

    _forge_stage(root, "causal", {"effect": torch.tensor([99.0, 99.0])})
    with pytest.warns(UserWarning, match=r"stage 'causal' in .* was produced elsewhere.*recomputing"):
        again = Checkpointer(root).stage("causal", lambda: truth, params={"n": 2})
    assert torch.equal(again["effect"], truth["effect"])  # recomputed, the forged 99.0 is gone

    _forge_stage(root, "causal", {"effect": torch.tensor([99.0, 99.0])})
    with pytest.raises(RuntimeError, match="produced elsewhere"), \
            pytest.warns(UserWarning, match="produced elsewhere.*refused"):
        Checkpointer(root).load("causal", {"n": 2})
    ckpt = Checkpointer(root, untrusted="load")  # the user's choice: load it, marked unverified
    with pytest.warns(UserWarning, match="loaded as unverified"):
        forged = ckpt.stage("causal", lambda: truth, params={"n": 2})
    assert forged["effect"][0].item() == 99.0 and ckpt.unverified == {"causal"}
    with pytest.raises(ValueError, match="untrusted='trust'"):
        Checkpointer(root, untrusted="trust")

    # an old run folder (no signatures) still loads, with a warning
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["stages"]["causal"]["signature"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="unsigned"):
        assert Checkpointer(root).load("causal", {"n": 2})["effect"][0].item() == 99.0

    # an answer-cache entry edited elsewhere is not used: the request is sent again
    server = make_server(responder=lambda body: "the honest answer")
    request = ChatRequest([{"role": "user", "content": "q"}], max_tokens=16)
    client = LLMClient("m", base_url=server.url, cache_dir=tmp_path / "cache", progress=False)
    assert client.chat(request).content == "the honest answer"
    client.cache.close()
    (log,) = (tmp_path / "cache").rglob("*.jsonl")
    log.write_text(log.read_text().replace("the honest answer", "a forged answer"))
    sent = len(server.requests)
    fresh = LLMClient("m", base_url=server.url, cache_dir=tmp_path / "cache", progress=False)
    assert fresh.chat(request).content == "the honest answer"
    assert len(server.requests) == sent + 1 and fresh.cache.untrusted_lines == 1


def test_5_the_cli_names_a_forged_stage_and_lets_the_user_choose(tmp_path, capsys, monkeypatch):
    from interp_lib.cli import main

    monkeypatch.setenv("INTERP_LIB_UNTRUSTED", "recompute")  # restored after the test
    out = tmp_path / "run"
    args = ["explain", "--out", str(out), "--heads", "L0H0", *SMALL]
    assert main(args) == 0
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    manifest["stages"]["sample"]["signature"] = "0" * 64  # signed with another key
    (out / "checkpoints" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"stage 'sample' in .* was produced elsewhere.*recomputing"):
        assert main(args) == 0
    (out / "checkpoints" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"stage 'sample' .* loaded as unverified"):
        assert main([*args, "--untrusted", "load"]) == 0
    capsys.readouterr()
    assert main(["explain", "--help"]) == 0
    assert "--untrusted {recompute,load}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Medium


def _crafted(root_node: dict, tensors: dict | None = None) -> bytes:
    """A stage file as a hostile author writes it: the structure JSON by hand."""
    from safetensors.torch import save

    from interp_lib.safe_serialize import FORMAT

    text = json.dumps({"format": FORMAT, "root": root_node}).encode("ascii")
    data = dict(tensors or {})
    data["__structure__"] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return save(data, metadata={"format": FORMAT})


def _plant_unsigned(root: Path, stage: str, data: bytes) -> None:
    """Put ``data`` in place of a finished stage, manifest entry agreeing and unsigned (as an old
    run folder's would be), so that it is read."""
    import hashlib

    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["stages"][stage]
    (root / entry["file"]).write_bytes(data)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    entry.pop("signature", None)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_6_a_stage_file_cannot_rebuild_objects_with_live_resources(tmp_path):
    import gc
    import warnings

    from interp_lib import safe_serialize

    planted = tmp_path / "created-by-the-file"
    lock = {"$": "object", "cls": "interp_lib.checkpoint:RunLock",
            "state": {"folder": {"$": "path", "v": str(planted), "pure": None},
                      "path": {"$": "path", "v": str(planted / ".lock"), "pure": None},
                      "purpose": "x", "_token": None}}
    store = {"$": "object", "cls": "interp_lib.explain.cache:AnswerStore",
             "state": {"root": {"$": "path", "v": str(tmp_path / "c"), "pure": None}, "_lock": lock,
                       "_fd": None, "_fd_pid": None, "_log_name": None, "_index": {},
                       "_offsets": {}, "skipped_lines": 0}}
    root = tmp_path / "ckpt"
    Checkpointer(root).stage("events", lambda: {"n": 1})
    _plant_unsigned(root, "events", _crafted({"result": store}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Checkpointer(root).stage("events", lambda: {"n": 1}) == {"n": 1}  # recomputed
        gc.collect()
    assert any("may not be rebuilt" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert not planted.exists()  # nothing ran: no __del__, no RunLock.acquire, no mkdir
    with pytest.raises(ValueError, match="may not be rebuilt"):
        safe_serialize.loads(_crafted(lock))

    # a declared result type keeps only its declared fields
    from interp_lib.explain.stages import CausalEffects

    fields = {f.name: None for f in __import__("dataclasses").fields(CausalEffects)}
    node = {"$": "object", "cls": "interp_lib.explain.stages:CausalEffects",
            "state": {**fields, "extra": {"$": "path", "v": "/tmp", "pure": None}}}
    with pytest.raises(ValueError, match="declares no field 'extra'"):
        safe_serialize.loads(_crafted(node))
    with pytest.raises(TypeError, match="not storable without pickle"):
        safe_serialize.dumps({"lock": __import__("interp_lib.checkpoint").checkpoint.RunLock(tmp_path)})


def test_7_declared_sizes_are_checked_before_anything_is_allocated(tmp_path):
    import resource

    from interp_lib import safe_serialize

    bomb = {"$": "series", "name": None,
            "values": {"dtype": "float64", "array": {"$": "ndarray", "dtype": "<f8", "shape": [],
                                                     "key": "t0"}},
            "index": {"$": "rangeindex", "start": 0, "stop": 300_000_000, "step": 1, "name": None}}
    data = _crafted(bomb, {"t0": torch.zeros(8, dtype=torch.uint8)})
    assert len(data) < 1024  # a few hundred bytes declaring 300 million rows
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="300000000 entries"):
        safe_serialize.loads(data)
    frame = {"$": "dataframe", "columns": {"$": "rangeindex", "start": 0, "stop": 1, "step": 1, "name": None},
             "data": [bomb["values"]], "attrs": {},
             "index": bomb["index"]}
    with pytest.raises(ValueError, match="300000000 entries"):
        safe_serialize.loads(_crafted(frame, {"t0": torch.zeros(8, dtype=torch.uint8)}))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak  # KiB on Linux
    assert grown < 500 << 10, f"peak memory grew by {grown} KiB"
    # through a checkpoint: refused and recomputed
    root = tmp_path / "ckpt"
    Checkpointer(root).stage("table", lambda: [1, 2])
    _plant_unsigned(root, "table", data)
    with pytest.warns(UserWarning, match="unreadable"):
        assert Checkpointer(root).stage("table", lambda: [1, 2]) == [1, 2]
    # honest values still round-trip
    import pandas as pd

    series = pd.Series([1.5, 2.5], index=pd.RangeIndex(10, 12), name="s")
    pd.testing.assert_series_equal(safe_serialize.loads(safe_serialize.dumps(series)), series)


@pytest.mark.parametrize("answer", [{"content": None}, {"content": "Attends to", "finish_reason": "length"},
                                    {"content": ""}], ids=["null", "length", "empty"])
def test_8_null_cut_or_empty_answers_are_failures_retried_on_rerun(tmp_path, make_server, capsys, answer):
    from interp_lib.cli import main

    state = {"broken": True}
    server = make_server(responder=lambda body: dict(answer) if state["broken"]
                         else _explaining_responder(body))
    args = ["explain", "--out", str(tmp_path / "run"), "--heads", "L0H0,L1H0", *SMALL, *LLM_FLAGS,
            "--base-url", server.url]
    assert main(args) == 1
    first = capsys.readouterr()
    assert "explained 0 of 2 heads" in first.out and "not saved as finished" in first.err
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest.json").read_text())
    assert "explain" not in manifest["stages"]
    assert not list((tmp_path / "run" / "llm_cache").rglob("*.jsonl"))  # nothing cached
    state["broken"], sent = False, len(server.requests)
    assert main(args) == 0  # the same endpoint, healthy again: the failed requests are sent again
    assert "explained 2 of 2 heads" in capsys.readouterr().out
    assert len(server.requests) >= sent + 2


def test_9_a_hanging_endpoint_trips_the_breaker_after_a_stated_number_of_timeouts(tmp_path, make_server,
                                                                                 capsys):
    from interp_lib.cli import main
    from interp_lib.explain.client import TIMEOUT_BREAKER

    server = make_server(responder=_explaining_responder, fault_rate=1.0, faults=("timeout",),
                         timeout_delay=3.0)  # accepts every request, answers after the client gave up
    heads = ",".join(f"L{layer}H{head}" for layer in range(2) for head in range(4))
    status = main(["explain", "--out", str(tmp_path / "run"), "--heads", heads, *SMALL, *LLM_FLAGS,
                   "--timeout", "0.5", "--max-retries", "5", "--concurrency", "2",
                   "--base-url", server.url])
    assert status == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{TIMEOUT_BREAKER} timeouts in a row" in errors[0], errors
    # the breaker's bound (plus what was already on the wire), not 8 heads x 6 attempts = 48
    assert len(server.requests) <= TIMEOUT_BREAKER + 2, len(server.requests)
    assert main(["explain", "--help"]) == 0
    assert f"{TIMEOUT_BREAKER} timeouts in a row" in " ".join(capsys.readouterr().out.split())


def test_10_to_12_every_parameter_of_the_series_has_a_declared_schema_its_defaults_fit():
    import ast

    from interp_lib.notebook_params import coerce_and_check, declared
    from interp_lib.runner import _cell_assignments, find_series

    series = find_series(REPO_ROOT / "notebooks")
    assert len(series) >= 10
    for path in series:
        schema = declared(path.stem)
        assert schema is not None, f"{path.stem} has no parameter schema in interp_lib.notebook_params"
        for name, spec in _cell_assignments(path).items():
            assert name in schema, f"{path.stem}: parameter {name!r} is not declared"
            default = ast.literal_eval(spec["default"])
            text = default if isinstance(default, str) else repr(default)
            assert coerce_and_check(path.stem, name, text, schema[name]) == default, (path.stem, name)


def test_10_a_notebooks_own_default_is_accepted_bounds_come_from_the_schema(capsys, tmp_path):
    from interp_lib.cli import main
    from interp_lib.runner import find_series, inspect_notebooks, plan_parameters

    plans = inspect_notebooks([p for p in find_series(REPO_ROOT / "notebooks") if p.stem.startswith("02")])
    assert plan_parameters(plans, [("delta", "0.05")])["02_selective_prediction"] == {"delta": 0.05}
    assert plan_parameters(plans, [("target_risk", "0.1")])["02_selective_prediction"] == {"target_risk": 0.1}
    for bad in ("0", "1", "1.5"):  # delta is a probability: (0, 1)
        assert main(["run", "02", "-p", "delta", bad, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'delta'" in err[0] and "more than 0 and less than 1" in err[0], err


def test_11_a_number_for_an_auto_default_reaches_the_kernel_as_a_number(tmp_path):
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from interp_lib.runner import find_series, inspect_notebooks, plan_grid

    plans = inspect_notebooks([p for p in find_series(REPO_ROOT / "notebooks") if p.stem.startswith("04")])
    (task,) = plan_grid(plans, [("n_prompts", "8"), ("repeat_length", "12")], [], [0], tmp_path)
    assert task.parameters["n_prompts"] == 8 and type(task.parameters["n_prompts"]) is int
    assert task.parameters["repeat_length"] == 12 and type(task.parameters["repeat_length"]) is int
    assert plan_grid(plans, [("n_prompts", "auto")], [], [0], tmp_path)[0].parameters["n_prompts"] == "auto"
    # what papermill writes into the notebook the kernel runs: the int, not the text '8'
    notebook = parameterize_notebook(load_notebook_node(str(plans[0].path)), task.parameters)
    injected = next(c.source for c in notebook.cells
                    if "injected-parameters" in (c.get("metadata", {}).get("tags") or []))
    assert "n_prompts = 8\n" in injected + "\n" and "repeat_length = 12" in injected


@pytest.mark.parametrize("notebook, key, value, allowed", [
    ("00", "attention_layer", "99", "a layer of the model (4 layers"),
    ("00", "top_k", "-3", "an integer at least 1"),
    ("04", "ablation_method", "bogus", "one of 'zero', 'mean', 'resample'"),
    ("08", "embedding", "bogus", "one of 'auto', 'sentence-transformers', 'openai', 'tfidf'"),
    ("03", "task", "bogus", "one of 'auto', 'ioi', 'repeat'"),
    ("07", "base_url", "not a url", "an http(s) URL"),
    ("02", "coverages", "[2.0]", "a list of a number more than 0 and at most 1"),
    ("04", "n_prompts", "eight", "an integer at least 1 or 'auto'"),
])
def test_12_values_outside_the_schema_are_refused_before_a_kernel_starts(tmp_path, capsys, notebook, key,
                                                                          value, allowed):
    from interp_lib.cli import main

    out = tmp_path / "series"
    assert main(["run", notebook, "-p", key, value, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"parameter {key!r}" in err[0] and allowed in err[0] and value.strip("[]") in err[0], err
    assert not out.exists() or not any(out.iterdir())  # no run.json, no executed notebook


def test_13_duplicate_ids_in_a_batch_output_file_one_rule_first_answer_counted_once(tmp_path, make_server,
                                                                                    monkeypatch, caplog):
    import logging

    from interp_lib.explain.client import ChatRequest, LLMClient

    for name in ("OPENAI_API_KEY", "INTERP_LIB_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    batch = [ChatRequest([{"role": "user", "content": f"question {i}"}], max_tokens=16) for i in range(3)]

    def run(server, cache):
        client = LLMClient("gpt-4o-mini", base_url=server.url, cache_dir=cache, progress=False, batch=True,
                           batch_poll_interval=0.05)
        return client.chat_many(batch), client.usage

    honest, honest_usage = run(make_server(), tmp_path / "a")
    doubled = make_server(batch_duplicates=True)
    with caplog.at_level(logging.WARNING, logger="interp_lib.explain.client"):
        answers, usage = run(doubled, tmp_path / "b")
    assert [r.content for r in answers] == [r.content for r in honest]  # the first answer, not "(duplicate) ..."
    assert usage.completion_tokens == honest_usage.completion_tokens  # counted once
    assert sum("a second answer for request" in record.getMessage() for record in caplog.records) == 3
    cached, _ = run(doubled, tmp_path / "b")  # a rerun from the cache: the same rule, the same answers
    assert [r.content for r in cached] == [r.content for r in answers] and all(r.cached for r in cached)


def test_14_a_tampered_batch_id_never_reaches_a_url_and_the_batch_timeout_is_a_flag(tmp_path, make_server,
                                                                                    capsys, monkeypatch):
    from interp_lib.cli import main
    from interp_lib.explain.client import ChatRequest, LLMClient

    for name in ("OPENAI_API_KEY", "INTERP_LIB_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    server = make_server(batch_delay=30.0)
    batch = [ChatRequest([{"role": "user", "content": f"question {i}"}], max_tokens=16) for i in range(3)]

    def client(**kwargs):
        return LLMClient("gpt-4o-mini", base_url=server.url, cache_dir=tmp_path, progress=False, batch=True,
                         batch_poll_interval=0.05, backoff_base=0.01, backoff_max=0.1, **kwargs)

    first = client(batch_timeout=0.3).chat_many(batch)  # still running: its id is kept for a rerun
    assert not any(r.ok for r in first)
    (state_path,) = (tmp_path / "batches").glob("*.json")
    state = json.loads(state_path.read_text())
    state["batch_id"] = "../models"  # what a tampered file puts into the URL path
    state_path.write_text(json.dumps(state))
    server.batch_delay = 0.0
    polled = len(server.log)
    answers = client(batch_timeout=20.0).chat_many(batch)  # main: polls GET /v1/models for 20 s
    assert all(r.ok for r in answers)
    paths = [entry["path"] for entry in server.log[polled:]]
    assert not any("models" in path or ".." in path for path in paths), paths
    assert main(["explain", "--help"]) == 0
    assert "--batch-timeout BATCH_TIMEOUT" in capsys.readouterr().out
    assert main(["explain", "--out", str(tmp_path / "run"), "--batch-timeout", "0", *SMALL]) == 2
    assert "batch_timeout=0.0: expected a positive number of seconds" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Low


def test_16_a_class_name_in_a_stage_file_imports_nothing():
    script = """
import json, sys, torch
from safetensors.torch import save
from interp_lib import safe_serialize
before = "torch._dynamo" in sys.modules
text = json.dumps({"format": safe_serialize.FORMAT,
                   "root": {"$": "object", "cls": "torch:_dynamo.X", "state": {}}}).encode()
data = save({"__structure__": torch.frombuffer(bytearray(text), dtype=torch.uint8)})
try:
    safe_serialize.loads(data)
except ValueError as error:
    print("refused:", error)
print(json.dumps({"before": before, "after": "torch._dynamo" in sys.modules}))
"""
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("refused:") and "torch:_dynamo.X" in lines[0]
    assert json.loads(lines[-1]) == {"before": False, "after": False}


def test_17_an_out_of_vocabulary_id_in_calibration_is_a_one_line_error_naming_the_argument(toy_lm):
    from interp_lib.calibration import next_token_confidence, next_token_predictions

    vocab = toy_lm.cfg.d_vocab
    for function in (next_token_predictions, next_token_confidence):
        for bad, shown in ((vocab + 3, vocab + 3), (-2, -2)):
            with pytest.raises(ValueError, match=rf"tokens holds token id {shown}: expected ids in") as caught:
                function(toy_lm, torch.tensor([[1, 2, bad, 4]]))
            assert "\n" not in str(caught.value)
    assert len(next_token_confidence(toy_lm, torch.tensor([[1, 2, 3, 4]]))) == 3  # valid ids still work


def test_18_a_dataset_that_is_not_utf8_and_a_negative_seed_name_the_argument(tmp_path, capsys):
    from interp_lib.cli import main

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    assert main(["explain", "--out", str(tmp_path / "a"), "--dataset", str(bad), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset=" in err[0] and str(bad) in err[0] and "not UTF-8" in err[0], err
    assert main(["explain", "--out", str(tmp_path / "b"), "--seed", "-5", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed=-5" in err[0], err


def _metrics_folder(root: Path, text: str) -> Path:
    (root / "seed-0" / "metrics").mkdir(parents=True)
    (root / "seed-0" / "metrics" / "00_tour.json").write_text(text)
    return root / "seed-0" / "metrics" / "00_tour.json"


@pytest.mark.parametrize("text, said", [
    ('{"metrics": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"notebook": "00_tour", "metrics": {"loss": "high"}}', "metric 'loss' is 'high'"),
    ('{"notebook": "00_tour", "metrics": {"loss": Infinity}}', "metric 'loss' is inf"),
    ('{"notebook": "00_tour", "metrics": {"loss": 1e999}}', "metric 'loss' is inf"),
], ids=["deep", "string", "Infinity", "1e999"])
def test_19_hostile_metrics_files_are_one_line_errors_naming_the_file(tmp_path, capsys, text, said):
    from interp_lib.cli import main

    path = _metrics_folder(tmp_path / "run", text)
    for command in (["aggregate", str(tmp_path / "run")], ["results", str(tmp_path / "run")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and said in err[0], err


@pytest.mark.skip(reason="item 21 unfinished: on a fresh clone the interrupted explain process twice did not exit within 180 s of Ctrl-C (passes in isolation); not to be counted as done")
def test_21_ctrl_c_while_a_batch_is_polled_is_one_line_and_keeps_the_batch_id(tmp_path, make_server):
    import signal
    import time

    server = make_server(responder=_explaining_responder, batch_delay=600.0)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "interp_lib.cli", "explain", "--out", str(out), "--heads", "L0H0",
               *SMALL, "--explainer", "gpt-4o-mini", "--scorers", "detection", "--refine-rounds", "0",
               "--skip", "taxonomy", "--batch-api", "--base-url", server.url]
    process = subprocess.Popen(command, env=_env(INTERP_LIB_API_KEY="test-key"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not server.batches and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert server.batches, "the run never submitted a batch"
        time.sleep(0.5)  # polling now
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:") and "rerun" in lines[-1], stderr
    assert list((out / "llm_cache" / "batches").glob("*.json")), "the batch id is kept"

