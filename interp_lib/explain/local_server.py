"""A real OpenAI-compatible HTTP server on 127.0.0.1 that can inject faults.

Tests, notebooks and benchmarks point ``LLMClient`` (or the ``openai`` package itself) at
``server.url`` and get real HTTP: ``POST /v1/chat/completions`` (``response_format``,
``logprobs`` / ``top_logprobs``, ``max_tokens``, a ``usage`` block), ``POST /v1/embeddings``
(deterministic hashed bag-of-words vectors, so similar texts get similar vectors) and
``GET /v1/models``, and OpenAI's Batch API (``POST /v1/files`` with ``purpose=batch``, ``POST
/v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/files/{id}/content``): a batch answers its
lines after ``batch_delay`` seconds (``batch_duplicates``: every answered line twice, the copy's
content prefixed "(duplicate) ", as a faulty endpoint may) (``in_progress`` until then), each line through the same
chat handler; faults drawn for a line make that line an error (status 500 in the error file), and
``"truncated"`` cuts it as for a direct request. ``batch_lines`` records every line's body.

Faults are drawn per request from a seeded RNG with probability ``fault_rate`` (or taken in order
from ``fault_sequence`` first):

* ``"429"`` -- status 429 with ``Retry-After: <retry_after>`` (float seconds) and
  ``retry-after-ms``;
* ``"500"`` -- status 500;
* ``"timeout"`` -- sleep ``timeout_delay`` seconds, then answer (the client should have given up);
* ``"malformed"`` -- status 200 with a body that is not JSON;
* ``"truncated"`` -- a valid answer cut to half its tokens with ``finish_reason="length"``;
* ``"html"`` -- status 200 with an HTML page (a captive portal or a proxy's login page);
* ``"oversized"`` -- status 200 streaming ``oversized_bytes`` of junk with no Content-Length
  (a misbehaving endpoint; the client must stop reading at its size limit).

The last two are never drawn at random from the default ``faults`` (``FAULT_KINDS``); name them
in ``faults`` or ``fault_sequence``.

Every request is recorded (``requests``: bodies; ``log``: arrival time, path, fault, status), and
the largest number of requests handled at once is kept in ``max_in_flight``. The API key the
client sends is compared with ``require_api_key`` and never stored.

    with LocalOpenAIServer(latency=0.2) as server:
        client = LLMClient("local-model", base_url=server.url)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

__all__ = ["LocalOpenAIServer", "LocalServerHTTPError", "FAULT_KINDS", "EXTRA_FAULT_KINDS",
           "default_responder",
           "count_tokens", "split_tokens", "hashed_embedding"]

FAULT_KINDS = ("429", "500", "timeout", "malformed", "truncated")
EXTRA_FAULT_KINDS = ("html", "oversized")
_ALL_FAULTS = FAULT_KINDS + EXTRA_FAULT_KINDS
# Faults that make sense for an endpoint; "truncated" has no meaning for embeddings.
_ENDPOINT_FAULTS = {"chat": set(_ALL_FAULTS), "embeddings": set(_ALL_FAULTS) - {"truncated"}}

_TOKEN_RE = re.compile(r"\s*[A-Za-z0-9_]+|\s*[^\sA-Za-z0-9_]|\s+$")
_WORD_RE = re.compile(r"[a-z0-9_]+")


class LocalServerHTTPError(Exception):
    """Raise from a responder to answer with an HTTP error (e.g. 400) instead of content."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = int(status), str(message)


def split_tokens(text: str) -> list[str]:
    """Split text into word / punctuation tokens (leading whitespace kept); they join back to it."""
    tokens = _TOKEN_RE.findall(text)
    assert "".join(tokens) == text, "tokenisation must be lossless"
    return tokens


def count_tokens(text: str) -> int:
    return len(split_tokens(text))


def default_responder(body: dict) -> str:
    """A short deterministic answer derived from the last user message (JSON when asked)."""
    messages = body.get("messages") or []
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    if not isinstance(last, str):
        last = json.dumps(last)
    digest = hashlib.sha256(last.encode()).hexdigest()[:8]
    words = last.split()[:6]
    text = f"Reply {digest}: " + " ".join(words)
    if (body.get("response_format") or {}).get("type") == "json_object":
        return json.dumps({"answer": text})
    return text


