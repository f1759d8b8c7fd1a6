"""LLM client of the head explainer: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, ...).

One ``LLMClient`` sends batches of ``ChatRequest`` with the ``openai`` package's ``AsyncOpenAI``
(its own retries off; requests go through its generic ``post`` and the JSON is parsed here, which
halves the CPU per request and lets a body that is not JSON be retried) and returns one
``ChatResult`` per request, in order, never raising for a request that fails:

* bounded concurrency (a semaphore held only while a request is on the wire);
* retries on 408 / 409 / 429 / 5xx, timeouts, connection errors and bodies that are not JSON,
  with exponential backoff and full jitter (seeded, capped at ``backoff_max``), honouring
  ``Retry-After`` / ``retry-after-ms`` (float seconds or an HTTP date) up to ``retry_after_max``;
  other 4xx fail at once with the reason. A 400 that names ``response_format`` / ``logprobs``
  (or ``max_completion_tokens``) is retried without that feature, again for each 400 that names
  another one (the first 400 is the reason if all fail), and the client remembers it
  (``supports_json_mode``, ``supports_logprobs``);
* ``finish_reason == "length"`` gives ``ok=False``, ``failure="truncated (finish_reason=length)"``
  and keeps the partial text in ``content``; null or empty content is a failure too. All three
  count in ``usage.failed_requests`` (a rerun may fix them: the explainer does not save the stage
  as finished), as do requests that got no answer;
* answer content is scrubbed of the API key (an endpoint that echoes the Bearer value): the key
  is never stored or shown;
* a disk cache (``interp_lib.explain.cache.AnswerStore``: one append-only log per writing
  process, shared safely by concurrent workers; the old one-file-per-request layout is still
  read; an entry that cannot be written is logged and skipped), keyed by the SHA-256 of the canonical request:
  base_url, model, messages, max_tokens, temperature, json_mode, logprobs, top_logprobs -- never
  the API key, never ``tag``), so a rerun or a resumed run sends no request twice. Only
  successful results are cached. Identical requests in one batch are sent once. As a
  consequence, identical requests at ``temperature > 0`` share one sample: vary the prompt to get
  several;
* token and dollar accounting from the ``usage`` block of each response and a price table
  (``DEFAULT_PRICES`` merged with ``prices``; a model not in the table costs 0, with a warning
  when ``max_cost_usd`` is set; names match by longest prefix, so ``gpt-4o-mini-2024-07-18`` is
  priced as ``gpt-4o-mini``, and a fine-tune ``ft:gpt-4o-mini:org::id`` as its base model);
* a spending cap: once ``usage.cost_usd >= max_cost_usd`` no further request is sent (those in
  flight finish, so the total may overshoot by at most ``concurrency`` responses); the rest return
  ``failure="budget cap reached ($X)"`` and ``stopped_reason`` is set;
* a dry run that sends nothing and prints ``dry run: N calls (M cached), estimated $X``;
* optionally (``batch=True``) OpenAI's Batch API: the requests of one ``chat_many`` that are not
  cached go up as one JSON-lines file (``POST /files``, ``POST /batches``), the batch is polled
  every ``batch_poll_interval`` seconds and its answers are read back, priced at
  ``BATCH_DISCOUNT`` of the standard price and cached like any other answer. The batch id is kept
  under ``cache_dir/batches/`` until its answers are cached, so a killed run collects the same
  batch instead of paying twice. Lines the batch could not answer are sent directly (with
  retries); an endpoint without the Batch API (404 / 405 on upload) gets every request directly,
  with a warning; a batch still running after ``batch_timeout`` seconds leaves its requests
  failed with a message saying a rerun collects it;
* a circuit breaker: after ``breaker_threshold`` consecutive attempts that say the endpoint
  itself is unusable (connection errors, bodies that are not JSON, bodies over the size limit),
  or one 401 / 403 (a rejected key), nothing more is sent, the remaining requests fail at once, and ``chat_many`` /
  ``embed`` raise ``EndpointError`` naming the URL and the cause (also when a whole batch
  failed that way before the threshold). 408 / 409 / 429 / 5xx and timeouts are transient:
  they keep their backoff and neither trip nor reset that count; but ``timeout_breaker``
  (default ``TIMEOUT_BREAKER`` = 6) timeouts in a row with no answer of any kind between them trip
  the breaker as well, so an endpoint that accepts and never answers costs about
  ``timeout_breaker / concurrency`` timeouts of wall time, not every request's retries;
* a response size limit applied while the body is read (``max_response_bytes``; by default
  derived from each request's ``max_tokens`` and logprobs), so a huge body never sits in memory
  and is never cached.

URLs: user-info in ``base_url`` (``http://user:KEY@host/v1``) is taken out of the URL and sent
as the Bearer key instead (unless ``api_key`` is given); a query string is sent as query
parameters. ``base_url`` -- what repr, logs, errors and cache files show -- holds neither.

The API key (see ``resolve_api_key``) lives in a masked holder: it is not in ``repr``, not
pickled (an unpickled client resolves it again from the environment), not in cache files, and
scrubbed from every failure reason and error message this module produces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qsl, unquote, urlparse, urlsplit, urlunsplit

import numpy as np

from .cache import AnswerStore

__all__ = ["ChatRequest", "ChatResult", "UsageStats", "LLMClient", "DEFAULT_PRICES",
           "EndpointError", "ResponseTooLargeError", "resolve_api_key", "request_cache_key",
           "parse_retry_after", "public_url", "split_url_credentials", "OPENAI_BASE_URL"]

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "unused"  # local servers (vLLM, Ollama, LocalOpenAIServer) accept any key
CACHE_FORMAT = 1
COLAB_SECRET_NAME = "OPENAI_API_KEY"
EMBED_BATCH = 256
BREAKER_THRESHOLD = 5
# Batch and file ids go into URL paths: letters, digits, '_' and '-' only (never "../models").
_BATCH_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# A hanging endpoint (accepts, never answers): this many timeouts in a row, with no usable answer
# between them, trip the breaker too (``timeout_breaker`` of LLMClient; stated in --help).
TIMEOUT_BREAKER = 6
BATCH_DISCOUNT = 0.5  # OpenAI's Batch API bills half the standard price
BATCH_ENDPOINT = "/v1/chat/completions"
_BATCH_DONE = ("completed", "failed", "expired", "cancelled")
_BODY_LIMIT: "contextvars.ContextVar[int | None]" = contextvars.ContextVar(
    "interp_lib_response_limit", default=None)
_ROLES = ("system", "user", "assistant", "developer", "tool")

# USD per 1M tokens (prompt, completion), OpenAI list prices (standard tier) as of 2025.
# Check the provider's current prices and pass ``prices=`` to override or extend.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
}


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """One chat completion request. ``tag`` labels it for progress only: not sent, not cached."""

    messages: list[dict]
    max_tokens: int = 1024
    temperature: float = 0.0
    json_mode: bool = False
    logprobs: bool = False
    top_logprobs: int | None = None
    tag: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError(f"messages={self.messages!r}: expected a non-empty list of "
                             "{'role': ..., 'content': str} dicts")
        for i, message in enumerate(self.messages):
            if (not isinstance(message, dict) or message.get("role") not in _ROLES
                    or not isinstance(message.get("content"), str)):
                raise ValueError(f"messages[{i}]={message!r}: expected a dict with 'role' in "
                                 f"{_ROLES} and a str 'content'")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: expected a positive int")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature!r}: expected a number in [0, 2]")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError(f"top_logprobs={self.top_logprobs!r} needs logprobs=True")
            if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) \
                    or not 0 <= self.top_logprobs <= 20:
                raise ValueError(f"top_logprobs={self.top_logprobs!r}: expected an int in "
                                 "[0, 20] or None")

    def canonical(self, base_url: str, model: str) -> dict:
        """Everything that determines the answer (the cache key's content)."""
        return {"format": CACHE_FORMAT, "base_url": base_url, "model": model,
                "messages": self.messages, "max_tokens": self.max_tokens,
                "temperature": float(self.temperature), "json_mode": bool(self.json_mode),
                "logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs}


@dataclass
class ChatResult:
    """Outcome of one request. ``failure`` says why when ``ok`` is False."""

    ok: bool
    content: str | None = None
    failure: str | None = None
    finish_reason: str | None = None
    logprobs: list[dict] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    attempts: int = 0


@dataclass
class UsageStats:
    """Running totals of one client (all its batches)."""

    requests_sent: int = 0       # HTTP requests put on the wire, retries included
    cache_hits: int = 0          # requests answered without sending (disk cache, batch duplicate)
    failures: int = 0            # results with ok=False (dry-run placeholders excluded)
    failed_requests: int = 0     # of those, requests that got no answer (not the spending cap)
    retries: int = 0             # attempts after a retryable error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    dry_run_calls: int = 0       # calls a dry run would have sent
    dry_run_cost_usd: float = 0.0  # their estimated cost (upper bound, see estimate_cost)
    dry_run_prompt_tokens: int = 0      # their estimated prompt tokens (chars / 4 + 4 per message)
    dry_run_completion_tokens: int = 0  # their completion tokens, each at its full max_tokens

    def summary(self) -> str:
        text = (f"{self.requests_sent} requests sent ({self.retries} retries), "
                f"{self.cache_hits} cache hits, {self.failures} failures, "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
                f"${self.cost_usd:.4f}")
        if self.dry_run_calls:
            text += (f"; dry run: {self.dry_run_calls} calls, ~{self.dry_run_prompt_tokens} prompt + "
                     f"{self.dry_run_completion_tokens} completion tokens, estimated ${self.dry_run_cost_usd:.4f}")
        return text


# ---------------------------------------------------------------------------------------------
# Endpoint errors and URLs
# ---------------------------------------------------------------------------------------------
class EndpointError(RuntimeError):
    """The endpoint itself is unusable (refused connections, 401 / 403, answers that are not
    JSON or too large): one line naming the URL (without credentials) and the cause."""


class _BatchUnavailable(Exception):
    """A Batch API call that failed for good (``status``: its HTTP status, if any)."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


class ResponseTooLargeError(Exception):
    """A response body went over the client's size limit while it was read."""

    def __init__(self, limit: int, declared: int | None = None):
        self.limit, self.declared = limit, declared
        size = f"{declared} bytes" if declared is not None else "more"
        super().__init__(f"response body too large ({size}; the limit is {limit} bytes)")


def split_url_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without user-info, and the key it carried (the password, else the user name)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    key = parts.password if parts.password else parts.username
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), \
        (unquote(key) if key else None)


def public_url(url: str | None) -> str | None:
    """``url`` without user-info, query string or fragment (any may carry credentials): the
    form that may be printed, logged and saved."""
    if not url:
        return url
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _limited_http_client(timeout: float):
    """An httpx client for ``AsyncOpenAI`` whose response bodies stop at the limit in
    ``_BODY_LIMIT`` (set per request), raising ResponseTooLargeError while reading."""
    import httpx2
    import openai

    class _LimitedStream(httpx2.AsyncByteStream):
        def __init__(self, inner, limit: int):
            self._inner, self._limit = inner, limit

        async def __aiter__(self):
            total = 0
            async for chunk in self._inner:
                total += len(chunk)
                if total > self._limit:
                    raise ResponseTooLargeError(self._limit)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    class _LimitedTransport(httpx2.AsyncBaseTransport):
        def __init__(self):
            self._inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request):
            response = await self._inner.handle_async_request(request)
            limit = _BODY_LIMIT.get()
            if limit is None:
                return response
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                await response.aclose()
                raise ResponseTooLargeError(limit, int(declared))
            return httpx2.Response(status_code=response.status_code, headers=response.headers,
                                   stream=_LimitedStream(response.stream, limit),
                                   extensions=response.extensions)

        async def aclose(self) -> None:
            await self._inner.aclose()

    return openai.DefaultAsyncHttpxClient(transport=_LimitedTransport(), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# API key
# ---------------------------------------------------------------------------------------------
def _is_openai_url(base_url: str | None) -> bool:
    host = urlparse(base_url or OPENAI_BASE_URL).hostname or ""
    return host == "api.openai.com" or host.endswith(".openai.com")


def _colab_secret(name: str) -> str | None:
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except Exception:
        return None
    try:
        value = userdata.get(name)
    except Exception:  # secret missing or notebook access not granted
        return None
    return value or None


def resolve_api_key(api_key: str | None = None, base_url: str | None = None) -> str | None:
    """The key to send: ``api_key`` if given, else ``$INTERP_LIB_API_KEY``; then, only when
    ``base_url`` is OpenAI's (None or an ``*.openai.com`` host), ``$OPENAI_API_KEY`` or the Colab
    secret ``OPENAI_API_KEY``. An OpenAI key is never sent to another host (a local server, a
    third-party proxy): such a ``base_url`` gets an explicit key, ``$INTERP_LIB_API_KEY`` or the
    placeholder ``"unused"`` that local servers accept. None when nothing applies."""
    if api_key is not None:
        if not isinstance(api_key, str) or not api_key:
            raise TypeError("api_key: expected a non-empty str or None (value not shown)")
        return api_key
    if os.environ.get("INTERP_LIB_API_KEY"):
        return os.environ["INTERP_LIB_API_KEY"]
    if not _is_openai_url(base_url):
        return PLACEHOLDER_KEY
    if os.environ.get("OPENAI_API_KEY"):
        return os.environ["OPENAI_API_KEY"]
    return _colab_secret(COLAB_SECRET_NAME) or None


class _Secret:
    """Holds the key; prints masked, never pickles (a copy resolves the key again)."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "<api key: set>" if self._value else "<api key: none>"

    __str__ = __repr__

    def __reduce__(self):
        return (_Secret, (None,))

    def __copy__(self) -> "_Secret":
        return self

    def __deepcopy__(self, memo: dict) -> "_Secret":
        return self


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def request_cache_key(request: ChatRequest, base_url: str, model: str) -> str:
    """SHA-256 of the canonical request (JSON, sorted keys)."""
    blob = json.dumps(request.canonical(base_url, model), sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (float seconds or HTTP date)."""
    if not headers:
        return None
    try:  # header names are case-insensitive; a plain dict may spell them any way
        headers = {str(k).lower(): v for k, v in headers.items()}
    except (AttributeError, TypeError):
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            millis = float(value)
        except (TypeError, ValueError):
            millis = math.nan
        if math.isfinite(millis):
            return max(0.0, millis / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _estimate_prompt_tokens(messages: Sequence[dict]) -> int:
    # ~4 characters per token for English, plus a few tokens of per-message overhead.
    return sum(4 + math.ceil(len(m.get("content") or "") / 4) for m in messages)


def _count(value: Any) -> int:
    """A token count from a usage block; 0 for anything that is not a finite number >= 0."""
    if isinstance(value, bool):
        return 0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if math.isfinite(number) and number >= 0 else 0


def _parse_logprobs(raw: Any) -> list[dict] | None:
    """Chat format (``{"content": [{token, logprob, top_logprobs}]}``) or the legacy completions
    format (``tokens`` / ``token_logprobs`` / ``top_logprobs`` dicts) -> the ChatResult layout."""
    if not isinstance(raw, dict):
        return None
    try:
        if isinstance(raw.get("content"), list):
            return [{"token": str(e["token"]), "logprob": float(e["logprob"]),
                     "top_logprobs": [{"token": str(t["token"]), "logprob": float(t["logprob"])}
                                      for t in (e.get("top_logprobs") or [])]}
                    for e in raw["content"]]
        if isinstance(raw.get("tokens"), list):
            tops = raw.get("top_logprobs") or [None] * len(raw["tokens"])
            return [{"token": str(tok), "logprob": float(lp),
                     "top_logprobs": [{"token": str(k), "logprob": float(v)}
                                      for k, v in (top or {}).items()]}
                    for tok, lp, top in zip(raw["tokens"], raw["token_logprobs"], tops)]
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring logprobs in an unexpected layout")
    return None


_UNSUPPORTED_PHRASES = ("not supported", "unsupported", "does not support", "unknown",
                        "unrecogni", "extra inputs", "extra fields", "not allowed", "not permitted")


def _says_unsupported(message: str) -> bool:
    text = message.lower()
    return any(phrase in text for phrase in _UNSUPPORTED_PHRASES)


class _Outcome:
    """How one attempt ended: a parsed body, a retryable error or a final error."""

    __slots__ = ("data", "retry", "reason", "retry_after", "status", "message", "fatal")

    def __init__(self, data: Any = None, retry: bool = False, reason: str | None = None,
                 retry_after: float | None = None, status: int | None = None, message: str = "",
                 fatal: bool = False):
        self.data, self.retry, self.reason = data, retry, reason
        self.retry_after, self.status, self.message = retry_after, status, message
        self.fatal = fatal  # says the endpoint itself is unusable (counts for the breaker)


def _first_line(text: str, limit: int = 200) -> str:
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(exc, "message", "") or exc)


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------
class LLMClient:
    """Async, cached, budgeted client for one model at one OpenAI-compatible endpoint.

    ``base_url=None`` means ``$OPENAI_BASE_URL`` or OpenAI itself. ``timeout`` bounds each attempt
    (seconds, whole request). Backoff waits are jittered up to ``backoff_max``; a server's
    ``Retry-After`` is honoured up to ``retry_after_max`` seconds. ``seed`` seeds the jitter.
    ``breaker_threshold``: consecutive endpoint failures before nothing more is sent (see the
    module docstring). ``max_response_bytes``: limit on each response body (None: 1 MiB plus
    an allowance per requested token).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, *,
                 concurrency: int = 8, max_retries: int = 5, timeout: float = 60.0,
                 backoff_base: float = 0.5, backoff_max: float = 20.0,
                 retry_after_max: float = 120.0, cache_dir: str | Path | None = None, prices: dict | None = None,
                 max_cost_usd: float | None = None, dry_run: bool = False,
                 progress: bool = True, seed: int = 0, breaker_threshold: int = BREAKER_THRESHOLD,
                 max_response_bytes: int | None = None, batch: bool = False,
                 batch_poll_interval: float = 30.0, batch_timeout: float = 26 * 3600.0,
                 timeout_breaker: int = TIMEOUT_BREAKER):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model={model!r}: expected a non-empty model name")
        if base_url is not None and (not isinstance(base_url, str)
                                     or not base_url.startswith(("http://", "https://"))):
            raise ValueError(f"base_url={public_url(base_url) if isinstance(base_url, str) else base_url!r}: expected an http(s) URL like "
                             "'http://127.0.0.1:8000/v1' or None for OpenAI")

        def _int(name: str, value: Any, low: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r}: expected an int >= {low}")
            return value

        def _float(name: str, value: Any, positive: bool = False) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"{name}={value!r}: expected a finite number "
                                 f"{'> 0' if positive else '>= 0'}")
            return float(value)

        self.model = model
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        try:
            url, url_key = split_url_credentials(url)
            urlsplit(url).port  # a bad port raises ValueError here, not at the first request
        except ValueError as error:
            raise ValueError(f"base_url={public_url(url)!r}: not a valid URL ({error})") from None
        if url_key is not None and api_key is not None:
            warnings.warn("base_url carries credentials and api_key is given: the URL's are "
                          "ignored", UserWarning, stacklevel=2)
        # the query (e.g. api-version) goes out as query parameters; it is never stored
        self._default_query = dict(parse_qsl(urlsplit(url).query)) or None
        self.base_url = public_url(url)
        self._secret = _Secret(resolve_api_key(api_key if api_key is not None else url_key,
                                               self.base_url))
        self.breaker_threshold = _int("breaker_threshold", breaker_threshold, 1)
        self.timeout_breaker = _int("timeout_breaker", timeout_breaker, 1)
        self._consecutive_timeouts = 0
        self.max_response_bytes = (None if max_response_bytes is None
                                   else _int("max_response_bytes", max_response_bytes, 1024))
        self.endpoint_error: str | None = None  # set once the breaker trips; sticky
        self.last_failure: str | None = None  # reason of the latest failed request
        self._consecutive_fatal = 0
        self._last_fatal: str | None = None
        self.concurrency = _int("concurrency", concurrency, 1)
        self.max_retries = _int("max_retries", max_retries, 0)
        self.timeout = _float("timeout", timeout, positive=True)
        self.backoff_base = _float("backoff_base", backoff_base)
        self.backoff_max = _float("backoff_max", backoff_max)
        self.retry_after_max = _float("retry_after_max", retry_after_max)
        self.max_cost_usd = None if max_cost_usd is None else _float("max_cost_usd", max_cost_usd)
        self.batch = bool(batch)
        self.batch_poll_interval = _float("batch_poll_interval", batch_poll_interval, positive=True)
        self.batch_timeout = _float("batch_timeout", batch_timeout, positive=True)
        self.prices = dict(DEFAULT_PRICES)
        for name, pair in (prices or {}).items():
            if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                    or not all(isinstance(p, (int, float)) and p >= 0 for p in pair)):
                raise ValueError(f"prices[{name!r}]={pair!r}: expected (USD per 1M prompt "
                                 "tokens, USD per 1M completion tokens), both >= 0")
            self.prices[name] = (float(pair[0]), float(pair[1]))
        if self.max_cost_usd is not None and self.price() == (0.0, 0.0):
            warnings.warn(f"max_cost_usd={self.max_cost_usd!r} cannot bind: model {self.model!r} "
                          "has no price in the table (it costs $0 here); pass prices={"
                          f"{self.model!r}: (USD per 1M prompt tokens, USD per 1M completion "
                          "tokens)}", UserWarning, stacklevel=2)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache: AnswerStore | None = None
        if self.cache_dir is not None:
            self.cache = AnswerStore(self.cache_dir)
        self.dry_run, self.progress, self.seed = bool(dry_run), bool(progress), seed
        self.usage = UsageStats()
        self.stopped_reason: str | None = None
        self.supports_json_mode = True
        self.supports_logprobs = True
        self._use_max_completion_tokens = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    # -- small pieces ----------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"LLMClient(model={self.model!r}, base_url={self.base_url!r}, "
                f"api_key={self._secret!r}, concurrency={self.concurrency}, "
                f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r}, "
                f"dry_run={self.dry_run}, usage=[{self.usage.summary()}])")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state  # _secret pickles as an empty holder

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _api_key(self) -> str | None:
        key = self._secret.get()
        if key is None:  # e.g. an unpickled client: look again where keys may live
            key = resolve_api_key(None, self.base_url)
            self._secret = _Secret(key)
        return key

    def _scrub(self, text: str) -> str:
        key = self._secret.get()
        if key and len(key) >= 4 and key != PLACEHOLDER_KEY:
            text = text.replace(key, "<api key>")
        return text

    def price(self, model: str | None = None) -> tuple[float, float]:
        """(USD per 1M prompt tokens, per 1M completion tokens); (0, 0) for an unknown model."""
        name = model or self.model
        if name.startswith("ft:"):  # OpenAI fine-tune "ft:<base>:<org>::<id>": the base's price
            name = name[3:].split(":", 1)[0]
        for candidate in (name, name.rsplit("/", 1)[-1]):
            if candidate in self.prices:
                return self.prices[candidate]
            matches = [k for k in self.prices if candidate.startswith(k)]
            if matches:
                return self.prices[max(matches, key=len)]
        return (0.0, 0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int, model: str | None = None) -> float:
        p_in, p_out = self.price(model)
        return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6

    def cache_key(self, request: ChatRequest) -> str:
        return request_cache_key(request, self.base_url, self.model)

    def cached(self, request: ChatRequest) -> ChatResult | None:
        """The cached answer to ``request`` (None without a cache, or when not cached)."""
        if self.cache is None:
            return None
        self.cache.refresh()
        return self._cache_load(self.cache_key(request))

    def _cache_load(self, key: str) -> ChatResult | None:
        if self.cache is None:
            return None
        in_store = ("chat", key) in self.cache
        stored = self.cache.get("chat", key)
        if stored is None:
            return None
        try:
            stored = stored["result"]
            names = {f.name for f in dataclasses.fields(ChatResult)}
            result = ChatResult(**{k: v for k, v in stored.items() if k in names})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # of another shape ({"result": null}, a list): a miss, sent again
            log.warning("ignoring a cache entry of another shape for %s (%s)", key[:12],
                        type(exc).__name__)
            return None
        if result.ok is not True or not isinstance(result.content, str):
            return None
        if len(result.content) > self._body_limit(max_tokens=None):
            return None  # an answer of a size no response may have now: sent again
        if not in_store:  # found in the old one-file-per-request layout: migrate it
            try:
                self.cache.put("chat", key, {"result": stored})
            except OSError as exc:
                log.warning("could not write cache entry %s (%s)", key[:12], exc)
        return dataclasses.replace(result, cached=True, attempts=0)

    def _cache_store(self, key: str, request: ChatRequest, result: ChatResult) -> None:
        if self.cache is None or not result.ok:
            return
        payload = {"request": request.canonical(self.base_url, self.model),
                   "result": dataclasses.asdict(dataclasses.replace(result, cached=False))}
        self.cache.put("chat", key, payload)

    def _check_requests(self, requests: Sequence[ChatRequest]) -> list[ChatRequest]:
        if isinstance(requests, ChatRequest) or not isinstance(requests, Sequence):
            raise TypeError(f"requests: expected a list of ChatRequest, got "
                            f"{type(requests).__name__}")
        for i, request in enumerate(requests):
            if not isinstance(request, ChatRequest):
                raise TypeError(f"requests[{i}]: expected a ChatRequest, got "
                                f"{type(request).__name__}")
        return list(requests)

    def _budget_failure(self) -> str | None:
        """The budget-cap reason when spending has reached the cap (and records the stop)."""
        with self._lock:
            if self.max_cost_usd is None or self.usage.cost_usd < self.max_cost_usd:
                return None
            reason = f"budget cap reached (${self.max_cost_usd:.2f})"
            if self.stopped_reason is None:
                self.stopped_reason = reason
                log.warning("%s after $%.4f: no further requests are sent", reason,
                            self.usage.cost_usd)
            return reason

    def _backoff(self, retry_index: int, retry_after: float | None) -> float:
        with self._lock:
            jitter = self._rng.uniform(0.0, min(self.backoff_max,
                                                self.backoff_base * 2.0 ** retry_index))
        # the server knows how long it is busy: honour its wait beyond backoff_max, within reason
        return max(min(jitter, self.backoff_max), min(retry_after or 0.0, self.retry_after_max))

    def _need_key(self) -> str:
        key = self._api_key()
        if key is None:
            raise ValueError(f"no API key for {self.base_url}: pass api_key=..., set "
                             "$OPENAI_API_KEY (or $INTERP_LIB_API_KEY), or add a Colab secret "
                             "named OPENAI_API_KEY")
        return key

    def _make_openai(self):
        from openai import AsyncOpenAI

        # identity encoding: the size limit counts the bytes that end up in memory
        return AsyncOpenAI(api_key=self._need_key(), base_url=self.base_url, max_retries=0,
                           timeout=self.timeout, default_query=self._default_query,
                           default_headers={"Accept-Encoding": "identity"},
                           http_client=_limited_http_client(self.timeout))

    def _body_limit(self, max_tokens: int | None, logprobs: bool = False,
                    top_logprobs: int | None = None, n_items: int = 0) -> int:
        """Bytes a response may have: ``max_response_bytes``, else 1 MiB plus 64 bytes per
        requested token (x (1 + alternatives) x 2 more with logprobs) plus 64 KiB per embedded
        text; ``max_tokens=None`` (a cached answer): the largest a default request allows."""
        if self.max_response_bytes is not None:
            return self.max_response_bytes
        tokens = 4096 if max_tokens is None else max_tokens
        per_token = 64 * (1 + (2 * (1 + (top_logprobs or 0)) if logprobs else 0))
        return (1 << 20) + tokens * per_token + n_items * (64 << 10)

    def _note_outcome(self, outcome: "_Outcome") -> None:
        """Breaker bookkeeping: count endpoint-level failures in a row; a usable answer (or a
        request-level 4xx, which proves the endpoint works) resets the count."""
        with self._lock:
            if outcome.fatal:
                self._consecutive_fatal += 1
                self._last_fatal = outcome.reason
                # a rejected key never becomes right: 401 / 403 trip the breaker at once
                if (self._consecutive_fatal >= self.breaker_threshold
                        or outcome.status in (401, 403)) and self.endpoint_error is None:
                    self.endpoint_error = self._endpoint_message(outcome.reason,
                                                                 self._consecutive_fatal)
                    log.info("%s", self.endpoint_error)
            elif outcome.reason is None or not outcome.retry:
                self._consecutive_fatal = 0
            if outcome.reason == "timeout":
                self._consecutive_timeouts += 1
                if self._consecutive_timeouts >= self.timeout_breaker and self.endpoint_error is None:
                    self.endpoint_error = (
                        f"endpoint {self.base_url} is unusable: {self._consecutive_timeouts} "
                        f"timeouts in a row (each after {self.timeout:g} s) with no answer, nothing "
                        "more sent; check that the server is up and answering, or raise --timeout")
                    log.info("%s", self.endpoint_error)
            elif not (outcome.reason or "").startswith("connection error"):
                self._consecutive_timeouts = 0  # any answer at all (even a 429 / 500) resets it
    def _endpoint_message(self, reason: str | None, count: int) -> str:
        hint = ("check the API key ($INTERP_LIB_API_KEY, or $OPENAI_API_KEY for OpenAI)"
                if reason and reason.startswith(("http 401", "http 403"))
                else "check --base-url / base_url and that the server is up")
        return (f"endpoint {self.base_url} is unusable: {reason} ({count} failure"
                f"{'s' if count != 1 else ''} in a row, nothing more sent); {hint}")

    def _raise_if_broken(self, n_ok: int) -> None:
        """EndpointError when the breaker tripped, or when nothing in a batch succeeded and the
        last attempts failed at the endpoint level (e.g. every request got a 401)."""
        message = self.endpoint_error
        if message is None and n_ok == 0 and self._consecutive_fatal > 0:
            message = self._endpoint_message(self._last_fatal, self._consecutive_fatal)
        if message is not None:
            raise EndpointError(message)

    async def _attempt(self, call) -> _Outcome:
        """Run one HTTP call (a coroutine factory returning the body text) and classify how it
        ended. The body is parsed here, not by openai's typed models: that halves the CPU per
        request and lets a malformed body be retried like any other transient fault."""
        import openai

        with self._lock:
            self.usage.requests_sent += 1
        try:
            text = await asyncio.wait_for(call(), timeout=self.timeout)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            return _Outcome(retry=True, reason="timeout")
        except openai.APIStatusError as exc:
            status, message = exc.status_code, self._scrub(_error_message(exc))
            if status in (408, 409, 429) or status >= 500:
                return _Outcome(retry=True, reason=f"http {status}", status=status,
                                retry_after=parse_retry_after(exc.response.headers),
                                message=message)
            return _Outcome(reason=f"http {status}: {_first_line(message)}", status=status,
                            message=message, fatal=status in (401, 403))
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            if isinstance(cause, ResponseTooLargeError):
                return _Outcome(reason=str(cause), fatal=True)
            detail = f" ({_first_line(self._scrub(str(cause)))})" if cause is not None and str(cause) else ""
            return _Outcome(retry=True, reason=f"connection error{detail}", fatal=True)
        except ResponseTooLargeError as exc:
            return _Outcome(reason=str(exc), fatal=True)
        except Exception as exc:  # per-request failures must not escape chat_many
            reason = self._scrub(f"{type(exc).__name__}: {exc}")
            log.warning("request failed: %s", reason)
            return _Outcome(reason=reason)
        try:
            data = json.loads(text)
        except ValueError:
            start = text.lstrip()[:15].lower() if isinstance(text, str) else ""
            what = "HTML" if start.startswith(("<!doctype", "<html")) else "not JSON"
            return _Outcome(retry=True, reason=f"malformed response ({what})", fatal=True)
        return _Outcome(data=data)

    # -- chat ------------------------------------------------------------------------------------
    def _chat_params(self, request: ChatRequest, drop: set[str]) -> dict:
        params: dict[str, Any] = {"model": self.model, "messages": request.messages,
                                  "temperature": request.temperature}
        if self._use_max_completion_tokens or "max_tokens" in drop:
            params["max_completion_tokens"] = request.max_tokens
        else:
            params["max_tokens"] = request.max_tokens
        if request.json_mode and self.supports_json_mode and "response_format" not in drop:
            params["response_format"] = {"type": "json_object"}
        if request.logprobs and self.supports_logprobs and "logprobs" not in drop:
            params["logprobs"] = True
            if request.top_logprobs is not None:
                params["top_logprobs"] = request.top_logprobs
        return params

    def _result_from_body(self, data: Any, request: ChatRequest, attempts: int,
                          price_factor: float = 1.0) -> ChatResult | None:
        """A ChatResult from a parsed body, or None when the body is not a chat completion.
        ``price_factor`` scales its cost (``BATCH_DISCOUNT`` for an answer of the Batch API)."""
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
            content = message.get("content")
            finish_reason = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        if content is not None and not isinstance(content, str):
            return None
        if content is not None:  # an endpoint that echoes the Bearer key: never stored or shown
            content = self._scrub(content)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt_tokens = _count(usage.get("prompt_tokens"))
        completion_tokens = _count(usage.get("completion_tokens"))
        if not usage:  # endpoint reports no usage: estimate so the budget still binds
            prompt_tokens = _estimate_prompt_tokens(request.messages)
            completion_tokens = math.ceil(len(content or "") / 4)
        with self._lock:
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens
            self.usage.cost_usd += self.cost(prompt_tokens, completion_tokens) * price_factor
        failure = None
        if finish_reason == "length":
            failure = "truncated (finish_reason=length)"
        elif content is None:
            failure = f"no content (finish_reason={finish_reason})"
        elif not content.strip():
            failure = f"empty content (finish_reason={finish_reason})"
        elif finish_reason == "content_filter":
            failure = "content filter (finish_reason=content_filter)"
        return ChatResult(ok=failure is None, content=content, failure=failure,
                          finish_reason=finish_reason, logprobs=_parse_logprobs(choice.get("logprobs")),
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          attempts=attempts)

    async def _send(self, client, sem: asyncio.Semaphore, request: ChatRequest) -> ChatResult:
        attempts, retries = 0, 0
        drop: set[str] = set()
        fallback: _Outcome | None = None  # the first 400 that made us drop a feature, if any
        dropped_by: dict[str, str] = {}  # feature -> message of the 400 that dropped it
        _BODY_LIMIT.set(self._body_limit(request.max_tokens, request.logprobs,
                                         request.top_logprobs))  # this task's context only
        while True:
            async with sem:
                budget = self._budget_failure()
                if budget is not None:
                    return ChatResult(ok=False, failure=budget, attempts=attempts)
                if self.endpoint_error is not None:
                    return ChatResult(ok=False, failure=self.endpoint_error, attempts=attempts)
                attempts += 1
                params = self._chat_params(request, drop)
                outcome = await self._attempt(
                    lambda: client.post("/chat/completions", cast_to=str, body=params))
            self._note_outcome(outcome)
            if outcome.reason is None:
                result = self._result_from_body(outcome.data, request, attempts)
                if result is None:
                    outcome = _Outcome(retry=True, reason="malformed response (no choices)")
                else:
                    # the retry without a feature worked and the 400 that dropped it said the
                    # endpoint lacks it (not e.g. "messages must contain the word 'json'"):
                    # remember, so later requests go without it at once
                    said = {name for name, message in dropped_by.items()
                            if _says_unsupported(message)}
                    if "response_format" in said and self.supports_json_mode:
                        self.supports_json_mode = False
                        log.warning("%s rejects response_format; sending without it",
                                    self.base_url)
                    if "logprobs" in said and self.supports_logprobs:
                        self.supports_logprobs = False
                        log.warning("%s rejects logprobs; sending without them", self.base_url)
                    if "max_tokens" in drop:
                        self._use_max_completion_tokens = True
                    return result
            if not outcome.retry:
                if outcome.status == 400:
                    # an endpoint may reject several features one 400 at a time: drop them in
                    # turn while each 400 names a feature still sent (after the first 400 only
                    # named ones, so an unrelated 400 ends the loop)
                    new_drop = self._features_to_drop(outcome.message, params,
                                                      named_only=fallback is not None) - drop
                    if new_drop:
                        fallback = fallback or outcome
                        drop = drop | new_drop
                        dropped_by.update({name: outcome.message for name in new_drop})
                        continue
                if fallback is not None:
                    outcome = fallback  # report the original rejection
                return ChatResult(ok=False, failure=outcome.reason, attempts=attempts)
            if retries >= self.max_retries or self.endpoint_error is not None:
                return ChatResult(ok=False, failure=f"{outcome.reason} after {attempts} attempts",
                                  attempts=attempts)
            delay = self._backoff(retries, outcome.retry_after)
            retries += 1
            with self._lock:
                self.usage.retries += 1
            await asyncio.sleep(delay)

    @staticmethod
    def _features_to_drop(message: str, params: dict, named_only: bool = False) -> set[str]:
        """Which optional features a 400 seems to reject (all optional ones when it is unclear,
        unless ``named_only``)."""
        text = message.lower()
        drop = set()
        if "max_completion_tokens" in text and "max_tokens" in params:
            drop.add("max_tokens")
        if "response_format" in params and ("response_format" in text or "json" in text):
            drop.add("response_format")
        if "logprobs" in params and "logprob" in text:
            drop.add("logprobs")
        if not drop and not named_only:
            drop = {name for name in ("response_format", "logprobs") if name in params}
        return drop

    def estimate_cost(self, requests: Sequence[ChatRequest]) -> tuple[int, float]:
        """(calls not answered by the cache, estimated USD). Prompt tokens are estimated as
        chars / 4 + 4 per message (about right for English) and every completion is counted at
        its full ``max_tokens``, so the estimate is on the high side. Identical requests count
        once."""
        requests = self._check_requests(requests)
        if self.cache is not None:
            self.cache.refresh()
        seen: set[str] = set()
        calls, usd = 0, 0.0
        for request in requests:
            key = self.cache_key(request)
            if key in seen or self._cache_load(key) is not None:
                continue
            seen.add(key)
            calls += 1
            usd += self.cost(_estimate_prompt_tokens(request.messages), request.max_tokens)
        return calls, usd * (BATCH_DISCOUNT if self.batch else 1.0)

    # -- Batch API -------------------------------------------------------------------------------
    def _batch_state_path(self, keys: Sequence[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:32]
        return self.cache_dir / "batches" / f"{digest}.json"

    async def _batch_call(self, what: str, call) -> Any:
        """One Batch API call (a coroutine factory returning the JSON body text), retried like a
        chat request on transient failures; raises _BatchUnavailable with the reason otherwise."""
        retries = 0
        while True:
            outcome = await self._attempt(call)
            self._note_outcome(outcome)
            if outcome.reason is None:
                return outcome.data
            if not outcome.retry or retries >= self.max_retries:
                raise _BatchUnavailable(f"{what}: {outcome.reason}", outcome.status)
            await asyncio.sleep(self._backoff(retries, outcome.retry_after))
            retries += 1
            with self._lock:
                self.usage.retries += 1

    async def _run_batch(self, client, items: Sequence[tuple[str, ChatRequest]], bar,
                         weights: Sequence[int]) -> dict[str, ChatResult]:
        """Answer ``items`` ((cache key, request)) through the Batch API; returns the answers it
        got (cached as they arrive). Keys it leaves out are sent directly by the caller."""
        keys = [key for key, _ in items]
        by_key = dict(items)
        weight = dict(zip(keys, weights))
        if self.max_cost_usd is not None:
            _, estimate = self.estimate_cost([request for _, request in items])
            if self.usage.cost_usd + estimate > self.max_cost_usd:
                log.warning("a batch of %d requests could cost up to $%.4f, beyond the cap of $%.2f: "
                            "sending them one by one so the cap binds", len(items), estimate,
                            self.max_cost_usd)
                return {}
        state_path = self._batch_state_path(keys)
        state = None
        if state_path is not None and state_path.exists():
            try:
                state = json.loads(state_path.read_text())
                if not _BATCH_ID_RE.fullmatch(str(state["batch_id"])):
                    raise ValueError("not a batch id")
                log.info("collecting batch %s submitted by an earlier run", state["batch_id"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring the batch-id file %s: not a batch id this client wrote "
                            "(a new batch is submitted)", state_path)
                state = None
        try:
            if state is None:
                lines = "".join(json.dumps({"custom_id": key, "method": "POST", "url": BATCH_ENDPOINT,
                                            "body": self._chat_params(by_key[key], set())}) + "\n"
                                for key in keys)
                uploaded = await self._batch_call("upload of the batch file", lambda: self._upload(client, lines))
                created = await self._batch_call("creation of the batch", lambda: client.post(
                    "/batches", cast_to=str, body={"input_file_id": uploaded["id"], "endpoint": BATCH_ENDPOINT,
                                                      "completion_window": "24h"}))
                for what, value in (("batch", created.get("id")), ("file", uploaded.get("id"))):
                    if not _BATCH_ID_RE.fullmatch(str(value)):
                        raise _BatchUnavailable(f"the endpoint answered a {what} id {str(value)[:40]!r}, "
                                                "not an id", None)
                state = {"batch_id": created["id"], "input_file_id": uploaded["id"], "n": len(keys),
                         "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                if state_path is not None:
                    from ..artifacts import atomic_write_json

                    atomic_write_json(state_path, state)
            batch = await self._poll_batch(client, state["batch_id"], bar)
        except _BatchUnavailable as exc:
            if exc.status in (404, 405):
                log.warning("%s has no Batch API (%s): sending the %d requests directly", self.base_url, exc,
                            len(items))
                return {}
            raise EndpointError(f"Batch API at {self.base_url}: {exc}") from None
        if batch is None:  # still running: a rerun collects it (its id is kept)
            failure = (f"batch {state['batch_id']} still running after {self.batch_timeout:g} s; rerun to "
                       "collect its answers (nothing is sent twice)")
            return {key: ChatResult(ok=False, failure=failure) for key in keys}
        results: dict[str, ChatResult] = {}
        for name in ("output_file_id", "error_file_id"):
            file_id = batch.get(name)
            if not file_id:
                continue
            if not _BATCH_ID_RE.fullmatch(str(file_id)):
                raise EndpointError(f"Batch API at {self.base_url}: batch {state['batch_id']} names "
                                    f"{name}={str(file_id)[:40]!r}, not a file id")
            token = _BODY_LIMIT.set(sum(self._body_limit(by_key[k].max_tokens, by_key[k].logprobs,
                                                         by_key[k].top_logprobs) for k in keys))
            try:
                content = await self._batch_call(f"download of {name}", lambda: self._download(client, file_id))
            finally:
                _BODY_LIMIT.reset(token)
            for line in content["text"].splitlines():
                try:
                    entry = json.loads(line)
                    key, response = entry["custom_id"], entry.get("response") or {}
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                if key not in by_key or not isinstance(response, dict) \
                        or response.get("status_code") != 200:
                    continue
                if key in results:  # one rule for a duplicate id: the first answer counts, once
                    log.warning("batch %s: a second answer for request %s ignored (the first is "
                                "used, its tokens counted once)", state["batch_id"], key[:12])
                    continue
                result = self._result_from_body(response.get("body"), by_key[key], attempts=1,
                                                price_factor=BATCH_DISCOUNT)
                if result is None:
                    continue
                results[key] = result
                if result.ok and self.cache is not None:
                    try:
                        await asyncio.to_thread(self._cache_store, key, by_key[key], result)
                    except OSError as exc:
                        log.warning("could not write cache entry for %s (%s)", key[:12], exc)
                bar.update(weight[key])
        if batch.get("status") != "completed":
            log.warning("batch %s ended %s: %d of %d answers read; the rest are sent directly",
                        state["batch_id"], batch.get("status"), len(results), len(keys))
        elif len(results) < len(keys):
            log.info("batch %s: %d lines without an answer are sent directly", state["batch_id"],
                     len(keys) - len(results))
        if state_path is not None:
            state_path.unlink(missing_ok=True)
        return results

    async def _upload(self, client, lines: str) -> str:
        uploaded = await client.files.create(file=("requests.jsonl", lines.encode(), "application/jsonl"),
                                             purpose="batch")
        return json.dumps(uploaded.model_dump())

    async def _download(self, client, file_id: str) -> str:
        response = await client.files.content(file_id)
        return json.dumps({"text": response.text})

    async def _poll_batch(self, client, batch_id: str, bar) -> dict | None:
        """The finished batch object, or None when ``batch_timeout`` passed first."""
        import time

        start = time.monotonic()
        while True:
            batch = await self._batch_call(f"status of batch {batch_id}", lambda: client.get(
                f"/batches/{batch_id}", cast_to=str))
            if not isinstance(batch, dict) or batch.get("object") != "batch" \
                    or batch.get("id") != batch_id:
                raise _BatchUnavailable(f"status of batch {batch_id}: the answer is not that batch "
                                        "object", None)
            counts = batch.get("request_counts") or {}
            bar.set_postfix_str(f"batch {batch.get('status')}: {counts.get('completed', 0)}/"
                                f"{counts.get('total', '?')}", refresh=True)
            if batch.get("status") in _BATCH_DONE:
                return batch
            if time.monotonic() - start > self.batch_timeout:
                return None
            await asyncio.sleep(self.batch_poll_interval)

    async def achat_many(self, requests: Sequence[ChatRequest], desc: str = "LLM") -> list[ChatResult]:
        """Send the requests (cache first, concurrently, with retries); results in order."""
        requests = self._check_requests(requests)
        keys = [self.cache_key(r) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        if self.cache is not None:  # what other processes stored since (one read of new lines)
            await asyncio.to_thread(self.cache.refresh)
        found = {key: self._cache_load(key) for key in groups}
        to_send = [key for key in groups if found[key] is None]
        n_cached = sum(len(groups[k]) for k in groups if found[k] is not None)
        results: list[ChatResult | None] = [None] * len(requests)

        if self.dry_run:
            prompt = [_estimate_prompt_tokens(requests[groups[k][0]].messages) for k in to_send]
            completion = [requests[groups[k][0]].max_tokens for k in to_send]
            usd = sum(self.cost(p, c) for p, c in zip(prompt, completion))
            usd *= BATCH_DISCOUNT if self.batch else 1.0
            with self._lock:
                self.usage.dry_run_calls += len(to_send)
                self.usage.dry_run_cost_usd += usd
                self.usage.dry_run_prompt_tokens += sum(prompt)
                self.usage.dry_run_completion_tokens += sum(completion)
                self.usage.cache_hits += n_cached
            print(f"dry run: {len(to_send)} calls ({n_cached} cached), estimated ${usd:.4f}")
            for key, indices in groups.items():
                for i in indices:
                    results[i] = found[key] or ChatResult(ok=False, failure="dry run")
            return results  # type: ignore[return-value]

        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not self.progress,
                   leave=False)
        bar.update(n_cached)
        sent: dict[str, ChatResult] = {}
        if to_send:
            client = self._make_openai()
            sem = asyncio.Semaphore(self.concurrency)
            if self.batch:
                try:
                    by_batch = await self._run_batch(client, [(k, requests[groups[k][0]]) for k in to_send], bar,
                                                     [len(groups[k]) for k in to_send])
                except BaseException:
                    bar.close()
                    await client.close()
                    raise
                sent.update(by_batch)
                to_send = [key for key in to_send if key not in sent]

            async def run(key: str) -> None:
                request = requests[groups[key][0]]
                sent[key] = await self._send(client, sem, request)
                if sent[key].ok and self.cache is not None:
                    # a slow disk (Drive) must not block the event loop; a failed write (full
                    # disk, read-only folder) loses only the cache entry, never the result
                    try:
                        await asyncio.to_thread(self._cache_store, key, request, sent[key])
                    except OSError as exc:
                        log.warning("could not write cache entry for %s (%s)", request.tag or key[:12],
                                    exc)
                bar.update(len(groups[key]))
                bar.set_postfix_str(f"${self.usage.cost_usd:.4f}", refresh=False)

            try:
                await asyncio.gather(*(run(key) for key in to_send))
            finally:
                bar.close()
                await client.close()
        else:
            bar.close()

        for key, indices in groups.items():
            first = found[key] or sent[key]
            results[indices[0]] = first
            for i in indices[1:]:  # a duplicate in the batch: answered by the first one
                results[i] = dataclasses.replace(first, cached=True, attempts=0) if first.ok \
                    else first
        with self._lock:
            self.usage.cache_hits += sum(1 for r in results if r.cached)  # type: ignore[union-attr]
            self.usage.failures += sum(1 for r in results if not r.ok)  # type: ignore[union-attr]
            # no usable answer came back -- none at all, null or empty content, or one cut short
            # (finish_reason=length): a rerun may fix these, so the stage is not saved as
            # finished. A content filter's refusal is the endpoint's answer and the spending
            # cap is a decision: neither counts.
            failed = [r for r in results  # type: ignore[union-attr]
                      if not r.ok and r.finish_reason != "content_filter"
                      and not (r.failure or "").startswith("budget cap")]
            self.usage.failed_requests += len(failed)
            if failed:
                self.last_failure = failed[-1].failure
        log.info("%s: %s", desc, self.usage.summary())
        if sent:
            self._raise_if_broken(sum(1 for r in sent.values() if r.ok))
        return results  # type: ignore[return-value]

    def chat_many(self, requests: Sequence[ChatRequest], desc: str = "LLM") -> list[ChatResult]:
        """Synchronous ``achat_many``; inside a running event loop (Jupyter) it runs in a thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.achat_many(requests, desc))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.achat_many(requests, desc)).result()

    def chat(self, request: ChatRequest) -> ChatResult:
        return self.chat_many([request], desc=request.tag or "LLM")[0]

    # -- embeddings ------------------------------------------------------------------------------
    def _embed_key(self, text: str, model: str) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, "base_url": self.base_url, "model": model,
                           "input": text}, sort_keys=True, ensure_ascii=False)  # public URL
        return hashlib.sha256(blob.encode()).hexdigest()

    def embed(self, texts: list[str], model: str = "text-embedding-3-small") -> np.ndarray:
        """Embeddings from ``/v1/embeddings`` as float32 ``[len(texts), dim]`` (cached per text).
        Raises RuntimeError with the reason when the endpoint fails after retries."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) \
                or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts: expected a list of str, got {type(texts).__name__}")
        texts = list(texts)
        vectors: dict[str, list[float]] = {}
        keys = [self._embed_key(t, model) for t in texts]
        if self.cache is not None:
            self.cache.refresh()
        for key in set(keys):
            stored = None if self.cache is None else self.cache.get("embed", key)
            if stored is not None:
                try:
                    vectors[key] = [float(x) for x in stored["embedding"]]
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("ignoring a cache entry of another shape for embedding %s", key[:12])
        missing = list(dict.fromkeys(k for k in keys if k not in vectors))
        if missing:
            if self.dry_run:
                raise RuntimeError(f"dry run: {len(missing)} texts to embed are not cached and "
                                   "nothing is sent")
            by_key = dict(zip(keys, texts))
            coro = self._aembed([by_key[k] for k in missing], missing, model)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                fresh = asyncio.run(coro)
            else:
                with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                    fresh = pool.submit(asyncio.run, coro).result()
            vectors.update(fresh)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray([vectors[k] for k in keys], dtype=np.float32)

    async def _aembed(self, texts: list[str], keys: list[str], model: str) -> dict[str, list[float]]:
        client = self._make_openai()
        sem = asyncio.Semaphore(self.concurrency)
        out: dict[str, list[float]] = {}

        async def batch(start: int) -> None:
            chunk = texts[start:start + EMBED_BATCH]
            _BODY_LIMIT.set(self._body_limit(0, n_items=len(chunk)))
            attempts = 0
            while True:
                async with sem:
                    budget = self._budget_failure()
                    if budget is not None:
                        raise RuntimeError(f"embeddings stopped: {budget}")
                    if self.endpoint_error is not None:
                        raise EndpointError(self.endpoint_error)
                    attempts += 1
                    outcome = await self._attempt(lambda: client.post(
                        "/embeddings", cast_to=str,
                        body={"model": model, "input": chunk, "encoding_format": "float"}))
                self._note_outcome(outcome)
                vecs = None
                if outcome.reason is None:
                    try:
                        rows = sorted(outcome.data["data"], key=lambda d: d["index"])
                        vecs = [[float(x) for x in row["embedding"]] for row in rows]
                        if len(vecs) != len(chunk):
                            raise ValueError("wrong number of embeddings")
                    except (KeyError, TypeError, ValueError):
                        outcome = _Outcome(retry=True, reason="malformed response (no embeddings)")
                if vecs is not None:
                    usage = outcome.data.get("usage") if isinstance(outcome.data, dict) else None
                    n_tokens = _count(usage.get("prompt_tokens")) if isinstance(usage, dict) else 0
                    with self._lock:
                        self.usage.prompt_tokens += n_tokens
                        self.usage.cost_usd += self.cost(n_tokens, 0, model)
                    for key, vec in zip(keys[start:start + EMBED_BATCH], vecs):
                        out[key] = vec
                        if self.cache is not None:
                            try:
                                self.cache.put("embed", key, {"model": model, "embedding": vec})
                            except OSError as exc:  # a cache is an optimisation: keep the vector
                                log.warning("could not write cache entry %s (%s)", key[:12], exc)
                    return
                if outcome.fatal and self.endpoint_error is not None:
                    raise EndpointError(self.endpoint_error)
                if not outcome.retry or attempts > self.max_retries:
                    suffix = "" if not outcome.retry else f" after {attempts} attempts"
                    if outcome.fatal:
                        raise EndpointError(self._endpoint_message(outcome.reason, attempts))
                    raise RuntimeError(f"embeddings from {self.base_url} (model {model!r}) "
                                       f"failed: {outcome.reason}{suffix}")
                with self._lock:
                    self.usage.retries += 1
                await asyncio.sleep(self._backoff(attempts - 1, outcome.retry_after))

        try:
            await asyncio.gather(*(batch(s) for s in range(0, len(texts), EMBED_BATCH)))
        finally:
            await client.close()
        return out
