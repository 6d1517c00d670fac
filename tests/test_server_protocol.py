"""The server as people's tools use it (issue 13): default answer length, any model name or aliases,
legacy completions, raw base64 images, llama.cpp's `n`/`seed` spellings, the developer role, an open
/health, CORS, 405 with Allow, trailing slashes; driven by the official `openai` client and simonw's `llm`
against real server processes on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pixtral_cpp.errors import ImageError, ServerConfigError
from pixtral_cpp.server import ServerConfig
from pixtral_cpp.server.protocol import parse_chat_request
from tests.served import data_url, png, serving

KEY = "protocol-key"
CONTEXT = 1024
ORIGIN = "http://localhost:3000"
# A schema only a long string satisfies: the answer cannot end before its length limit.
LONG = {"type": "json_schema", "json_schema": {"name": "long", "schema": {"type": "string", "minLength": 4000}}}


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The defaults: any model name, no --max-tokens, no CORS; with an API key."""
    text, mmproj = converted("F16", "F16")
    log = tmp_path_factory.mktemp("protocol-log") / "server.log"
    with serving(text, mmproj, log, "--ctx", str(CONTEXT), "--max-image-size", "64", key=KEY) as base:
        yield base


@pytest.fixture(scope="module")
def strict(converted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Strict names with two aliases, a default length of 5 tokens, one CORS origin; no key."""
    text, mmproj = converted("F16", "F16")
    log = tmp_path_factory.mktemp("strict-log") / "server.log"
    with serving(text, mmproj, log, "--ctx", "512", "--max-image-size", "64", "--strict-model-name",
                 "--alias", "pix", "--alias", "gpt-4o-mini", "--max-tokens", "5", "--cors-origin", ORIGIN) as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _post(base: str, path: str, body: Any, key: str | None = KEY, **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}{path}", json=body, headers={**auth, **headers}, timeout=120)


def _error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message
    return message


def _counts(response: httpx.Response) -> tuple[int, int]:
    usage = response.json()["usage"]  # cached_tokens differ: the second request reuses the first's prompt
    return usage["prompt_tokens"], usage["completion_tokens"]


def _chat(content: Any, role: str = "user", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content}], "max_tokens": 3, "temperature": 0, **fields}


# ---------------------------------------------------------------------------------------------------
# Answer length


def test_without_max_tokens_the_answer_runs_to_the_end_of_the_context(client):
    result = client.chat.completions.create(model="pixtral-12b", messages=[{"role": "user", "content": "Go on"}],
                                            temperature=0, response_format=LONG)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens > 512  # the old default stopped here
    assert result.usage.prompt_tokens + result.usage.completion_tokens == CONTEXT


def test_serve_max_tokens_sets_the_default_length_and_requests_still_choose(strict):
    short = _post(strict, "/v1/chat/completions", {**_chat("Go on", response_format=LONG), "max_tokens": None})
    assert short.json()["usage"]["completion_tokens"] == 5
    longer = _post(strict, "/v1/chat/completions", _chat("Go on", response_format=LONG, max_tokens=9))
    assert longer.json()["usage"]["completion_tokens"] == 9


def test_a_default_over_the_limit_is_refused_at_start(converted, tmp_path):
    text, mmproj = converted("F16", "F16")
    done = subprocess.run([sys.executable, "-m", "pixtral_cpp.cli.serve", "-m", str(text), "--mmproj", str(mmproj),
                           "--max-tokens", "100", "--max-tokens-limit", "50"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "--max-tokens-limit" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------------
# Model names


def test_any_model_name_is_the_served_model_by_default(client, server):
    for name in ("gpt-3.5-turbo", "gpt-4o", "pixtral-12b"):  # llama.cpp's docs use gpt-3.5-turbo
        result = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)
        assert result.model == "pixtral-12b"
    listed = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [model["id"] for model in listed] == ["pixtral-12b"]
    assert listed[0]["metadata"]["accepts_any_model_name"] is True
    assert client.models.retrieve("gpt-4o").id == "pixtral-12b"


def test_strict_names_take_the_id_and_aliases_only(strict):
    strict_client = openai.OpenAI(base_url=f"{strict}/v1", api_key="unused", max_retries=0)
    for name in ("pixtral-12b", "pix", "gpt-4o-mini"):
        assert strict_client.completions.create(model=name, prompt="hi", max_tokens=1).model == "pixtral-12b"
    with pytest.raises(openai.NotFoundError) as caught:
        strict_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "'gpt-4o'" in caught.value.message and "'pix'" in caught.value.message
    (model,) = strict_client.models.list().data
    assert model.id == "pixtral-12b" and model.aliases == ["pix", "gpt-4o-mini"]
    assert model.metadata["accepts_any_model_name"] is False
    assert strict_client.models.retrieve("pix").id == "pixtral-12b"
    with pytest.raises(openai.NotFoundError):
        strict_client.models.retrieve("gpt-4o")


# ---------------------------------------------------------------------------------------------------
# Legacy completions


def test_legacy_completion_plain_streaming_and_echo(client):
    plain = client.completions.create(model="pixtral-12b", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    (choice,) = plain.choices
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert 0 < plain.usage.completion_tokens <= 6
    chunks = list(client.completions.create(model="pixtral-12b", prompt=["Once upon a time"], max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    echoed = client.completions.create(model="x", prompt="Once upon a time", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + choice.text


def test_legacy_stop_strings_end_the_answer(client):
    full = client.completions.create(model="m", prompt="Count", max_tokens=8, temperature=0).choices[0]
    assert len(full.text) > 2, "the tiny model should say a few characters"
    stop = full.text[2:4]
    cut = client.completions.create(model="m", prompt="Count", max_tokens=8, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"


def test_the_legacy_prompt_is_one_user_turn(client):
    """Documented: the prompt goes through Pixtral's chat template, as a user message would."""
    completion = client.completions.create(model="m", prompt="Say something", max_tokens=4, temperature=0)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say something"}],
                                          max_tokens=4, temperature=0)
    assert completion.choices[0].text == chat.choices[0].message.content
    assert completion.usage.prompt_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize(("fields", "words"), [
    ({"prompt": ["one", "two"]}, "2 prompts"),
    ({"prompt": [1, 2, 3]}, "token arrays"),
    ({"prompt": ""}, "non-empty string"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
])
def test_legacy_completions_refuse_what_they_do_not_do(server, fields, words):
    _error(_post(server, "/v1/completions", {"max_tokens": 2, **fields}), 400, words)


# ---------------------------------------------------------------------------------------------------
# Request spellings other clients use


def test_raw_base64_without_a_data_prefix_is_an_image(server):
    image = png(32, 24, seed=3)
    raw = [{"type": "image_url", "image_url": {"url": base64.b64encode(image).decode()}},
           {"type": "text", "text": "What is this?"}]
    url = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "What is this?"}]
    with_raw, with_url = (_post(server, "/v1/chat/completions", _chat(content)) for content in (raw, url))
    assert with_raw.status_code == 200, with_raw.text
    assert _counts(with_raw) == _counts(with_url)
    assert with_raw.json()["choices"] == with_url.json()["choices"]
    # base64 of something that is not an image is still a path, and paths are refused here
    not_image = base64.b64encode(b"just some text, not an image at all").decode()
    _error(_post(server, "/v1/chat/completions", _chat([{"type": "image_url", "image_url": {"url": not_image}}])),
           400, "local image files are not allowed")


