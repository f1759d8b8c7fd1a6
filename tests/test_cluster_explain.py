"""`interp-lib explain --executor ray` with an LLM: a real local Ray cluster (2 CPUs), the real
local OpenAI-compatible server injecting faults, and a Ray worker killed in the middle of a shard.

The server holds every scoring request until the test has killed the worker running shard 1 (after
that shard checkpointed its explanations): Ray retries the shard on a new worker, the shard resumes
from its checkpoints (no head is explained twice: the explainer LLM answers each head once), and
the merged run equals the one-process run against a fault-free server.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path

import pytest

from interp_lib.cli import main

ray = pytest.importorskip("ray")

from interp_lib.explain.prompts import DETECT_SYSTEM, EXPLAIN_SYSTEM, REFINE_SYSTEM  # noqa: E402

SMALL = dict(model="toy-2l", windows=24, window_len=32, top_k=8, n_random=6, n_quantile=4, batch_size=8)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _hash(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


class Responder:
    """A deterministic stand-in LLM following each prompt's format; counts the explanations it
    gives per prompt and, while ``hold`` is set, keeps scoring requests waiting."""

    def __init__(self, hold: bool):
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.held = threading.Event()
        self.explained: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if system in (EXPLAIN_SYSTEM, REFINE_SYSTEM):
            if system == EXPLAIN_SYSTEM:
                with self.lock:
                    self.explained[user] = self.explained.get(user, 0) + 1
            label = re.search(r"L\d+[HN]\d+", user)
            revised = " (revised)" if system == REFINE_SYSTEM else ""
            return json.dumps({"explanation": f"Attends to the previous token{revised} ({label and label.group(0)}).",
                               "attends_from": "every token", "attends_to": "the previous token",
                               "positive_examples": ["the cat sat"], "negative_examples": ["a"]})
        if system == DETECT_SYSTEM:
            self.held.set()
            assert self.release.wait(120), "the test never released the scoring requests"
            n = int(re.search(r"Which of the (\d+) texts", user).group(1))
            return json.dumps({"fires": [i for i in range(1, n + 1) if _hash(user, i) % 2]})
        return "Previous-token heads"


def _worker_pids(task_prefix: bytes) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::" + task_prefix):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _stages(manifest: Path) -> set[str]:
    try:
        return set(json.loads(manifest.read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return set()


def test_sharded_llm_explain_survives_faults_and_a_killed_worker(ray_cluster, make_server, tmp_path, capsys):
    import os
    import signal

    from interp_lib.explain.config import ExplainConfig
    from interp_lib.explain.pipeline import run_explainer
    from interp_lib.explain.records import load_records

    responder = Responder(hold=True)
    server = make_server(responder=responder, fault_rate=0.15, faults=("429", "500", "malformed"), seed=2,
                         retry_after=0.01)
    out = tmp_path / "sharded"
    llm = ["--explainer", "local-model", "--scorers", "contrastive", "detection", "--refine-rounds", "1",
           "--embedding", "tfidf", "--timeout", "20"]
    args = ["explain", "--out", str(out), "--no-progress", "--executor", "ray", "--shards", "2",
            "--base-url", server.url, *llm, *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]]
    status: dict[str, int] = {}
    runner = threading.Thread(target=lambda: status.setdefault("code", main(args)))
    runner.start()

    # both shards stop at their first scoring request; kill shard 1's worker once its
    # explanations are checkpointed
    manifest = out / "shards" / "1-of-2" / "checkpoints" / "manifest.json"
    deadline = time.monotonic() + 300
    while not (responder.held.is_set() and "explain" in _stages(manifest)):
        assert time.monotonic() < deadline and runner.is_alive(), "shard 1 never reached its scoring stage"
        time.sleep(0.05)
    pids = _worker_pids(b"explain L0H0")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    responder.release.set()
    runner.join(600)
    assert not runner.is_alive() and status["code"] == 0
    printed = capsys.readouterr().out
    assert "explained 8 of 8 heads in 2 shard(s)" in printed
    assert sum(server.fault_counts.values()) > 0  # faults were injected and retried

    # resumed, not redone: every head's explanation request was answered exactly once
    assert len(responder.explained) == 8 and set(responder.explained.values()) == {1}
    records, meta = load_records(out / "records.json")
    assert all(r.family is not None for r in records)

    # equal to the one-process run against a fault-free server
    alone_server = make_server(responder=Responder(hold=False))
    config = ExplainConfig(**SMALL, explainer="local-model", base_url=alone_server.url,
                           scorers=("contrastive", "detection"), refine_rounds=1, embedding="tfidf")
    single = run_explainer(config, tmp_path / "single", skip=["taxonomy"], progress=False)
    assert [r.label for r in records] == [r.label for r in single.records]
    for merged, alone in zip(records, single.records):
        assert merged.explanation.text == alone.explanation.text
        assert merged.scores.keys() == alone.scores.keys()
        for name in merged.scores:
            assert merged.scores[name].score == pytest.approx(alone.scores[name].score, abs=1e-5)
        assert merged.causal_effect == pytest.approx(alone.causal_effect, abs=1e-5)


def test_sharded_neuron_explain_equals_the_one_process_run(ray_cluster, tmp_path, capsys):
    from interp_lib.explain.config import ExplainConfig
    from interp_lib.explain.pipeline import run_explainer
    from interp_lib.explain.records import load_records

    small = {**SMALL, "model": "toy-lm"}
    neurons = "L0N1,L0N5,L1N3,L2N7"
    out = tmp_path / "sharded"
    args = ["explain", "--out", str(out), "--no-progress", "--executor", "ray", "--shards", "2", "--units", "neurons",
            "--neurons", neurons, "--embedding", "tfidf", *[f"--{k.replace('_', '-')}={v}" for k, v in small.items()]]
    assert main(args) == 0
    assert "explained 4 of 4 neurons in 2 shard(s)" in capsys.readouterr().out
    records, meta = load_records(out / "records.json")
    assert meta["config"]["shards"] == ["L0N1..L0N5", "L1N3..L2N7"]
    single = run_explainer(ExplainConfig(**small, units="neurons", neurons=neurons, embedding="tfidf"),
                           tmp_path / "single", skip=["taxonomy"], progress=False)
    assert [r.label for r in records] == [r.label for r in single.records] == neurons.split(",")
    for merged, alone in zip(records, single.records):
        assert merged.unit_kind == "neuron" and merged.explanation.text == alone.explanation.text
        assert merged.causal_effect == pytest.approx(alone.causal_effect, abs=1e-5)
        assert [e.to_dict() for e in merged.top_events] == [e.to_dict() for e in alone.top_events]
