"""One OpenAI-compatible server as a remote batch uses it: requests, retries, and when to give up on it.

An answer is one of three things: the text (`RemoteAnswer`), a refusal of that image (`ImageRefused`,
recorded like a local ImageError), or the endpoint giving up (`EndpointDropped`: the image goes back to
the others). What is retried, and how:

- 429, 503 (busy: the server is alive and said so) and 408, 500, 502, 504, connection errors and
  timeouts are retried after an exponential backoff with jitter, or after the server's Retry-After.
- An endpoint is dropped after DROP_AFTER failures in a row that are not busy answers (a killed server
  refuses connections at once: dropped within seconds), after MAX_ATTEMPTS tries of one image, or at
  the first answer that no retry can change (401 wrong key, 404 unknown model, 400 a context too
  small): that answer's message is the reason given.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from pixtral_cpp.errors import OptionsError
from pixtral_cpp.options import GenerationOptions

logger = logging.getLogger(__name__)

DROP_AFTER = 3  # failures in a row (busy answers excepted) before an endpoint is dropped
MAX_ATTEMPTS = 8  # tries of one image on one endpoint, busy answers included
BACKOFF_BASE = 0.5  # seconds before the first retry; doubled each time, up to BACKOFF_CAP
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0  # a server asking for longer is waited on this long, then asked again
CONNECT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 600.0  # one answer: 512 tokens of the 12B model on a few CPU cores take minutes
# Requests in flight per endpoint when not given: a pixtral-cpp server answers one at a time (more only
# queue there); vLLM and other engines batch what arrives together.
CONCURRENCY_BY_OWNER = {"pixtral-cpp": 1}
DEFAULT_CONCURRENCY = 8
BUSY = frozenset({429, 503})
RETRIED = BUSY | {408, 500, 502, 504}


@dataclass(frozen=True)
class RemoteAnswer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # of the request that answered, retries not counted
    attempts: int
    model: str | None  # as the server named it


class ImageRefused(Exception):  # noqa: N818 - an outcome, recorded as the image's error
    """The server refused this image (400 invalid_image): recorded, the batch goes on."""


class EndpointDropped(Exception):  # noqa: N818 - an outcome: the image goes back to the other endpoints
    """This endpoint is given up on; the message says why."""


class Endpoint:
    """A base URL (`http://host:port/v1`; a bare `http://host:port` gets `/v1`), its client and its health."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 model: str | None = None) -> None:
        self.url = base_url(url)
        self.api_key, self.timeout = api_key, timeout
        self.model = model  # the model id sent; found by probe() when not given
        self.concurrency = 1
        self.dropped: str | None = None  # the reason, once dropped; read by every worker of this endpoint
        self._failures = 0  # in a row, busy answers not counted; shared by the workers, under _lock
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    def open(self, concurrency: int) -> None:
        self.concurrency = concurrency
        # UTF-8 bytes: a non-ASCII key reaches `serve` as it compares it (httpx would send str as ASCII)
        headers = {"Authorization": b"Bearer " + self.api_key.strip().encode()} if self.api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT),
                                    limits=httpx.Limits(max_connections=concurrency + 1))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def probe(self, stop: threading.Event) -> str | None:
        """GET /models: who serves it ("pixtral-cpp", "vllm"; None when the server has no such route),
        taking the first model id as the one to ask when none was given. Drops the endpoint when it
        cannot be reached or refuses the key."""
        response = self._send("GET", "/models", None, stop)[0]
        if response.status_code == 404:  # not every OpenAI-compatible server lists its models
            return None
        self._refuse_unless_ok(response)
        try:
            first = response.json()["data"][0]
            served, owner = str(first["id"]), str(first.get("owned_by", ""))
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._drop("its /models answer is not an OpenAI model list") from None
        if self.model is None:
            self.model = served
        return owner

    def describe(self, png: bytes, prompt: str, generation: GenerationOptions, stop: threading.Event
                 ) -> RemoteAnswer:
        """One image and the prompt in one user message, as the local batch asks (image first)."""
        body = chat_request(png, prompt, generation, self.model)
        response, attempts, seconds = self._send("POST", "/chat/completions", body, stop)
        if response.status_code == 400 and _error_field(response, "code") == "invalid_image":
            raise ImageRefused(_error_message(response))
        self._refuse_unless_ok(response)
        try:
            data = response.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return RemoteAnswer(str(choice["message"]["content"] or ""), choice.get("finish_reason"),
                                int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                                seconds, attempts, data.get("model"))
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._drop("its answer is not an OpenAI chat completion") from None

    # -- sending, with retries ------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict[str, Any] | None, stop: threading.Event
              ) -> tuple[httpx.Response, int, float]:
        """The first answer that is not retried, the tries it took and the seconds of the last one;
        retries as the module docstring says."""
        assert self._client is not None, "open() first"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if self.dropped is not None:
                raise EndpointDropped(self.dropped)
            if stop.is_set():
                raise EndpointDropped("the batch is stopping")
            started = time.monotonic()
            try:
                response = self._client.request(method, self.url + path, json=body)
            except httpx.TransportError as error:
                reason, wait = _transport_reason(error), None
            else:
                if response.status_code not in RETRIED:
                    self._note_success()
                    return response, attempt, time.monotonic() - started
                reason = f"{response.status_code} {_error_message(response)}".strip()
                wait = retry_after(response.headers.get("retry-after"))
                if response.status_code in BUSY:
                    delay = wait if wait is not None else backoff(attempt)
                    self._pause(delay, attempt, reason, stop)
                    continue
            self._note_failure(reason)
            if self.dropped is not None:
                raise EndpointDropped(self.dropped)
            self._pause(wait if wait is not None else backoff(attempt), attempt, reason, stop)
        raise self._drop(f"{MAX_ATTEMPTS} tries of one image failed, the last: {reason}")

    def _pause(self, delay: float, attempt: int, reason: str, stop: threading.Event) -> None:
        if attempt < MAX_ATTEMPTS:
            logger.info("%s: %s; retrying in %.1f s", self.url, reason, delay)
            stop.wait(delay)

    def _refuse_unless_ok(self, response: httpx.Response) -> None:
        if response.status_code != 200:  # no retry changes it: a wrong key, an unknown model, a setting
            raise self._drop(f"it answered {response.status_code}: {_error_message(response)}")

    def _note_success(self) -> None:
        with self._lock:
            self._failures = 0

    def _note_failure(self, reason: str) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= DROP_AFTER and self.dropped is None:
                self.dropped = f"{self._failures} failures in a row, the last: {reason}"

    def _drop(self, reason: str) -> EndpointDropped:
        with self._lock:
            if self.dropped is None:
                self.dropped = reason
            return EndpointDropped(self.dropped)