def test_n_null_and_seed_minus_one_are_accepted(server):
    first = _post(server, "/v1/chat/completions", _chat("hello", n=None, seed=-1, temperature=1.0, max_tokens=8))
    assert first.status_code == 200, first.text
    seeded = [_post(server, "/v1/chat/completions", _chat("hello", seed=7, temperature=1.0, max_tokens=8))
              for _ in range(2)]
    assert seeded[0].json()["choices"] == seeded[1].json()["choices"]


@pytest.mark.parametrize(("body", "words"), [
    (_chat("hi", max_tokens="ten"), "max_tokens must be an integer, got \"ten\""),
    (_chat("hi", temperature="hot"), "temperature must be a number"),
    (_chat("hi", stream="yes"), "stream must be a boolean"),
    (_chat("hi", seed=-2), "seed must be between 0 and"),
    (_chat("hi", n=2), "n must be 1"),
    (_chat("hi", model=3), "model must be a string"),
    ([1, 2], "must be a JSON object, not an array"),
])
def test_refusals_are_worded_for_api_users(server, body, words):
    message = _error(_post(server, "/v1/chat/completions", body), 400, words)
    assert not re.search(r"\b(int|str|float|dict|list|NoneType)\b", message), message


def test_developer_role_is_the_system_prompt(server):
    as_developer, as_system = (_post(server, "/v1/chat/completions", {
        "messages": [{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "Why?"}],
        "max_tokens": 4, "temperature": 0}).json() for role in ("developer", "system"))
    assert as_developer["usage"]["prompt_tokens"] == as_system["usage"]["prompt_tokens"]
    assert as_developer["choices"] == as_system["choices"]


