"""OpenAI Batch API path of the LLM client, against the real local HTTP server's batch endpoints."""

from __future__ import annotations

import logging

import pytest

from interp_lib.explain.client import BATCH_DISCOUNT, ChatRequest, LLMClient
from interp_lib.explain.local_server import default_responder

MODEL = "gpt-4o-mini"  # in the price table, so costs are not zero


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch):
    for name in ("OPENAI_API_KEY", "INTERP_LIB_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def requests(n: int, offset: int = 0) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": f"Explain head L{i % 3}H{i} number {i + offset}."}],
                        max_tokens=40, json_mode=i % 2 == 0) for i in range(n)]


def expected(request: ChatRequest) -> str:
    body = {"messages": request.messages}
    if request.json_mode:
        body["response_format"] = {"type": "json_object"}
    return default_responder(body)


def client_for(server, **kwargs) -> LLMClient:
    options = dict(timeout=5.0, backoff_base=0.01, backoff_max=0.2, progress=False,
                   batch=True, batch_poll_interval=0.05)
    options.update(kwargs)
    return LLMClient(MODEL, base_url=server.url, **options)


def chat_paths(server) -> list[str]:
    return [entry["path"] for entry in server.log if entry["path"].endswith("/chat/completions")]


def test_batch_answers_equal_direct_answers_at_half_price(make_server, tmp_path):
    batch_list = requests(12)
    direct_server = make_server()
    direct = LLMClient(MODEL, base_url=direct_server.url, progress=False)
    direct_results = direct.chat_many(batch_list)
    server = make_server(batch_delay=0.2)
    client = client_for(server, cache_dir=tmp_path / "cache")
    results = client.chat_many(batch_list)
    assert [r.content for r in results] == [r.content for r in direct_results] == [expected(r) for r in batch_list]
    assert all(r.ok for r in results)
    assert len(server.batches) == 1 and len(server.batch_lines) == 12 and chat_paths(server) == []
    assert server.batch_lines[0]["response_format"] == {"type": "json_object"}
    assert client.usage.prompt_tokens == direct.usage.prompt_tokens > 0
    assert client.usage.cost_usd == pytest.approx(BATCH_DISCOUNT * direct.usage.cost_usd, rel=1e-12)
    # answers are cached like direct ones: a rerun sends nothing at all
    n_log = len(server.log)
    again = client_for(server, cache_dir=tmp_path / "cache").chat_many(batch_list)
    assert [r.content for r in again] == [r.content for r in results] and all(r.cached for r in again)
    assert len(server.log) == n_log
    assert not list((tmp_path / "cache" / "batches").glob("*.json"))


def test_failed_lines_are_sent_directly(make_server):
    server = make_server(fault_rate=0.4, faults=("500", "truncated"), seed=3)
    batch_list = requests(20)
    results = client_for(server).chat_many(batch_list)
    assert len(server.batch_lines) == 20
    n_500 = server.fault_counts["500"]
    assert n_500 >= 1
    # each line the batch answered with an error went out directly (and may have drawn faults there)
    direct = chat_paths(server)
    assert len(direct) >= n_500
    ok = [r for r in results if r.ok]
    truncated = [r for r in results if not r.ok]
    assert all(r.content == expected(q) for r, q in zip(results, batch_list) if r.ok)
    assert all(r.failure == "truncated (finish_reason=length)" for r in truncated)
    assert len(ok) + len(truncated) == 20


def test_killed_run_collects_the_same_batch(make_server, tmp_path):
    server = make_server(batch_delay=1.5)
    batch_list = requests(6)
    first = client_for(server, cache_dir=tmp_path, batch_timeout=0.2).chat_many(batch_list)
    assert not any(r.ok for r in first)
    assert "still running" in first[0].failure and "rerun" in first[0].failure
    assert len(list((tmp_path / "batches").glob("*.json"))) == 1
    second = client_for(server, cache_dir=tmp_path).chat_many(batch_list)
    assert [r.content for r in second] == [expected(r) for r in batch_list]
    assert len(server.batches) == 1 and len(server.files) == 2  # one upload, one output: nothing paid twice
    assert chat_paths(server) == [] and not list((tmp_path / "batches").glob("*.json"))


def test_endpoint_without_batch_api_gets_direct_requests(make_server, caplog):
    server = make_server(batch_api=False)
    batch_list = requests(4)
    with caplog.at_level(logging.WARNING, logger="interp_lib.explain.client"):
        results = client_for(server).chat_many(batch_list)
    assert [r.content for r in results] == [expected(r) for r in batch_list]
    assert len(chat_paths(server)) == 4
    assert "has no Batch API" in caplog.text


