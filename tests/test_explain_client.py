"""LLMClient against a real OpenAI-compatible HTTP server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import pickle
import sys
import time
import types
import warnings

import numpy as np
import pytest

from interp_lib.explain.client import (ChatRequest, ChatResult, EndpointError, LLMClient, parse_retry_after,
                                       resolve_api_key)
from interp_lib.explain.local_server import (LocalOpenAIServer, LocalServerHTTPError,
                                             count_tokens, default_responder)

PLANTED = "sk-test-PLANTED-123"


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch):
    # Tests must not depend on (or send) a key from the developer's environment.
    for name in ("OPENAI_API_KEY", "INTERP_LIB_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def client_for(server: LocalOpenAIServer, model: str = "local-model", **kwargs) -> LLMClient:
    options = dict(timeout=2.0, backoff_base=0.01, backoff_max=1.0, progress=False)
    options.update(kwargs)
    return LLMClient(model, base_url=server.url, **options)


def req(text: str, **kwargs) -> ChatRequest:
    return ChatRequest([{"role": "system", "content": "You explain attention heads."},
                        {"role": "user", "content": text}], **kwargs)


def expected_content(request: ChatRequest) -> str:
    body = {"messages": request.messages}
    if request.json_mode:
        body["response_format"] = {"type": "json_object"}
    return default_responder(body)


# --------------------------------------------------------------------------------------------
def test_round_trip_usage_and_request_body(make_server):
    server = make_server()
    client = client_for(server)
    request = req("What does head L1H0 attend to?", max_tokens=50, tag="TAG-not-sent")
    result = client.chat(request)
    assert isinstance(result, ChatResult)
    assert result.ok and result.failure is None and result.finish_reason == "stop"
    assert result.content == expected_content(request)
    assert result.attempts == 1 and not result.cached
    body = server.requests[0]
    assert body["model"] == "local-model" and body["messages"] == request.messages
    assert body["max_tokens"] == 50 and body["temperature"] == 0.0
    assert "response_format" not in body and "logprobs" not in body
    assert "TAG-not-sent" not in json.dumps(body)
    # usage comes from the server's usage block
    assert result.prompt_tokens == sum(4 + count_tokens(m["content"]) for m in request.messages)
    assert result.completion_tokens == count_tokens(result.content)
    usage = client.usage
    assert usage.requests_sent == server.n_requests == 1
    assert (usage.prompt_tokens, usage.completion_tokens) == (result.prompt_tokens,
                                                              result.completion_tokens)
    assert usage.failures == usage.retries == usage.cache_hits == 0
    assert "1 requests sent" in usage.summary()

    json_request = req("Answer in JSON", json_mode=True)
    result = client.chat(json_request)
    assert server.requests[-1]["response_format"] == {"type": "json_object"}
    assert json.loads(result.content) == json.loads(expected_content(json_request))


def test_cost_from_price_table(make_server):
    server = make_server()
    client = client_for(server, model="my-model-v2", prices={"my-model": (1000.0, 3000.0)})
    results = client.chat_many([req(f"prompt {i}") for i in range(3)])
    expected = sum(r.prompt_tokens * 1000.0 + r.completion_tokens * 3000.0 for r in results) / 1e6
    assert client.usage.cost_usd == pytest.approx(expected) and expected > 0
    # unknown models cost nothing; dated names are priced by their longest known prefix
    free = client_for(server, model="no-such-model")
    free.chat(req("x"))
    assert free.usage.cost_usd == 0.0 and free.usage.prompt_tokens > 0
    assert free.price("gpt-4o-mini-2024-07-18") == free.prices["gpt-4o-mini"]
    assert free.price("gpt-4o-2024-08-06") == free.prices["gpt-4o"]


@pytest.mark.parametrize("kind", ["429", "500", "timeout", "malformed"])
def test_each_fault_is_retried_then_succeeds(make_server, kind):
    # generous timeout: a normal request on a loaded 2-core machine must not hit it; the one
    # injected timeout sleeps well past it
    server = make_server(fault_sequence=[kind], timeout_delay=5.0)
    client = client_for(server, timeout=2.5)
    request = req(f"fault {kind}")
    result = client.chat(request)
    assert result.ok and result.content == expected_content(request)
    assert result.attempts == 2
    assert server.fault_counts[kind] == 1 and server.n_requests == 2
    assert client.usage.retries == 1 and client.usage.requests_sent == 2
    assert [entry["fault"] for entry in server.log] == [kind, None]


def test_retry_after_is_honoured_and_capped(make_server):
    # Retry-After is honoured beyond backoff_max (the server knows how long it is busy)
    server = make_server(fault_sequence=["429"], retry_after=0.5)
    client = client_for(server, backoff_base=0.001, backoff_max=0.05)  # jitter: ~1 ms
    assert client.chat(req("rate limited")).ok
    first, second = sorted(entry["time"] for entry in server.log)
    assert second - first >= 0.5

    # ... up to retry_after_max
    slow = make_server(fault_sequence=["429"], retry_after=30.0)
    client = client_for(slow, backoff_base=0.001, backoff_max=0.05, retry_after_max=0.3)
    t0 = time.monotonic()
    assert client.chat(req("capped wait")).ok
    first, second = sorted(entry["time"] for entry in slow.log)
    assert second - first >= 0.3 and time.monotonic() - t0 < 10.0  # 0.3 s, not 30 s
    assert LLMClient("m", base_url=slow.url).retry_after_max == 120.0
    with pytest.raises(ValueError, match="retry_after_max=-1"):
        client_for(slow, retry_after_max=-1)


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    # header names are case-insensitive, also in a plain dict
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"Retry-After-Ms": "1500", "RETRY-AFTER": "9"}) == 1.5
    # a retry-after-ms that is not a finite number is ignored, not an infinite wait
    assert parse_retry_after({"retry-after-ms": "inf", "retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "nan"}) is None
    assert parse_retry_after({"retry-after": "inf"}) is None
    future = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 7.0 < parse_retry_after({"retry-after": future}) <= 10.5


def test_retries_exhausted_give_a_reason(make_server):
    server = make_server(fault_rate=1.0, faults=("500",))
    result = client_for(server, max_retries=2).chat(req("always 500"))
    assert not result.ok and result.failure == "http 500 after 3 attempts"
    assert server.n_requests == 3 and result.attempts == 3

    server = make_server(fault_rate=1.0, faults=("timeout",), timeout_delay=0.8)
    result = client_for(server, max_retries=1, timeout=0.2).chat(req("always slow"))
    assert not result.ok and result.failure == "timeout after 2 attempts"


def test_truncated_is_a_failure_that_keeps_partial_text(make_server, tmp_path):
    server = make_server(fault_sequence=["truncated"])
    client = client_for(server, cache_dir=tmp_path / "cache")
    request = req("a fairly long question about what head L0H2 does in this model")
    full = expected_content(request)
    result = client.chat(request)
    assert not result.ok and result.failure == "truncated (finish_reason=length)"
    assert result.finish_reason == "length"
    assert result.content and full.startswith(result.content) and len(result.content) < len(full)
    assert server.n_requests == 1  # not retried
    # not cached: the next run asks again and gets the whole answer
    again = client.chat(request)
    assert again.ok and again.content == full and server.n_requests == 2
    # max_tokens truncates the same way
    short = client.chat(req("short", max_tokens=2))
    assert not short.ok and short.failure.startswith("truncated") and short.completion_tokens == 2


def test_client_errors_are_not_retried(make_server):
    def responder(body):
        raise LocalServerHTTPError(400, "This model's maximum context length is 10 tokens")

    server = make_server(responder=responder)
    result = client_for(server).chat(req("too long"))
    assert not result.ok and result.failure.startswith("http 400: This model's maximum context")
    assert server.n_requests == 1 and result.attempts == 1

    # a 400 while json_mode is on: one retry without it, then the original reason;
    # the client must not conclude that the endpoint lacks JSON mode
    client = client_for(server)
    result = client.chat(req("too long", json_mode=True))
    assert result.failure.startswith("http 400") and server.n_requests == 3
    assert "response_format" not in server.requests[-1]
    assert client.supports_json_mode

    missing = client_for(server)
    missing.base_url += "/nope"
    result = missing.chat(req("wrong path"))
    assert result.failure.startswith("http 404") and server.n_requests == 4


def test_unsupported_features_fall_back_once_and_are_remembered(make_server):
    server = make_server(reject_params=("response_format", "logprobs"))
    client = client_for(server)
    first = client.chat(req("json please", json_mode=True))
    assert first.ok and server.n_requests == 2
    assert not client.supports_json_mode
    client.chat(req("json again", json_mode=True))
    assert server.n_requests == 3 and "response_format" not in server.requests[-1]

    result = client.chat(req("logprobs please", logprobs=True, top_logprobs=2))
    assert result.ok and result.logprobs is None and not client.supports_logprobs

    # OpenAI's 400 for a JSON-mode prompt that never says "json": retried without JSON mode,
    # but JSON mode is not written off for the endpoint
    def picky(body):
        if body.get("response_format") and "json" not in json.dumps(body["messages"]).lower():
            raise LocalServerHTTPError(400, "'messages' must contain the word 'json' in some "
                                            "form, to use 'response_format' of type 'json_object'.")
        return default_responder(body)

    # an endpoint that rejects both features, one 400 at a time (SimulationScorer asks for
    # JSON mode and logprobs together): each is dropped in turn, both are remembered
    both = make_server(reject_params=("response_format", "logprobs"))
    client = client_for(both)
    result = client.chat(req("json and logprobs", json_mode=True, logprobs=True, top_logprobs=2))
    assert result.ok and result.attempts == 3 and both.n_requests == 3
    assert "response_format" in both.requests[0] and "logprobs" in both.requests[0]
    assert "response_format" not in both.requests[1] and "logprobs" in both.requests[1]
    assert "response_format" not in both.requests[2] and "logprobs" not in both.requests[2]
    assert not client.supports_json_mode and not client.supports_logprobs
    assert client.chat(req("again", json_mode=True, logprobs=True)).ok and both.n_requests == 4

    # when every retry is rejected, the first 400 is the reason and nothing is written off
    def rejects_all(body):
        if body.get("response_format"):
            raise LocalServerHTTPError(400, "response_format is not supported")
        if body.get("logprobs"):
            raise LocalServerHTTPError(400, "logprobs are not supported")
        raise LocalServerHTTPError(400, "This model's maximum context length is 10 tokens")

    hopeless = make_server(responder=rejects_all)
    client = client_for(hopeless)
    result = client.chat(req("all fail", json_mode=True, logprobs=True))
    assert result.failure == "http 400: response_format is not supported"
    assert hopeless.n_requests == 3 and client.supports_json_mode and client.supports_logprobs

    strict = make_server(responder=picky)
    client = client_for(strict)
    assert client.chat(req("no magic word", json_mode=True)).ok and strict.n_requests == 2
    assert client.supports_json_mode
    assert client.chat(req("reply in JSON", json_mode=True)).ok and strict.n_requests == 3
    assert strict.requests[-1]["response_format"] == {"type": "json_object"}


def test_mixed_faults_complete_in_order(make_server):
    # one injected timeout (it costs a whole client timeout), the other faults at random; the
    # timeout is generous so that a normal request on a busy machine does not hit it
    server = make_server(fault_rate=0.3, faults=("429", "500", "malformed", "truncated"),
                         fault_sequence=["timeout"], timeout_delay=5.0, seed=3)
    client = client_for(server, timeout=2.5, max_retries=6, concurrency=8)
    requests = [req(f"head number {i}") for i in range(40)]
    results = client.chat_many(requests)
    assert len(results) == 40 and all(isinstance(r, ChatResult) for r in results)
    faults = sum(server.fault_counts.values())
    assert faults >= 6 and server.fault_counts["timeout"] == 1, server.fault_counts
    n_ok = 0
    for request, result in zip(requests, results):
        if result.ok:
            n_ok += 1
            assert result.content == expected_content(request)  # order preserved
        else:
            assert result.failure  # a reason, never a silent loss
            assert result.failure.startswith("truncated")  # the only fault that is final
    assert n_ok >= 30
    # on a busy machine a connection can time out before the server sees it: sent >= received
    assert client.usage.requests_sent >= server.n_requests >= 40 + faults - \
        server.fault_counts["truncated"]
    assert client.usage.failures == 40 - n_ok
    assert client.usage.retries == client.usage.requests_sent - 40


def test_cache_rerun_sends_nothing(make_server, tmp_path):
    server = make_server()
    cache = tmp_path / "cache"
    requests = [req(f"cached {i}", tag=f"t{i}") for i in range(10)] + [req("cached 3")]
    first = client_for(server, cache_dir=cache, api_key="key-one", progress=True)
    results = first.chat_many(requests)
    assert all(r.ok for r in results)
    assert server.n_requests == 10  # the duplicate was sent once
    assert results[10].cached and results[10].content == results[3].content

    # a fresh client (another process, a resumed run), another key and other tags
    retagged = [ChatRequest(r.messages, tag="other") for r in requests]
    second = client_for(server, cache_dir=cache, api_key="key-two")
    again = second.chat_many(retagged)
    assert server.n_requests == 10
    assert [r.content for r in again] == [r.content for r in results]
    assert all(r.cached and r.attempts == 0 for r in again)
    assert second.usage.requests_sent == 0 and second.usage.cost_usd == 0.0
    assert second.usage.cache_hits == 11

    # anything that changes the answer changes the key
    second.chat(ChatRequest(requests[0].messages, temperature=0.7))
    second.chat(ChatRequest(requests[0].messages, max_tokens=7))
    assert server.n_requests == 12

    # one append-only log per writer, not one file per request
    logs = sorted((cache / "answers").glob("*.jsonl"))
    assert len(logs) == 2 and sum(len(p.read_text().splitlines()) for p in logs) == 12
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == logs

    # a damaged entry is a miss, not a crash, and is stored again
    key = first.cache_key(requests[0])
    for path in logs:
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join("{not json\n" if key in line else line for line in lines))
    third = client_for(server, cache_dir=cache)
    assert len(third.cache) == 11 and third.cache.skipped_lines == 1
    assert third.cached(requests[0]) is None
    third.chat_many(requests)
    assert server.n_requests == 13 and third.cached(requests[0]).content == results[0].content
    assert len(client_for(server, cache_dir=cache).cache) == 12


def test_budget_cap_stops_cleanly(make_server):
    server = make_server()
    prices = {"local-model": (10_000.0, 10_000.0)}  # ~$0.1 per request here
    requests = [req(f"budget {i}") for i in range(12)]
    cap = 0.5
    client = client_for(server, prices=prices, max_cost_usd=cap, concurrency=1)
    results = client.chat_many(requests)
    n_ok = sum(r.ok for r in results)
    assert 0 < n_ok < len(requests)
    assert all(r.ok for r in results[:n_ok])  # one at a time: the first ones went through
    costs = [client.cost(r.prompt_tokens, r.completion_tokens) for r in results[:n_ok]]
    assert sum(costs[:-1]) < cap <= sum(costs)  # stopped right after crossing the cap
    reason = f"budget cap reached (${cap:.2f})"
    assert all(r.failure == reason and r.attempts == 0 for r in results[n_ok:])
    assert client.stopped_reason == reason
    assert server.n_requests == n_ok
    client.chat(req("one more"))
    assert server.n_requests == n_ok  # nothing is sent after the cap

    # concurrently: in-flight requests finish, nothing new starts after the cap
    server.reset()
    wide = client_for(server, prices=prices, max_cost_usd=cap, concurrency=4)
    results = wide.chat_many(requests)
    sent = [r for r in results if r.failure != reason]
    assert all(r.ok for r in sent) and server.n_requests == len(sent)
    assert n_ok <= len(sent) <= n_ok + 3
    assert wide.stopped_reason == reason


def test_dry_run_sends_nothing_and_estimates(make_server, tmp_path, capsys):
    server = make_server()
    cache = tmp_path / "cache"
    prices = {"local-model": (1000.0, 2000.0)}
    requests = [req(f"dry {i}", max_tokens=40) for i in range(10)]
    client_for(server, cache_dir=cache, prices=prices).chat_many(requests[:3])
    assert server.n_requests == 3
    capsys.readouterr()

    dry = client_for(server, cache_dir=cache, prices=prices, dry_run=True)
    calls, usd = dry.estimate_cost(requests)
    results = dry.chat_many(requests)
    assert server.n_requests == 3
    assert calls == 7 and usd > 0
    assert capsys.readouterr().out.strip() == f"dry run: 7 calls (3 cached), estimated ${usd:.4f}"
    assert all(r.ok and r.cached for r in results[:3])
    assert all(not r.ok and r.failure == "dry run" for r in results[3:])
    assert (dry.usage.dry_run_calls, dry.usage.dry_run_cost_usd) == (7, pytest.approx(usd))
    assert dry.usage.requests_sent == 0 and dry.usage.cost_usd == 0.0
    # the estimate is an upper bound of what the real run then costs
    real = client_for(server, cache_dir=cache, prices=prices)
    real.chat_many(requests)
    assert server.n_requests == 10 and 0 < real.usage.cost_usd <= usd

    # a dry run needs no key even for OpenAI itself, and reaches no network
    offline = LLMClient("gpt-4o-mini", dry_run=True, progress=False)
    assert offline.chat_many(requests)[0].failure == "dry run"
    assert offline.usage.dry_run_cost_usd > 0
    with pytest.raises(ValueError, match="no API key"):
        LLMClient("gpt-4o-mini", progress=False).chat_many(requests)


def test_concurrency_is_bounded(make_server):
    server = make_server(latency=0.15)
    client = client_for(server, concurrency=4)
    results = client.chat_many([req(f"parallel {i}") for i in range(20)])
    assert all(r.ok for r in results)
    assert 2 <= server.max_in_flight <= 4


def test_chat_many_inside_a_running_event_loop(make_server):
    server = make_server()
    client = client_for(server)

    async def notebook_cell():
        sync_results = client.chat_many([req("from a loop")])  # Jupyter calls it like this
        async_results = await client.achat_many([req("awaited")])
        return sync_results + async_results

    results = asyncio.run(notebook_cell())
    assert [r.ok for r in results] == [True, True] and server.n_requests == 2


def test_logprobs_are_parsed(make_server):
    server = make_server()
    client = client_for(server)
    result = client.chat(req("logprobs", logprobs=True, top_logprobs=3))
    body = server.requests[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    assert result.ok and result.logprobs
    assert "".join(e["token"] for e in result.logprobs) == result.content
    for entry in result.logprobs:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0] == {"token": entry["token"], "logprob": entry["logprob"]}

    given = [{"token": "Yes", "logprob": -0.1, "top_logprobs": [{"token": "Yes", "logprob": -0.1},
                                                                 {"token": "No", "logprob": -2.4}]}]
    server2 = make_server(responder=lambda body: {"content": "Yes", "logprobs": given})
    result = client_for(server2).chat(req("yes or no", logprobs=True, top_logprobs=2))
    assert result.content == "Yes" and result.logprobs == given
    assert client_for(server2).chat(req("no logprobs")).logprobs is None


def test_embeddings_shape_determinism_and_cache(make_server, tmp_path):
    server = make_server(embed_dim=32)
    texts = ["the head copies the previous token", "the head copies the previous word",
             "quantum chromodynamics on a lattice"]
    client = client_for(server, cache_dir=tmp_path / "cache")
    vectors = client.embed(texts)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    n = server.n_requests
    np.testing.assert_array_equal(client.embed(texts), vectors)  # cached
    assert server.n_requests == n
    uncached = client_for(server).embed(list(reversed(texts)))
    np.testing.assert_allclose(uncached[::-1], vectors, rtol=1e-6)  # deterministic server

    flaky = make_server(fault_sequence=["malformed", "429"], retry_after=0.01)
    assert client_for(flaky).embed(texts).shape == (3, 64)
    broken = make_server(fault_rate=1.0, faults=("500",))
    with pytest.raises(RuntimeError, match="http 500 after 2 attempts"):
        client_for(broken, max_retries=1).embed(texts)


def test_planted_key_is_sent_but_never_stored(make_server, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)  # the openai / http libraries log requests at DEBUG

    def responder(body):
        text = body["messages"][-1]["content"]
        if "echo the key" in text:  # an endpoint that quotes the key back in an error
            raise LocalServerHTTPError(400, f"Incorrect API key provided: {PLANTED}")
        return default_responder(body)

    server = make_server(require_api_key=PLANTED, responder=responder, fault_rate=0.3,
                         faults=("429", "500", "malformed", "truncated"),
                         fault_sequence=["timeout"], timeout_delay=5.0)
    run_dir = tmp_path / "run"
    client = client_for(server, api_key=PLANTED, cache_dir=run_dir / "cache", timeout=2.5,
                        max_retries=8)
    results = client.chat_many([req(f"keyed {i}") for i in range(8)] + [req("echo the key")])
    assert all(r.ok or r.failure.startswith("truncated") for r in results[:8])  # key accepted
    assert results[8].failure.startswith("http 400") and PLANTED not in results[8].failure
    client.embed(["a text"])

    wrong = client_for(server, api_key="sk-wrong-000")
    with pytest.raises(EndpointError, match="http 401"):  # a rejected key stops the client
        wrong.chat(req("wrong key"))

    # everything a run might write: results, usage, repr, a pickled client (checkpoints)
    (run_dir / "results.json").write_text(json.dumps([r.__dict__ for r in results]))
    (run_dir / "usage.txt").write_text(client.usage.summary() + "\n" + repr(client))
    (run_dir / "client.pkl").write_bytes(pickle.dumps(client))
    (run_dir / "log.txt").write_text(caplog.text)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    logs = list((run_dir / "cache" / "answers").glob("*.jsonl"))
    assert len(files) == 5 and len(logs) == 1 and logs[0] in files  # the cache: one log
    assert len(logs[0].read_text().splitlines()) >= 1
    for path in files:
        assert PLANTED.encode() not in path.read_bytes(), path
    assert PLANTED not in repr(client) and PLANTED not in str(client)
    assert PLANTED not in caplog.text

    # from the environment: used, still masked; an unpickled client resolves it again
    server.fault_rate = 0.0
    # $OPENAI_API_KEY is for OpenAI: a local server gets the placeholder, not the key
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    with pytest.raises(EndpointError, match="http 401"):
        client_for(server).chat(req("openai key"))
    monkeypatch.setenv("INTERP_LIB_API_KEY", PLANTED)
    from_env = client_for(server, max_retries=8)
    assert from_env.chat(req("env key")).ok and PLANTED not in repr(from_env)
    restored = pickle.loads(pickle.dumps(client))
    assert restored.chat(req("restored")).ok


def test_resolve_api_key_order(monkeypatch):
    assert resolve_api_key("explicit", "http://127.0.0.1:1/v1") == "explicit"
    assert resolve_api_key(None, None) is None
    assert resolve_api_key(None, "https://api.openai.com/v1") is None
    assert resolve_api_key(None, "http://127.0.0.1:8000/v1") == "unused"
    # Colab cannot run here: a stand-in for google.colab.userdata checks the lookup order
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: {"OPENAI_API_KEY": "from-colab"}[name])
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert resolve_api_key(None, None) == "from-colab"
    assert resolve_api_key(None, "http://127.0.0.1:8000/v1") == "unused"  # OpenAI's, not theirs
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    assert resolve_api_key(None, None) == "from-openai-env"
    assert resolve_api_key(None, "https://api.openai.com/v1") == "from-openai-env"
    # an OpenAI key never goes to another host, however its name looks
    for other in ("http://127.0.0.1:8000/v1", "https://proxy.example.com/v1",
                  "https://api.openai.com.evil.example/v1"):
        assert resolve_api_key(None, other) == "unused", other
    monkeypatch.setenv("INTERP_LIB_API_KEY", "from-lib-env")
    assert resolve_api_key(None, None) == "from-lib-env"
    assert resolve_api_key(None, "http://127.0.0.1:8000/v1") == "from-lib-env"
    assert resolve_api_key("explicit", None) == "explicit"


def test_bad_input_is_named(make_server):
    server = make_server()
    with pytest.raises(ValueError, match="concurrency=0"):
        client_for(server, concurrency=0)
    with pytest.raises(ValueError, match="timeout=-1"):
        client_for(server, timeout=-1)
    with pytest.raises(ValueError, match="base_url='ftp://x'"):
        LLMClient("m", base_url="ftp://x")
    with pytest.raises(ValueError, match=r"prices\['m'\]"):
        client_for(server, prices={"m": (1.0,)})
    with pytest.raises(ValueError, match="messages"):
        ChatRequest([])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        ChatRequest([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="max_tokens=0"):
        req("x", max_tokens=0)
    with pytest.raises(ValueError, match="top_logprobs=3 needs logprobs=True"):
        req("x", top_logprobs=3)
    with pytest.raises(TypeError, match=r"requests\[1\]"):
        client_for(server).chat_many([req("x"), "not a request"])
    with pytest.raises(ValueError, match="fault_rate=2"):
        LocalOpenAIServer(fault_rate=2)
    assert server.n_requests == 0


def test_cache_write_failure_still_returns_results(make_server, tmp_path, caplog):
    server = make_server()
    cache = tmp_path / "cache"
    client = client_for(server, cache_dir=cache)
    # a file where the cache's log folder should be: every write fails with an OSError
    (cache / "answers").write_text("not a folder")
    requests = [req(f"unwritable {i}") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="interp_lib.explain.client"):
        results = client.chat_many(requests)
        vectors = client.embed(["a text", "another text"])
    assert [r.ok for r in results] == [True] * 3
    assert [r.content for r in results] == [expected_content(r) for r in requests]
    assert vectors.shape == (2, 64)
    assert "could not write cache entry" in caplog.text
    # nothing was cached: the same requests are sent again, and still succeed
    assert all(r.ok for r in client.chat_many(requests)) and server.n_requests == 3 + 1 + 3


@pytest.mark.parametrize("stored", [{"result": None}, [1, 2], {"result": [1]}, "text",
                                    {"result": {"ok": True, "content": None}}])
def test_cache_file_of_another_shape_is_a_miss(make_server, tmp_path, stored):
    server = make_server()
    client = client_for(server, cache_dir=tmp_path / "cache")
    request = req("odd cache file")
    # in the old one-file-per-request layout, and in the log
    path = client.cache.legacy_path("chat", client.cache_key(request))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stored))
    result = client.chat(request)
    assert result.ok and not result.cached and server.n_requests == 1
    assert client.cached(request).content == expected_content(request)
    embed_key = client._embed_key("x", "text-embedding-3-small")
    embed_path = client.cache.legacy_path("embed", embed_key)
    embed_path.parent.mkdir(parents=True)
    embed_path.write_text(json.dumps(stored))
    assert client.embed(["x"]).shape == (1, 64) and server.n_requests == 2

    other = request.__class__(req("odd log entry").messages)
    client.cache.put("chat", client.cache_key(other), stored)
    assert client.chat(other).ok and server.n_requests == 3


def test_non_numeric_usage_counts_are_zero():
    # LocalOpenAIServer always writes a correct usage block, so the body is parsed directly
    import interp_lib.explain.client as client_module

    assert client_module._count("many") == 0 and client_module._count(None) == 0
    assert client_module._count("12") == 12 and client_module._count(7.0) == 7
    assert client_module._count(float("nan")) == 0 and client_module._count(-3) == 0
    assert client_module._count(True) == 0
    client = LLMClient("local-model", base_url="http://127.0.0.1:9/v1", progress=False)
    result = client._result_from_body(
        {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": "lots", "completion_tokens": [1]}}, req("x"), 1)
    assert result.ok and result.content == "hi"
    assert result.prompt_tokens == 0 and result.completion_tokens == 0


def test_unknown_price_with_a_budget_warns_and_fine_tunes_are_priced(make_server):
    server = make_server()
    with pytest.warns(UserWarning, match=r"model 'my-local-llm'.*prices="):
        client_for(server, model="my-local-llm", max_cost_usd=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a priced model, or no cap: no warning
        client_for(server, model="gpt-4o-mini", max_cost_usd=1.0)
        client_for(server, model="my-local-llm", prices={"my-local-llm": (1.0, 2.0)},
                   max_cost_usd=1.0)
        client_for(server, model="my-local-llm")
        tuned = client_for(server, model="ft:gpt-4o-mini:my-org::abc123", max_cost_usd=1.0)
    assert tuned.price() == tuned.prices["gpt-4o-mini"]
    assert tuned.price("ft:gpt-4o-2024-08-06:org:custom:id9") == tuned.prices["gpt-4o"]
    assert tuned.price("ft:unknown-base:org::id") == (0.0, 0.0)


# --------------------------------------------------------------------------------------------
# The answer store: the old layout migrated, several real processes writing at once
# --------------------------------------------------------------------------------------------

def test_old_one_file_per_request_cache_is_read_and_migrated(make_server, tmp_path):
    import dataclasses

    from interp_lib.explain.cache import AnswerStore

    server = make_server()
    cache = tmp_path / "cache"
    client = client_for(server, cache_dir=cache)
    requests = [req(f"old cache {i}") for i in range(3)]
    # files as the previous releases wrote them: <kind>/<key[:2]>/<key>.json
    for i, request in enumerate(requests):
        key = client.cache_key(request)
        path = cache / "chat" / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        answer = ChatResult(ok=True, content=f"answered by an old run {i}", prompt_tokens=5)
        path.write_text(json.dumps({"request": request.canonical(client.base_url, client.model),
                                    "result": dataclasses.asdict(answer)}))
    embed_key = client._embed_key("old text", "text-embedding-3-small")
    (cache / "embed" / embed_key[:2]).mkdir(parents=True)
    (cache / "embed" / embed_key[:2] / f"{embed_key}.json").write_text(
        json.dumps({"model": "text-embedding-3-small", "embedding": [0.5, 0.25]}))

    results = client.chat_many(requests[:2])  # read from the old layout, nothing sent
    assert [r.content for r in results] == ["answered by an old run 0", "answered by an old run 1"]
    assert all(r.cached for r in results) and server.n_requests == 0
    np.testing.assert_array_equal(client.embed(["old text"]), [[0.5, 0.25]])

    # migrate copies what is left (the two already read were copied when read)
    store = AnswerStore(cache)
    assert store.migrate(remove=True) == 2  # request 2 and the embedding
    assert not list((cache / "chat").rglob("*.json")) and not list((cache / "embed").rglob("*.json"))
    fresh = client_for(server, cache_dir=cache)
    assert [r.content for r in fresh.chat_many(requests)] == [f"answered by an old run {i}" for i in range(3)]
    np.testing.assert_array_equal(fresh.embed(["old text"]), [[0.5, 0.25]])
    assert server.n_requests == 0


STORE_WRITER = """
import sys, time
from pathlib import Path
from interp_lib.explain.cache import AnswerStore
root, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = AnswerStore(root)
while not (Path(root) / "go").exists():  # start together
    time.sleep(0.005)