# ---------------------------------------------------------------------------------------------------
# HTTP around the API


def test_health_answers_without_the_key_and_nothing_else_does(server):
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"),
                         ("POST", "/v1/completions"), ("GET", "/v1/nowhere"), ("GET", "/health/x")):
        response = httpx.request(method, f"{server}{path}", json={})
        assert response.status_code == 401, (path, response.status_code)


def test_a_wrong_method_is_405_with_allow(server):
    response = httpx.get(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "answers POST" in response.json()["error"]["message"]
    assert "GET" in httpx.delete(f"{server}/health").headers["allow"]


def test_a_trailing_slash_answers_like_without_it(server):
    for path in ("/v1/chat/completions/", "/v1/completions/"):
        body = _chat("hi") if "chat" in path else {"prompt": "hi", "max_tokens": 2}
        response = _post(server, path, body)
        assert response.status_code == 200, (path, response.status_code, response.text)
    assert httpx.get(f"{server}/v1/models/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server}/health/").status_code == 200
    slashed = openai.OpenAI(base_url=f"{server}/v1/", api_key=KEY, max_retries=0)
    assert slashed.models.list().data[0].id == "pixtral-12b"


def test_cors_is_off_by_default(server):
    preflight = httpx.options(f"{server}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    answer = httpx.get(f"{server}/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in answer.headers


def test_cors_answers_allowed_origins_only(strict):
    asked = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    allowed = httpx.options(f"{strict}/v1/chat/completions", headers={"Origin": ORIGIN, **asked})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{strict}/v1/chat/completions", headers={"Origin": "http://evil.example", **asked})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    answer = _post(strict, "/v1/chat/completions", _chat("hi"), key=None, Origin=ORIGIN)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN


def test_a_bad_cors_origin_is_refused_at_start(converted):
    text, mmproj = converted("F16", "F16")
    done = subprocess.run([sys.executable, "-m", "pixtral_cpp.cli.serve", "-m", str(text), "--mmproj", str(mmproj),
                           "--cors-origin", "localhost:3000/app"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "scheme://host[:port]" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------------
# simonw's llm, configured as its docs say for an OpenAI-compatible server


def _llm(user_dir: Path, *args: str, stdin: str | None = None) -> str:
    env = {**os.environ, "LLM_USER_PATH": str(user_dir)}
    env.pop("OPENAI_API_KEY", None)
    done = subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def llm_home(server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("llm-home")
    models = [{"model_id": "pix-chat", "model_name": "pixtral-12b", "api_base": f"{server}/v1",
               "api_key_name": "pixtral", "vision": True, "supports_schema": True},
              {"model_id": "pix-responses", "model_name": "pixtral-12b", "api_base": f"{server}/v1",
               "api_key_name": "pixtral", "vision": True, "supports_schema": True, "responses": True},
              {"model_id": "pix-completion", "model_name": "pixtral-12b", "api_base": f"{server}/v1",
               "api_key_name": "pixtral", "completion": True}]
    (home / "extra-openai-models.yaml").write_text(json.dumps(models))  # JSON is YAML
    (home / "keys.json").write_text(json.dumps({"pixtral": KEY}))
    return home


@pytest.mark.parametrize("model", ["pix-chat", "pix-responses", "pix-completion"])
def test_llm_prompts_each_endpoint_streaming_and_not(llm_home, client, model):
    expected = client.chat.completions.create(model="pixtral-12b", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, temperature=0).choices[0].message.content
    for stream in ([], ["--no-stream"]):
        out = _llm(llm_home, "prompt", "-m", model, "-o", "max_tokens", "5", "-o", "temperature", "0", *stream, "Hi")
        assert out.rstrip("\n") == expected.rstrip("\n")


@pytest.mark.parametrize("model", ["pix-chat", "pix-responses"])
def test_llm_attachment_and_schema(llm_home, tmp_path, model):
    image = tmp_path / "noise.png"
    image.write_bytes(png(32, 24, seed=1))
    _llm(llm_home, "prompt", "-m", model, "-o", "max_tokens", "3", "-a", str(image), "What is this?")
    schema = {"type": "object", "properties": {"caption": {"type": "string", "maxLength": 12}},
              "required": ["caption"]}
    out = _llm(llm_home, "prompt", "-m", model, "--schema", json.dumps(schema), "-o", "max_tokens", "60",
               "Describe as JSON.")
    assert isinstance(json.loads(out)["caption"], str)
    logs = json.loads(_llm(llm_home, "logs", "-n", "1", "--json"))
    assert logs[0]["input_tokens"] > 0 and logs[0]["output_tokens"] > 0  # usage read from the server's answer


# ---------------------------------------------------------------------------------------------------
# Without a server


def test_legacy_completion_objects_validate_against_the_sdks_type(server):
    from openai.types import Completion

    raw = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 0}).json()
    assert Completion.model_validate(raw).choices[0].text == raw["choices"][0]["text"]


def test_cors_origins_are_checked_and_spelled_as_browsers_send_them():
    config = ServerConfig(cors_origins=("HTTP://LocalHost:3000/", "*"))
    assert config.cors_origins == ("http://localhost:3000", "*")
    for bad in ("localhost:3000", "http://site/app", "ftp://x", ""):
        with pytest.raises(ServerConfigError, match="CORS origin"):
            ServerConfig(cors_origins=(bad,))


def test_names_and_default_length_in_the_config():
    assert ServerConfig().serves("anything") and ServerConfig().default_max_tokens is None
    strict_config = ServerConfig(model_aliases=("a",), strict_model_name=True)
    assert strict_config.serves("a") and strict_config.serves("pixtral-12b") and not strict_config.serves("b")
    with pytest.raises(ServerConfigError, match="over the limit"):
        ServerConfig(default_max_tokens=10, max_tokens_limit=5)


@pytest.mark.parametrize("path", ["cat.png", "/tmp/abcdefghijklmnop", "images/abcdefghijklmnopq",
                                  base64.b64encode(b"GIF87a but not quite an image").decode()[1:]])
def test_strings_that_are_not_base64_images_stay_paths(path):
    with pytest.raises(ImageError, match="local image files are not allowed"):
        parse_chat_request(json.dumps(_chat([{"type": "image_url", "image_url": {"url": path}}])).encode(),
                           ServerConfig())
