"""The HTTP server as clients see it: a real server process on 127.0.0.1, driven by the official
`openai` client (and raw httpx where the wire format or a disconnect is the point)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from PIL import Image

from pixtral_cpp.errors import ImageError
from pixtral_cpp.images import MAX_IMAGE_SIZE
from pixtral_cpp.server import ServerConfig, UnsafeBindError, check_bind_address
from pixtral_cpp.server.protocol import RequestError, parse_chat_request
from tests.served import serving

KEY = "test-key-123"
MODEL_ID = "pixtral-12b"
MAX_IMAGE_PIXELS = 10_000
MAX_IMAGES = 2


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("allowed-images")
    (folder / "noise.png").write_bytes(_png(24, 16, seed=5))
    return folder


@pytest.fixture(scope="module")
def server(converted, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    text, mmproj = converted("F16", "F16")
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with serving(text, mmproj, log, "--ctx", "2048", "--max-image-size", "64",
                 "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-images", str(MAX_IMAGES),
                 "--max-body-mb", "1", "--allow-image-folder", str(image_folder), key=KEY) as base:
        yield base


def _health(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _image_message(url: str, text: str = "What is this?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _ask(client: Any, prompt: str, **fields: Any) -> Any:
    fields = {"max_tokens": 6, "temperature": 0, **fields}
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                          **fields)


def _answer(client: Any, prompt: str, **fields: Any) -> str:
    return _ask(client, prompt, **fields).choices[0].message.content


def _assert_refused(error: Any, status: int, *words: str) -> None:
    """An OpenAI-style error body with the status and a message that names the problem."""
    assert error.status_code == status
    body = error.response.json()["error"]
    assert set(body) >= {"message", "type", "code"}
    for word in words:
        assert word in body["message"], body["message"]


# ---------------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_plain_completion_is_shaped_like_openais(client):
    result = _ask(client, "Hello there")
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.model == MODEL_ID and len(result.choices) == 1
    choice = result.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < result.usage.completion_tokens <= 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streaming_sends_the_same_answer_in_chunks(client, server):
    expected = _answer(client, "Stream this")
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Stream this"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    # on the wire: `data: {...}` events ending with `data: [DONE]`
    body = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"messages": [{"role": "user", "content": "Stream this"}], "max_tokens": 6,
                            "temperature": 0, "stream": True})
    assert body.headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.text.splitlines() if line]
    assert events[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in events)


def test_image_as_data_url(client):
    messages = _image_message(_data_url(_png(32, 24)))
    with_image = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4, temperature=0)
    without = _ask(client, "What is this?", max_tokens=4)
    # a 32x24 image is 2x2 patches: rows * (cols + 1) prompt positions more than the text alone
    assert with_image.usage.prompt_tokens == without.usage.prompt_tokens + 2 * 3


def test_json_schema_output_parses_and_validates(client):
    schema = {"type": "object", "properties": {"caption": {"type": "string", "maxLength": 12}},
              "required": ["caption"]}
    result = _ask(client, "Describe as JSON.", max_tokens=60, temperature=0.8, seed=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    jsonschema.validate(json.loads(result.choices[0].message.content), schema)


def test_wrong_or_missing_key_is_refused(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    _assert_refused(caught.value, 401, "API key")
    assert httpx.get(f"{server}/v1/models").status_code == 401  # every request but /health (probes send no key)


def test_oversized_image_is_refused_with_its_size(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=_image_message(_data_url(_png(120, 100))),
                                       max_tokens=2)
    _assert_refused(caught.value, 400, "120x100", f"{MAX_IMAGE_PIXELS:,}")


def test_too_many_images_are_refused(client):
    parts = [{"type": "image_url", "image_url": {"url": _data_url(_png(16, 16, seed))}} for seed in range(3)]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": parts}],
                                       max_tokens=2)
    _assert_refused(caught.value, 400, "3 images", f"at most {MAX_IMAGES}")


def test_body_over_the_limit_is_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        _ask(client, "x" * 1_100_000)
    _assert_refused(caught.value, 413, "1,000,000 bytes")


def test_bad_fields_and_long_prompts_are_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, "hi", temperature=5)
    _assert_refused(caught.value, 400, "temperature")
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, "hi", max_tokens=100_000)
    _assert_refused(caught.value, 400, "max_tokens", "4096")
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, "word " * 3000)
    _assert_refused(caught.value, 400, "context")


def test_local_images_only_inside_the_allowed_folder(client, image_folder, tmp_path):
    messages = _image_message(str(image_folder / "noise.png"))
    inside = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2)
    assert inside.usage.prompt_tokens > 6
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(16, 16))
    escape = image_folder / ".." / outside.parent.name / outside.name  # no `..` way out either
    for url in (str(outside), outside.as_uri(), str(escape)):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL_ID, messages=_image_message(url), max_tokens=2)
        _assert_refused(caught.value, 400, "outside the folder")


def test_concurrent_requests_get_their_own_answers(client):
    prompts = ["Alpha question", "Beta", "Gamma gamma gamma"]
    sequential = {prompt: _answer(client, prompt) for prompt in prompts}
    assert len(set(sequential.values())) > 1, "the prompts should lead to different answers"
    for batch in (prompts, [prompts[0]] * 3):
        with ThreadPoolExecutor(len(batch)) as pool:  # all three in flight at once
            answers = list(pool.map(lambda prompt: _answer(client, prompt), batch, timeout=60))
        assert answers == [sequential[prompt] for prompt in batch]


def test_client_disconnect_stops_generation(client, server):
    expected = _answer(client, "After the disconnect")
    cancelled_before = _health(server)["cancelled"]
    # a schema that only a long string satisfies, so the answer cannot end early on its own
    request = {"messages": [{"role": "user", "content": "Write a long text"}], "max_tokens": 1500,
               "temperature": 0, "stream": True,
               "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                                                     "minLength": 1400}}}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=request, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))
    # the response is closed mid-answer: the server notices and stops the generation
    for _ in range(100):
        health = _health(server)
        if health["cancelled"] > cancelled_before and health["pending"] == 0:
            break
        time.sleep(0.05)
    assert health["cancelled"] == cancelled_before + 1 and health["pending"] == 0, health
    assert _answer(client, "After the disconnect") == expected


# ---------------------------------------------------------------------------------------------------
# The rules themselves, without a server


def _parse(config: ServerConfig | None = None, max_image_size: int = MAX_IMAGE_SIZE, **fields: Any) -> Any:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(json.dumps(body).encode(), config or ServerConfig(), max_image_size=max_image_size)


def test_request_fields_become_generation_options():
    request = _parse(max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=4, stop="END",
                     stream=True, stream_options={"include_usage": True},
                     response_format={"type": "json_object"})
    options = request.options
    assert (options.max_tokens, options.temperature, options.top_p, options.seed) == (7, 0.5, 0.9, 4)
    assert options.stop == ("END",) and options.json_schema == {"type": "object"}
    assert request.stream and request.include_usage
    # no max_tokens: to the end of the context (the answer stops there), within the server's limit
    assert _parse().options.max_tokens == ServerConfig().max_tokens_limit
    assert _parse(ServerConfig(default_max_tokens=9)).options.max_tokens == 9


@pytest.mark.parametrize(("fields", "status", "words"), [
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"stop": 3}, 400, "stop"),
    ({"max_tokens": True}, 400, "max_tokens"),
    ({"n": 2}, 400, "n must be 1"),
    ({"messages": []}, 400, "messages"),
    ({"response_format": {"type": "xml"}}, 400, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}}, 400,
     "'frobnicate'"),
])
def test_bad_requests_name_the_field(fields, status, words):
    with pytest.raises(RequestError) as caught:
        _parse(**fields)
    assert caught.value.status == status and words in caught.value.message


def test_local_paths_are_refused_without_an_allowed_folder(image_folder):
    messages = _image_message(str(image_folder / "noise.png"))
    with pytest.raises(ImageError, match="local image files are not allowed"):
        _parse(messages=messages)
    allowed = _parse(ServerConfig(allowed_image_folder=image_folder), messages=messages)
    assert allowed.messages[0].parts[0].source.shape == (16, 32, 3)  # prepared (24 px -> 2 patches) before it queues


WITHOUT_STARLETTE = """
import sys
sys.modules["starlette"] = sys.modules["uvicorn"] = None  # as if the `server` extra were not installed
from pixtral_cpp.server import ServerConfig, check_bind_address
from pixtral_cpp.server.protocol import parse_chat_request
assert "starlette" not in [name.partition(".")[0] for name, module in sys.modules.items() if module]
try:
    from pixtral_cpp.server import run_server
