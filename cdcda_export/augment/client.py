"""Async client for OpenAI-compatible ``/v1/chat/completions`` endpoints (httpx + tenacity).

* bounded concurrency (one semaphore per client),
* retries with exponential backoff and jitter on timeouts, transport errors, 429 and 5xx;
  a ``Retry-After`` header (seconds or HTTP date) on 429/503 is honoured (capped),
* ``timeout`` bounds each HTTP attempt in total (connect + send + every read), not only each read:
  a teacher that trickles its answer a byte at a time fails with a "timeout" like one that hangs,
* JSON mode (``response_format={"type": "json_object"}``) when ``json_mode="auto"``; a 400 that
  names ``response_format`` switches it off for the rest of the run and resends once,
* the API key only lives in the ``Authorization`` header of the httpx client: it is never part of
  stats, reports, cache entries or log lines.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from dataclasses import dataclass, field

import httpx
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt,
                      wait_exponential_jitter)

from ..errors import UserError

log = logging.getLogger("cdcda.augment.client")

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}


class RetryableHTTPError(Exception):
    def __init__(self, status: int, retry_after: float | None, detail: str):
        super().__init__(f"HTTP {status}: {detail[:200]}")
        self.status, self.retry_after = status, retry_after


class RequestDeadlineExceeded(httpx.TimeoutException):
    """One HTTP attempt ran past the client's timeout in total (httpx's own timeouts are per read, so a
    server that trickles a byte at a time would never trip them)."""


class TeacherRequestFailed(Exception):
    """A request that failed for good (after retries, or a non-retryable 4xx)."""


@dataclass
class ClientStats:
    requests: int = 0          # chat requests (each may take several HTTP attempts)
    http_attempts: int = 0
    retries: int = 0
    retry_reasons: dict = field(default_factory=dict)
    failures: int = 0
    json_mode_fallbacks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ChatReply:
    content: str
    usage: dict
    model: str
    finish_reason: str | None
    json_mode: bool


def parse_retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        secs = when.timestamp() - time.time()
    return max(0.0, min(secs, cap))


class _WaitRetryAfter:
    """tenacity wait: the server's Retry-After when it sent one, else exponential backoff + jitter."""

    def __init__(self, initial: float, max_wait: float):
        self.fallback = wait_exponential_jitter(multiplier=initial, max=max_wait, jitter=initial)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableHTTPError) and exc.retry_after is not None:
            return exc.retry_after
        return self.fallback(state)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, (RetryableHTTPError, httpx.TimeoutException, httpx.TransportError))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RetryableHTTPError):
        return str(exc.status)
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return type(exc).__name__