def test_dry_run_prices_a_batch_at_half(make_server, capsys):
    server = make_server()
    batch_list = requests(5)
    plain = LLMClient(MODEL, base_url=server.url, dry_run=True, progress=False)
    batched = client_for(server, dry_run=True)
    plain.chat_many(batch_list)
    batched.chat_many(batch_list)
    assert batched.usage.dry_run_cost_usd == pytest.approx(BATCH_DISCOUNT * plain.usage.dry_run_cost_usd)
    assert plain.estimate_cost(batch_list)[1] * BATCH_DISCOUNT == pytest.approx(batched.estimate_cost(batch_list)[1])
    assert server.log == []
    assert batched.usage.dry_run_prompt_tokens == plain.usage.dry_run_prompt_tokens > 0
    assert plain.usage.dry_run_completion_tokens == 5 * 40


def test_bad_batch_settings_are_named():
    with pytest.raises(ValueError, match="batch_poll_interval=0"):
        LLMClient(MODEL, base_url="http://127.0.0.1:9/v1", batch=True, batch_poll_interval=0)


def test_explainer_scores_through_the_batch_api(make_server, tmp_path):
    """--batch-api: the scoring requests go up as Batch API files (explanations stay direct), the
    scores equal a direct run's, and the dry run prices scoring at half."""
    import json as json_module
    import re

    from interp_lib.explain.config import ExplainConfig
    from interp_lib.explain.pipeline import run_explainer
    from interp_lib.explain.prompts import DETECT_SYSTEM, EXPLAIN_SYSTEM, SIMULATE_SYSTEM

    def responder(body):
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if system == EXPLAIN_SYSTEM:
            return json_module.dumps({"explanation": "Attends to the previous token.", "attends_from": "every token",
                                      "attends_to": "the previous token", "positive_examples": ["the cat"],
                                      "negative_examples": ["a"]})
        if system == SIMULATE_SYSTEM:
            n = int(re.search(r"Give the (\d+) activations", user).group(1))
            return json_module.dumps({"activations": [(len(user) + i) % 11 for i in range(n)]})
        if system == DETECT_SYSTEM:
            n = int(re.search(r"Which of the (\d+) texts", user).group(1))
            return json_module.dumps({"fires": [i for i in range(1, n + 1) if (len(user) + i) % 2]})
        return "Previous-token heads"

    small = dict(model="toy-2l", heads="L0H2,L1H0", windows=12, window_len=32, top_k=8, n_random=6, n_quantile=4,
                 batch_size=8, refine_rounds=0, scorers=("contrastive", "simulation", "detection"),
                 explainer="gpt-4o-mini", embedding="tfidf")
    direct_server, batch_server = make_server(responder=responder), make_server(responder=responder)
    direct = run_explainer(ExplainConfig(**small, base_url=direct_server.url), tmp_path / "direct", progress=False)
    batched = run_explainer(ExplainConfig(**small, base_url=batch_server.url, batch_api=True), tmp_path / "batch",
                            progress=False)
    systems = [b["messages"][0]["content"] for b in batch_server.requests if isinstance(b, dict) and "messages" in b]
    assert systems.count(EXPLAIN_SYSTEM) == 2 and SIMULATE_SYSTEM not in systems and DETECT_SYSTEM not in systems
    lines = [b["messages"][0]["content"] for b in batch_server.batch_lines]
    assert lines.count(SIMULATE_SYSTEM) > 0 and lines.count(DETECT_SYSTEM) > 0
    for a, b in zip(direct.records, batched.records):
        assert a.label == b.label and a.scores.keys() == b.scores.keys()
        for name in a.scores:
            assert b.scores[name].score == pytest.approx(a.scores[name].score, abs=1e-9)
    plain = run_explainer(ExplainConfig(**small, base_url=direct_server.url, dry_run=True), tmp_path / "d1",
                          progress=False).usage["dry_run"]
    half = run_explainer(ExplainConfig(**small, base_url=direct_server.url, dry_run=True, batch_api=True),
                         tmp_path / "d2", progress=False).usage["dry_run"]
    assert half["calls"] == plain["calls"] and half["tokens"] == plain["tokens"]
    assert plain["explain_cost_usd"] > 0 and plain["score_cost_usd"] > 0
    assert half["explain_cost_usd"] == pytest.approx(plain["explain_cost_usd"])  # explanations go direct
    assert half["score_cost_usd"] == pytest.approx(BATCH_DISCOUNT * plain["score_cost_usd"])
    assert half["batch_api"] and not plain["batch_api"]