for i in range(n):
    key = f"k{(i + worker * n // 2) % (2 * n)}"  # half the keys shared with the next worker
    # 6 kB values: longer than an atomic pipe write, so interleaved appends would show
    store.put("chat", key, {"key": key, "text": key * (6000 // len(key))})
"""


def test_answer_store_with_concurrent_writer_processes(tmp_path):
    import subprocess

    from interp_lib.explain.cache import AnswerStore

    root, n, workers = tmp_path / "store", 200, 4
    root.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", STORE_WRITER, str(root), str(w), str(n)])
             for w in range(workers)]
    (root / "go").write_text("")
    reader = AnswerStore(root)
    while any(p.poll() is None for p in procs):  # read while they write: only whole entries
        reader.refresh()
        for (kind, key), value in reader.items():
            assert value == {"key": key, "text": key * (6000 // len(key))}
        time.sleep(0.01)
    assert [p.wait(timeout=60) for p in procs] == [0] * workers

    expected = {f"k{(i + w * n // 2) % (2 * n)}" for w in range(workers) for i in range(n)}
    final = AnswerStore(root)
    assert len(final) == len(expected) and final.skipped_lines == 0
    assert {key for (_, key), _ in final.items()} == expected
    assert all(v == {"key": k, "text": k * (6000 // len(k))} for (_, k), v in final.items())
    logs = final.log_files()
    assert len(logs) == workers and all(len(p.read_text().splitlines()) == n for p in logs)
    reader.refresh()
    assert len(reader) == len(expected)  # the live reader caught up with every writer

    # compact: one file, same answers
    merged = final.compact()
    assert final.log_files() == [merged]
    again = AnswerStore(root)
    assert dict(again.items()) == dict(final.items())


CLIENT_WORKER = """
import sys
from interp_lib.explain.client import ChatRequest, LLMClient
url, cache, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = LLMClient("local-model", base_url=url, cache_dir=cache, progress=False, timeout=5.0,
                   concurrency=4)
texts = [f"shared request {i}" for i in range(12)] + [f"own request {worker} {i}" for i in range(6)]
requests = [ChatRequest([{"role": "user", "content": t}]) for t in texts]
assert all(r.ok for r in client.chat_many(requests))
"""


def test_llm_clients_in_several_processes_share_one_cache(make_server, tmp_path):
    import subprocess

    server = make_server()
    cache = tmp_path / "llm_cache"
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT_WORKER, server.url, str(cache), str(w)],
                              stderr=subprocess.PIPE, text=True) for w in range(3)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    # each own request once; a shared one at most once per process (they ran at the same time)
    assert 12 + 3 * 6 <= server.n_requests <= 3 * 18
    texts = [f"shared request {i}" for i in range(12)] + [
        f"own request {w} {i}" for w in range(3) for i in range(6)]
    requests = [ChatRequest([{"role": "user", "content": t}]) for t in texts]
    before = server.n_requests
    client = client_for(server, cache_dir=cache)
    results = client.chat_many(requests)
    assert server.n_requests == before and all(r.cached for r in results)
    assert [r.content for r in results] == [expected_content(r) for r in requests]
    assert len(client.cache) == len(texts) and client.cache.skipped_lines == 0