except ImportError as error:
    print(error)
"""


def test_the_rules_import_without_starlette_and_the_server_says_what_to_install():
    done = subprocess.run([sys.executable, "-c", WITHOUT_STARLETTE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'pixtral-cpp[server]'" in done.stdout


def test_only_loopback_is_served_without_a_key():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind_address(host, ServerConfig())
    with pytest.raises(UnsafeBindError, match="--api-key"):
        check_bind_address("0.0.0.0", ServerConfig())
    check_bind_address("0.0.0.0", ServerConfig(api_key="k"))
    check_bind_address("0.0.0.0", ServerConfig(), allow_remote=True)


def test_serve_defaults_are_the_config_defaults():
    from pixtral_cpp.cli.serve import serve

    defaults = {param.name: param.default for param in serve.params}
    config = ServerConfig()
    assert defaults["max_body_mb"] * 1_000_000 == config.max_body_bytes
    assert (defaults["max_image_pixels"], defaults["max_images"], defaults["max_tokens_limit"],
            defaults["max_queued"], defaults["model_id"]) == (
        config.max_image_pixels, config.max_images_per_request, config.max_tokens_limit,
        config.max_queued_requests, config.model_id)


def test_queued_images_are_held_at_the_model_budget_not_full_size():
    config = ServerConfig(max_image_pixels=4000 * 4000)
    request = _parse(config, max_image_size=512, messages=_image_message(_data_url(_png(2000, 1500))))
    (image,) = [p for p in request.messages[0].parts if not hasattr(p, "text")]
    assert image.source.shape == (384, 512, 3)  # 2000x1500 within 512 px: 512x384, already on the grid