def base_url(url: str) -> str:
    """The OpenAI base URL: `/v1` added to a URL without a path, no trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise OptionsError(f"--server {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8080/v1")
    url = url.rstrip("/")
    return url if parts.path.strip("/") else url + "/v1"


def chat_request(png: bytes, prompt: str, generation: GenerationOptions, model: str | None) -> dict[str, Any]:
    """The chat-completions body for one image (a PNG data URL) and its prompt."""
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
               {"type": "text", "text": prompt}]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}],
                            "max_tokens": generation.max_tokens, "temperature": generation.temperature,
                            "top_p": generation.top_p}
    if model is not None:
        body["model"] = model
    if generation.seed is not None:
        body["seed"] = generation.seed
    if generation.stop:
        body["stop"] = list(generation.stop)
    return body


def backoff(attempt: int) -> float:
    """Exponential, with jitter so that the workers a failure hit together do not return together."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (a number or an HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP) + random.uniform(0.0, 0.1)


def default_concurrency(owner: str | None) -> int:
    return CONCURRENCY_BY_OWNER.get(owner or "", DEFAULT_CONCURRENCY)


def _transport_reason(error: httpx.TransportError) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"no answer in time ({type(error).__name__})"
    return f"connection failed ({str(error) or type(error).__name__})"


def _error_field(response: httpx.Response, name: str) -> Any:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return error.get(name) if isinstance(error, dict) else None


def _error_message(response: httpx.Response) -> str:
    """The server's own words (OpenAI's error.message, or the start of the body)."""
    message = _error_field(response, "message")
    if isinstance(message, str):
        return message[:300]
    return response.text[:200].strip()
