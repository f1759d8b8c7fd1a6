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
