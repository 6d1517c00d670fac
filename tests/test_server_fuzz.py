"""Malformed chat-completions bodies, seeded and bounded in time: the request parser may only refuse
them with RequestError or a PixtralError, and the app (real tiny model) may never answer 500 or log a
traceback."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from pixtral_cpp import ModelOptions, PixtralModel
from pixtral_cpp.errors import PixtralError
from pixtral_cpp.server import ServerConfig, create_app
from pixtral_cpp.server.protocol import RequestError, parse_chat_request

SEED = 20240911
PARSER_SECONDS = 3.0
APP_SECONDS = 5.0
# Short answers and small images keep every accepted request to milliseconds on the tiny model.
CONFIG = ServerConfig(max_tokens_limit=3, default_max_tokens=2, max_body_bytes=2_000_000)
MAX_IMAGE_SIZE = 32  # the model's budget (its ModelOptions), which the app reads


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(out, format="PNG")
    return out.getvalue()


PNG_URL = "data:image/png;base64," + base64.b64encode(_png(20, 12)).decode()


def valid_request() -> dict[str, Any]:
    return {"model": CONFIG.model_id, "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 3, "n": 1,
            "stop": ["END"], "stream": False, "stream_options": {"include_usage": True},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}}}},
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                      {"type": "image_url", "image_url": {"url": PNG_URL}}]}]}


ODD_STRINGS = ["", "\ud800", "a\udfffb", "\x00", "é" * 3, "🎉", "data:", "data:image/png;base64,",
               "data:image/png;base64,!!!!", "data:image/png,abc", "data:;base64," + "A" * 7,
               "data:image/png;base64," + base64.b64encode(b"not an image").decode(), "file:///etc/passwd",
               "/etc/passwd", "http://127.0.0.1/x.png", "~/x.png", "file://host/x", "javascript:alert(1)",
               "user", "assistant", "system", "tool", "text", "image_url", "json_schema", "json_object", "x" * 300]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value (NaN and Infinity included), biased toward the awkward ones."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2, 3, 2**31, 2**32 - 1, 2**32, 2**63, -(2**63), 10**30, 10**400])
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.5, 1e-300, 1e300, float("nan"), float("inf"), float("-inf")])
    if kind in (4, 5, 6):
        return rng.choice(ODD_STRINGS)
    if kind == 7:
        return rng.choice([[], {}, [[[]]], {"": None}])
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["type", "text", "url", "image_url", "role", "content", "schema", "json_schema", "x"]):
            random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


def mutate(rng: random.Random, request: dict[str, Any]) -> dict[str, Any]:
    """Replace, delete or wrap one to three values anywhere in the request."""
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in _paths(request) if p])
        parent = request
        for key in path[:-1]:
            parent = parent[key]
        action = rng.randrange(4)
        if action == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == 1:
            parent[path[-1]] = [parent[path[-1]]] if rng.random() < 0.5 else {"value": parent[path[-1]]}
        else:
            parent[path[-1]] = random_value(rng)
    return request


def corrupt(rng: random.Random, body: bytes) -> bytes:
    """Byte-level damage: truncation, invalid UTF-8, deep nesting, a stray byte, or a non-object."""
    kind = rng.randrange(7)
    if kind == 0:
        return body[:rng.randrange(len(body))]
    if kind == 1:
        at = rng.randrange(len(body))
        return body[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\\"]) + body[at:]
    if kind == 2:
        depth = rng.choice([100, 5_000, 100_000])
        return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 3:
        return rng.choice([b"", b"null", b"[]", b'"text"', b"1e999", b"NaN", b"-Infinity", b"{" * 50, b"1" * 5000])
    if kind == 4:
        return body.replace(b'"messages"', b'"messages": 1, "messages"', 1)  # a duplicated key
    if kind == 5:
        return body.decode().encode("utf-16")
    return body


def fuzz_bodies(rng: random.Random) -> Iterator[bytes]:
    while True:
        request = mutate(rng, valid_request()) if rng.random() < 0.8 else valid_request()
        body = json.dumps(request, allow_nan=True).encode("utf-8", "surrogatepass")
        yield corrupt(rng, body) if rng.random() < 0.3 else body


def _for_a_while(seconds: float, rng: random.Random, check: Callable[[bytes], None]) -> int:
    deadline = time.monotonic() + seconds
    count = 0
    for body in fuzz_bodies(rng):
        if time.monotonic() > deadline:
            return count
        check(body)
        count += 1
    raise AssertionError("unreachable")


def test_the_parser_only_refuses_with_its_own_errors():
    def check(body: bytes) -> None:
        try:
            parse_chat_request(body, CONFIG, max_image_size=MAX_IMAGE_SIZE)
        except (RequestError, PixtralError):
            pass
        except BaseException as error:  # noqa: BLE001 - anything else is the bug this test is for
            raise AssertionError(f"{type(error).__name__}: {error} for body {body[:300]!r}") from error

    assert _for_a_while(PARSER_SECONDS, random.Random(SEED), check) > 200


@pytest.fixture(scope="module")
def client(pair) -> Iterator[TestClient]:
    options = ModelOptions(n_ctx=1024, threads=2, max_image_size=MAX_IMAGE_SIZE)
    with PixtralModel.load(pair[0], options=options) as model, \
            TestClient(create_app(model, CONFIG), base_url="http://127.0.0.1:8080") as test_client:
        yield test_client


def test_the_app_never_answers_500(client, caplog):
    statuses: dict[int, int] = {}

    def check(body: bytes) -> None:
        response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code != 500, f"{response.text[:300]} for body {body[:300]!r}"
        assert response.status_code == 200 or "error" in response.json()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    with caplog.at_level(logging.WARNING):
        count = _for_a_while(APP_SECONDS, random.Random(SEED + 1), check)
    assert count > 50 and statuses.get(200) and statuses.get(400), statuses
    tracebacks = [record.getMessage() for record in caplog.records if record.exc_info]
    assert not tracebacks, tracebacks