class OpenAIChatClient:
    """One connection pool, one concurrency bound, shared retry policy and stats."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 concurrency: int = 4, max_retries: int = 5, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, retry_after_cap: float = 60.0, json_mode: str = "auto",
                 stats: ClientStats | None = None, transport: httpx.AsyncBaseTransport | None = None):
        if json_mode not in ("auto", "on", "schema", "off"):
            raise UserError(f"json_mode {json_mode!r}", field="json_mode", expected="auto, on, schema or off")
        self.model = model
        self.timeout = float(timeout)
        self.base_url = base_url.rstrip("/")
        self.stats = stats or ClientStats()
        self.max_retries = max_retries
        self.retry_after_cap = retry_after_cap
        self._wait = _WaitRetryAfter(backoff_initial, backoff_max)
        self._json_mode = json_mode != "off"
        self._json_forced = json_mode in ("on", "schema")
        self._schema_ok = json_mode in ("auto", "schema")   # send the reply's JSON schema when chat() has one
        self._sem = asyncio.Semaphore(max(1, concurrency))
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency)))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "OpenAIChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    @property
    def json_mode(self) -> bool:
        return self._json_mode

    async def list_models(self) -> list[str]:
        r = await self._http.get("/models")
        r.raise_for_status()
        return [m.get("id") for m in r.json().get("data", [])]

    async def _post_once(self, body: dict) -> dict:
        self.stats.http_attempts += 1
        try:   # httpx's timeout is per read; this is the whole attempt's deadline (a trickling server)
            r = await asyncio.wait_for(self._http.post("/chat/completions", json=body), self.timeout)
        except asyncio.TimeoutError:
            raise RequestDeadlineExceeded(f"no complete answer within {self.timeout:g} s in total") from None
        if r.status_code in RETRY_STATUS:
            raise RetryableHTTPError(r.status_code, parse_retry_after(r.headers.get("retry-after"),
                                                                      self.retry_after_cap), r.text)
        if r.status_code in (401, 403):
            raise UserError(f"the teacher at {self.base_url} refused the API key (HTTP {r.status_code})",
                            field="api key", expected="a valid key in OPENAI_API_KEY or the variable named by "
                            "--api-key-env", hint="export OPENAI_API_KEY=... and re-run the same command")
        if r.status_code == 404:
            raise UserError(f"{self.base_url}/chat/completions answered 404 (model {self.model!r})",
                            field="--base-url/--model", expected="an OpenAI-compatible base URL ending in /v1 and "
                            "a model the server lists at /v1/models", hint=f"curl {self.base_url}/models")
        if r.status_code == 400 and "response_format" in body and self._json_mode and not self._json_forced \
                and ("response_format" in r.text or "json" in r.text.lower()):
            raise _JsonModeUnsupported(r.text)
        if r.status_code >= 400:
            raise TeacherRequestFailed(f"HTTP {r.status_code}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError as e:  # a proxy answered with HTML etc.: transient from our point of view
            raise RetryableHTTPError(r.status_code, None, f"non-JSON body: {e}") from None

    async def chat(self, messages: list[dict], *, temperature: float = 0.8, max_tokens: int = 1024,
                   top_p: float | None = None, seed: int | None = None, schema: dict | None = None) -> ChatReply:
        """One chat completion, with retries. Raises :class:`TeacherRequestFailed` when it gives up.

        ``schema``: the JSON schema the reply must follow, sent as ``response_format: json_schema`` (OpenAI's
        structured outputs; llama.cpp's server and ``cdcda serve-teacher`` turn it into a grammar). A server that
        refuses it (a 400 naming response_format or JSON) gets ``json_object`` for the rest of the run, and one
        that refuses that too gets no JSON mode; each step counts in ``json_mode_fallbacks``."""
        async with self._sem:
            self.stats.requests += 1
            while True:
                body = {"model": self.model, "messages": messages, "temperature": temperature,
                        "max_tokens": max_tokens}
                if top_p is not None:
                    body["top_p"] = top_p
                if seed is not None:
                    body["seed"] = seed
                if self._json_mode:
                    if schema is not None and self._schema_ok:
                        body["response_format"] = {"type": "json_schema",
                                                   "json_schema": {"name": "examples", "schema": schema}}
                    else:
                        body["response_format"] = {"type": "json_object"}
                try:
                    data = await self._with_retries(body)
                except _JsonModeUnsupported:
                    if body["response_format"]["type"] == "json_schema":
                        log.warning("server rejected response_format=json_schema; continuing with json_object")
                        self._schema_ok = False
                    else:
                        log.warning("server rejected response_format=json_object; continuing without JSON mode")
                        self._json_mode = False
                    self.stats.json_mode_fallbacks += 1
                    continue
                return self._reply(data, body)

    async def _with_retries(self, body: dict) -> dict:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception()
            reason = _reason(exc)
            self.stats.retries += 1
            self.stats.retry_reasons[reason] = self.stats.retry_reasons.get(reason, 0) + 1
            log.info("retrying teacher request (%s), attempt %d, sleeping %.2fs", reason,
                     state.attempt_number, state.next_action.sleep if state.next_action else 0.0)

        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception(_is_retryable), wait=self._wait,
                                               stop=stop_after_attempt(self.max_retries + 1),
                                               before_sleep=before_sleep, reraise=True):
                with attempt:
                    return await self._post_once(body)
        except (RetryableHTTPError, httpx.TimeoutException, httpx.TransportError) as e:
            self.stats.failures += 1
            raise TeacherRequestFailed(f"gave up after {self.max_retries + 1} attempts: {_reason(e)}: {e}") from None
        except TeacherRequestFailed:
            self.stats.failures += 1
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _reply(self, data: dict, body: dict) -> ChatReply:
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            content, choice = "", {}
        usage = data.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        tt = int(usage.get("total_tokens") or pt + ct)
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        self.stats.total_tokens += tt
        return ChatReply(content=content, usage={"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": tt},
                         model=str(data.get("model") or self.model), finish_reason=choice.get("finish_reason"),
                         json_mode="response_format" in body)


class _JsonModeUnsupported(Exception):
    pass