def _unit_hash(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _fake_logprobs(tokens: list[str], top_n: int) -> list[dict]:
    """Plausible, deterministic per-token logprobs: the chosen token is usually the most likely."""
    out = []
    for pos, token in enumerate(tokens):
        logprob = -3.0 * _unit_hash("lp", pos, token) ** 2
        alternatives = [{"token": token, "logprob": logprob}]
        for k in range(1, top_n):
            alternatives.append({"token": f"{token.strip() or '_'}~{k}",
                                 "logprob": logprob - 0.5 * k - _unit_hash("alt", pos, token, k)})
        out.append({"token": token, "logprob": logprob, "top_logprobs": alternatives[:top_n]})
    return out


def hashed_embedding(text: str, dim: int) -> list[float]:
    """L2-normalised signed hashed bag of words and word bigrams (unit vector e0 for no words)."""
    vec = [0.0] * dim
    words = _WORD_RE.findall(text.lower())
    features = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "big") % dim
        vec[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec))
    if norm == 0.0:
        vec[0], norm = 1.0, 1.0
    return [v / norm for v in vec]


@dataclass
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str]
    chunks: Any = None  # an iterable of bytes sent instead of body, without Content-Length


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), dict(headers or {}))


def _error_reply(status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> _Reply:
    return _json_reply(status, {"error": {"message": message, "type": kind, "code": None}},
                       headers)


class LocalOpenAIServer:
    """Threaded OpenAI-compatible server on 127.0.0.1 (a free port); see the module docstring.

    ``reject_params`` names request fields ("response_format", "logprobs") that this server
    answers with a 400, like an endpoint that does not support them. ``ignore_max_tokens``
    answers in full whatever ``max_tokens`` says. A responder returns the content (str) or a dict
    ``{"content": str | None, "finish_reason": ..., "logprobs": ...}``; ``"content": None``
    answers with a null content, as a broken endpoint may.
    """

    def __init__(self, responder: Callable[[dict], str | dict] | None = None, *,
                 fault_rate: float = 0.0, faults: Sequence[str] = FAULT_KINDS,
                 retry_after: float = 0.05, timeout_delay: float = 2.0, latency: float = 0.0,
                 seed: int = 0, logprobs: bool = True, embed_dim: int = 64,
                 require_api_key: str | None = None, fault_sequence: Sequence[str | None] = (),
                 reject_params: Sequence[str] = (), model_name: str = "local-model",
                 oversized_bytes: int = 64 << 20, ignore_max_tokens: bool = False,
                 batch_delay: float = 0.0, batch_api: bool = True, batch_duplicates: bool = False):
        if not 0.0 <= float(fault_rate) <= 1.0:
            raise ValueError(f"fault_rate={fault_rate!r}: expected a probability in [0, 1]")
        bad = [f for f in [*faults, *(f for f in fault_sequence if f is not None)]
               if f not in _ALL_FAULTS]
        if bad:
            raise ValueError(f"faults / fault_sequence contain {bad!r}: expected kinds from "
                             f"{_ALL_FAULTS}")
        if fault_rate > 0 and not faults:
            raise ValueError("faults=() with fault_rate > 0: expected at least one fault kind")
        for name, value in (("retry_after", retry_after), ("timeout_delay", timeout_delay),
                            ("latency", latency)):
            if not float(value) >= 0.0:
                raise ValueError(f"{name}={value!r}: expected a number of seconds >= 0")
        if int(embed_dim) < 1:
            raise ValueError(f"embed_dim={embed_dim!r}: expected a positive integer")
        self.responder = responder or default_responder
        self.fault_rate, self.faults = float(fault_rate), tuple(faults)
        self.retry_after, self.timeout_delay = float(retry_after), float(timeout_delay)
        self.latency, self.seed = float(latency), seed
        self.logprobs, self.embed_dim = bool(logprobs), int(embed_dim)
        self.reject_params, self.model_name = tuple(reject_params), model_name
        self.oversized_bytes = int(oversized_bytes)
        self.ignore_max_tokens = bool(ignore_max_tokens)  # answer in full, like a broken endpoint
        self.batch_delay, self.batch_api = float(batch_delay), bool(batch_api)
        # each answered batch line written twice, the copy's content prefixed "(duplicate) "
        self.batch_duplicates = bool(batch_duplicates)
        # Only a digest of the required key is kept, so the server holds no copy of the secret.
        self._key_digest = (None if require_api_key is None
                            else hashlib.sha256(require_api_key.encode()).digest())
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset()
        self._fault_sequence = list(fault_sequence)

    # -- bookkeeping ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget recorded requests, fault counts and the in-flight maximum; restart the RNG."""
        with self._lock:
            self.requests: list[dict] = []
            self.log: list[dict] = []
            self.n_requests = 0
            self.fault_counts: dict[str, int] = {kind: 0 for kind in _ALL_FAULTS}
            self.in_flight = 0
            self.max_in_flight = 0
            self._rng = random.Random(self.seed)
            self._fault_sequence = []
            self.files: dict[str, dict] = {}
            self.batches: dict[str, dict] = {}
            self.batch_lines: list[dict] = []

    def _draw_fault(self, endpoint: str) -> str | None:
        with self._lock:
            if self._fault_sequence:
                fault = self._fault_sequence.pop(0)
            elif self.fault_rate > 0 and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
            else:
                fault = None
            if fault is not None and fault not in _ENDPOINT_FAULTS[endpoint]:
                fault = None
            if fault is not None:
                self.fault_counts[fault] += 1
            return fault

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LocalOpenAIServer is not running: call start() or use `with`")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "LocalOpenAIServer":
        if self._httpd is not None:
            return self
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="LocalOpenAIServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> "LocalOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.url if self._httpd is not None else "stopped"
        return (f"LocalOpenAIServer({state}, fault_rate={self.fault_rate}, latency={self.latency}, "
                f"n_requests={self.n_requests})")

    # -- request handling (called from handler threads) -----------------------------------------
    def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> _Reply:
        arrival = time.monotonic()
        # Logged on arrival (status filled in later) so the log is in arrival order and shows
        # requests whose client already gave up.
        entry = {"time": arrival, "method": method, "path": path, "fault": None, "status": None}
        with self._lock:
            self.n_requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.log.append(entry)
        try:
            reply = self._route(method, path, headers, raw, entry)
        except Exception as exc:  # a responder bug must show up as a 500, not a hung client
            reply = _error_reply(500, f"server error: {type(exc).__name__}: {exc}", "server_error")
        finally:
            with self._lock:
                self.in_flight -= 1
        entry["status"] = reply.status
        return reply

    def _route(self, method: str, path: str, headers: dict[str, str], raw: bytes,
               entry: dict) -> _Reply:
        if self.latency:
            time.sleep(self.latency)
        body: Any = None
        route = path.split("?", 1)[0].rstrip("/")
        if self.batch_api and (route == "/v1/files" or route.startswith(("/v1/files/", "/v1/batches"))):
            return self._batch_route(method, route, headers, raw)
        if method == "POST":
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                body = None
            with self._lock:
                self.requests.append(body if isinstance(body, dict) else {"_raw": raw.decode(
                    "utf-8", "replace")})
        if self._key_digest is not None:
            auth = headers.get("authorization", "")
            sent = auth[7:] if auth.lower().startswith("bearer ") else ""
            if hashlib.sha256(sent.encode()).digest() != self._key_digest:
                return _error_reply(401, "Incorrect API key provided.", "invalid_api_key")
        if method == "GET" and route == "/v1/models":
            return _json_reply(200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "local"}]})
        if method != "POST" or route not in ("/v1/chat/completions", "/v1/embeddings"):
            return _error_reply(404, f"no route for {method} {route}", "not_found")
        if not isinstance(body, dict):
            return _error_reply(400, "request body is not a JSON object")
        endpoint = "chat" if route.endswith("completions") else "embeddings"
        fault = self._draw_fault(endpoint)
        entry["fault"] = fault
        if fault == "429":
            return _error_reply(429, "Rate limit reached (injected).", "rate_limit_exceeded",
                                {"Retry-After": f"{self.retry_after:g}",
                                 "retry-after-ms": str(int(round(self.retry_after * 1000)))})
        if fault == "500":
            return _error_reply(500, "Internal server error (injected).", "server_error")
        if fault == "malformed":
            return _Reply(200, b'{"id": "chatcmpl-broken", "choices": [{"message": {"cont',
                          {})
        if fault == "html":
            return _Reply(200, b"<!DOCTYPE html><html><head><title>Sign in</title></head>"
                               b"<body>Sign in to continue</body></html>",
                          {"Content-Type": "text/html"})
        if fault == "oversized":
            size = self.oversized_bytes

            def junk():
                block = b"x" * (1 << 20)
                for start in range(0, size, len(block)):
                    yield block[:min(len(block), size - start)]
            return _Reply(200, b"", {"Content-Type": "text/plain"}, chunks=junk())
        if fault == "timeout":
            time.sleep(self.timeout_delay)
        if endpoint == "embeddings":
            return self._embeddings(body)
        return self._chat(body, truncate=fault == "truncated")

    def _chat(self, body: dict, truncate: bool) -> _Reply:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m for m in messages):
            return _error_reply(400, "'messages' must be a non-empty list of {role, content}")
        for param in self.reject_params:
            if body.get(param) not in (None, False):
                return _error_reply(400, f"Unsupported parameter: '{param}' is not supported "
                                         "with this model.")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            return _error_reply(400, f"max_tokens={max_tokens!r}: expected a positive integer")
        try:
            answer = self.responder(body)
        except LocalServerHTTPError as exc:
            return _error_reply(exc.status, exc.message)
        if isinstance(answer, str):
            answer = {"content": answer}
        null_content = "content" in answer and answer["content"] is None  # {"content": None}: null
        content = str(answer.get("content") or "")
        finish_reason = answer.get("finish_reason") or "stop"
        given_logprobs = answer.get("logprobs")
        tokens = split_tokens(content)
        if max_tokens is not None and len(tokens) > max_tokens and not self.ignore_max_tokens:
            tokens, finish_reason = tokens[:max_tokens], "length"
        if truncate:
            tokens, finish_reason = tokens[:max(1, len(tokens) // 2)], "length"
        content = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason,
                                  "message": {"role": "assistant",
                                              "content": None if null_content else content},
                                  "logprobs": None}
        if body.get("logprobs") and self.logprobs:
            top_n = int(body.get("top_logprobs") or 0)
            entries = (given_logprobs[:len(tokens)] if given_logprobs is not None
                       else _fake_logprobs(tokens, top_n))
            choice["logprobs"] = {"content": [
                {"token": e["token"], "logprob": float(e["logprob"]),
                 "bytes": list(e["token"].encode()),
                 "top_logprobs": [{"token": t["token"], "logprob": float(t["logprob"]),
                                   "bytes": list(t["token"].encode())}
                                  for t in (e.get("top_logprobs") or [])[:top_n]]}
                for e in entries]}
        prompt_tokens = sum(4 + count_tokens(m.get("content") if isinstance(m.get("content"), str)
                                             else json.dumps(m.get("content")))
                            for m in messages)
        return _json_reply(200, {
            "id": "chatcmpl-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode())
            .hexdigest()[:24],
            "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or self.model_name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                      "total_tokens": prompt_tokens + len(tokens)}})

    # -- Batch API -------------------------------------------------------------------------------
    def _batch_route(self, method: str, route: str, headers: dict[str, str], raw: bytes) -> _Reply:
        if self._key_digest is not None:
            auth = headers.get("authorization", "")
            sent = auth[7:] if auth.lower().startswith("bearer ") else ""
            if hashlib.sha256(sent.encode()).digest() != self._key_digest:
                return _error_reply(401, "Incorrect API key provided.", "invalid_api_key")
        parts = route.split("/")[2:]  # ["files"], ["files", id, "content"], ["batches"], ["batches", id]
        if method == "POST" and parts == ["files"]:
            return self._upload(headers.get("content-type", ""), raw)
        if method == "GET" and len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            with self._lock:
                stored = self.files.get(parts[1])
            if stored is None:
                return _error_reply(404, f"no file {parts[1]!r}", "not_found")
            return _Reply(200, stored["data"], {"Content-Type": "application/octet-stream"})
        if method == "POST" and parts == ["batches"]:
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                body = None
            if not isinstance(body, dict) or body.get("endpoint") != "/v1/chat/completions":
                return _error_reply(400, "expected {input_file_id, endpoint: '/v1/chat/completions', "
                                         "completion_window}")
            with self._lock:
                stored = self.files.get(str(body.get("input_file_id")))
                if stored is None:
                    return _error_reply(404, f"no file {body.get('input_file_id')!r}", "not_found")
                batch_id = f"batch_{len(self.batches):06d}"
                batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                         "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window"),
                         "status": "in_progress", "output_file_id": None, "error_file_id": None,
                         "created_at": int(time.time()), "request_counts": {"total": 0, "completed": 0, "failed": 0}}
                self.batches[batch_id] = batch
            threading.Thread(target=self._process_batch, args=(batch_id, stored["data"]), daemon=True).start()
            return _json_reply(200, dict(batch))
        if method == "GET" and len(parts) == 2 and parts[0] == "batches":
            with self._lock:
                batch = self.batches.get(parts[1])
                batch = None if batch is None else json.loads(json.dumps(batch))
            if batch is None:
                return _error_reply(404, f"no batch {parts[1]!r}", "not_found")
            return _json_reply(200, batch)
        return _error_reply(404, f"no route for {method} {route}", "not_found")

    def _upload(self, content_type: str, raw: bytes) -> _Reply:
        from email.parser import BytesParser
        from email.policy import HTTP

        if not content_type.startswith("multipart/form-data"):
            return _error_reply(400, "expected a multipart/form-data upload")
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields or fields.get("purpose", (None, b""))[1].decode() != "batch":
            return _error_reply(400, "expected fields 'file' and purpose='batch'")
        filename, data = fields["file"]
        with self._lock:
            file_id = f"file-{len(self.files):06d}"
            self.files[file_id] = {"data": data, "purpose": "batch"}
        return _json_reply(200, {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                 "filename": filename or "upload.jsonl", "purpose": "batch", "status": "processed"})

    def _process_batch(self, batch_id: str, data: bytes) -> None:
        time.sleep(self.batch_delay)
        output, errors, n_done, n_failed = [], [], 0, 0
        for line in data.decode().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            body = entry.get("body") or {}
            with self._lock:
                self.batch_lines.append(body)
            fault = self._draw_fault("chat")
            if fault is not None and fault != "truncated":
                reply = _error_reply(500, f"Internal server error (injected {fault}).", "server_error")
            else:
                reply = self._chat(body, truncate=fault == "truncated")
            record = {"id": f"batch_req_{n_done + n_failed}", "custom_id": entry.get("custom_id"),
                      "response": {"status_code": reply.status, "body": json.loads(reply.body)}, "error": None}
            (output if reply.status == 200 else errors).append(json.dumps(record))
            if self.batch_duplicates and reply.status == 200:
                copy = json.loads(json.dumps(record))
                message = copy["response"]["body"]["choices"][0]["message"]
                message["content"] = "(duplicate) " + (message["content"] or "")
                output.append(json.dumps(copy))
            n_done += reply.status == 200
            n_failed += reply.status != 200
        with self._lock:
            batch = self.batches[batch_id]
            for name, lines in (("output_file_id", output), ("error_file_id", errors)):
                if lines:
                    file_id = f"file-{len(self.files):06d}"
                    self.files[file_id] = {"data": ("\n".join(lines) + "\n").encode(), "purpose": "batch_output"}
                    batch[name] = file_id
            batch["request_counts"] = {"total": n_done + n_failed, "completed": n_done, "failed": n_failed}
            batch["status"] = "completed"

    def _embeddings(self, body: dict) -> _Reply:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _error_reply(400, "'input' must be a string or a non-empty list of strings")
        dim = int(body.get("dimensions") or self.embed_dim)
        encoding = body.get("encoding_format") or "float"
        data = []
        for i, text in enumerate(inputs):
            vec = hashed_embedding(text, dim)
            if encoding == "base64":
                vec = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        n_tokens = sum(count_tokens(t) for t in inputs)
        return _json_reply(200, {"object": "list", "data": data,
                                 "model": body.get("model") or self.model_name,
                                 "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping in a "timeout" fault must not block stop()
    request_queue_size = 128  # the default listen backlog (5) refuses bursts of new connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up is normal
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real endpoints
    # Headers and body leave in one segment with Nagle off; otherwise Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every response on a kept-alive connection.
    disable_nagle_algorithm = True
    wbufsize = -1

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.owner._handle(method, self.path, headers, raw)  # type: ignore
        try:
            self.send_response(reply.status)
            extra = {k: v for k, v in reply.headers.items() if k.lower() != "content-type"}
            self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
            if reply.chunks is None:
                self.send_header("Content-Length", str(len(reply.body)))
            else:  # the body ends when the connection closes
                self.send_header("Connection", "close")
                self.close_connection = True
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.chunks is None:
                self.wfile.write(reply.body)
            else:
                for chunk in reply.chunks:
                    self.wfile.write(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a "timeout" fault): nothing to answer to.
            self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        self._serve("POST")

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read server.log
        pass
