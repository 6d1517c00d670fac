"""The server against hostile callers: web pages (DNS rebinding, simple CORS requests), odd API keys,
costly schemas, floods of image uploads, half-sent bodies, hostile paths, shutdown while answering.

The app runs in this process on the real tiny model (loaded once), through Starlette's TestClient or a
real uvicorn socket where timing or a disconnect is the point; SIGTERM is sent to a real `pixtral-cpp
serve` process.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner
from PIL import Image
from starlette.testclient import TestClient

from pixtral_cpp import ModelOptions, PixtralModel
from pixtral_cpp.backend import GrammarError
from pixtral_cpp.backend.sampling import MAX_GRAMMAR_ALTERNATIVES, MAX_SCHEMA_BYTES
from pixtral_cpp.errors import ImageError
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.server import ServerConfig, ServerConfigError, create_app
from pixtral_cpp.server.protocol import parse_chat_request

CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def model(pair):
    with PixtralModel.load(pair[0], options=ModelOptions(n_ctx=2048, threads=2, max_image_size=64)) as loaded:
        yield loaded


@contextmanager
def client_for(model: Any, config: ServerConfig | None = None, bind_host: str = "127.0.0.1",
               base_url: str = "http://127.0.0.1:8080") -> Iterator[TestClient]:
    with TestClient(create_app(model, config, bind_host=bind_host), base_url=base_url) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(app: Any) -> Iterator[str]:
    """`app` on a real loopback socket (uvicorn in a thread); yields the base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def _error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


def _jpeg(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    return out.getvalue()


def _image_request(data: bytes, kind: str = "jpeg") -> dict[str, Any]:
    url = f"data:image/{kind};base64," + base64.b64encode(data).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 2, "temperature": 0}


# ---------------------------------------------------------------------------------------------------
# Host and Content-Type: what a web page could make a browser send


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "LocalHost:1", "app.localhost:8080",
                                  "127.0.0.1", "127.0.0.1:8080", "127.9.8.7:80", "[::1]", "[::1]:8080",
                                  "localhost."])
def test_loopback_names_are_served(model, host):
    with client_for(model) as client:
        assert client.get("/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "127.0.0.1.nip.io:8080",
                                  "localhost.attacker.example", "10.0.0.5:8080", "[::2]:8080", "[::1",
                                  "localhost:80x", "0.0.0.0:8080", ""])
def test_a_rebound_name_is_refused_with_421_naming_it(model, host):
    """After DNS rebinding a page's own name points at 127.0.0.1, but the browser still sends that name."""
    with client_for(model) as client:
        before = client.app.state.worker.completed
        response = client.post(CHAT, json=HELLO, headers={"Host": host})
        error = _error(response, 421, repr(host), "DNS rebinding", "--allowed-host")
        assert error["code"] == "invalid_host"
        assert client.get("/health", headers={"Host": host}).status_code == 421  # every path
        assert client.app.state.worker.completed == before


def test_a_request_without_host_is_refused_on_loopback(model):
    with served(create_app(model)) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")  # HTTP/1.0 needs no Host
            answer = sock.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.1 421") and "no Host header" in answer


def test_allowed_hosts_extend_loopback_and_restrict_other_binds(model):
    config = ServerConfig(allowed_hosts=("Pixtral.LAN",))
    with client_for(model, config) as client:
        assert client.get("/health", headers={"Host": "pixtral.lan:8080"}).status_code == 200
        assert client.get("/health", headers={"Host": "localhost"}).status_code == 200
        _error(client.get("/health", headers={"Host": "other.lan"}), 421, "pixtral.lan")
    # bound beyond loopback (with a key): any Host, as before, unless names are listed
    open_config = ServerConfig(api_key="k")
    with client_for(model, open_config, bind_host="0.0.0.0") as client:
        assert client.get("/health", headers={"Host": "anything.example", "Authorization": "Bearer k"}
                          ).status_code == 200
    listed = ServerConfig(api_key="k", allowed_hosts=("pixtral.lan",))
    with client_for(model, listed, bind_host="0.0.0.0") as client:
        headers = {"Authorization": "Bearer k"}
        assert client.get("/health", headers={**headers, "Host": "pixtral.lan"}).status_code == 200
        _error(client.get("/health", headers={**headers, "Host": "localhost"}), 421, "'localhost'")


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", None])
def test_bodies_not_declared_json_are_refused_with_415(model, content_type):
    """text/plain, form and multipart POSTs are CORS simple requests: any page can send them unasked."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    with client_for(model) as client:
        before = client.app.state.worker.completed
        response = client.post(CHAT, content=json.dumps(HELLO).encode(), headers=headers)
        shown = "no Content-Type" if content_type is None else repr(content_type)
        assert _error(response, 415, "application/json", shown)["code"] == "unsupported_media_type"
        assert client.app.state.worker.completed == before


def test_json_with_parameters_is_accepted(model):
    with client_for(model) as client:
        response = client.post(CHAT, content=json.dumps(HELLO).encode(),
                               headers={"Content-Type": "Application/JSON; charset=utf-8"})
        assert response.status_code == 200 and response.json()["object"] == "chat.completion"


# ---------------------------------------------------------------------------------------------------
# API keys


@pytest.mark.parametrize("key", ["clé-secrète", "ключ-🔑", "\u00a0spaced key\u3000"])
def test_a_non_ascii_key_works_from_a_utf8_client_and_a_wrong_one_is_refused(model, key):
    """httpx (like curl) sends header bytes as given; the openai client refuses non-ASCII keys itself."""
    with served(create_app(model, ServerConfig(api_key=key))) as base:
        def health(token: bytes) -> int:
            # /v1/models: /health is answered without a key (probes cannot send one)
            return httpx.get(f"{base}/v1/models", headers={"Authorization": b"Bearer " + token}).status_code

        assert health(key.encode("utf-8")) == 200
        assert health(key.encode("utf-8")[:-1] + b"x") == 401
        assert health(key[:-1].encode("utf-8")) == 401
        if all(ord(char) < 256 for char in key):
            assert health(key.encode("latin-1")) == 200  # what a browser's fetch sends for é


@pytest.mark.parametrize(("key", "words"), [
    ("ab\x01cd", "control character"), ("a\tb", "control character"), ("line\nbreak", "control character"),
    ("del\x7f", "control character"), ("bad\udcff", "not valid UTF-8"), (" \n", "empty")])
def test_keys_no_client_can_send_are_refused_at_start(key, words):
    with pytest.raises(ServerConfigError, match=words):
        ServerConfig(api_key=key)


def test_only_http_whitespace_is_stripped_from_a_key():
    assert ServerConfig(api_key="  key\r\n").api_key == "key"  # e.g. the newline of an env file
    assert ServerConfig(api_key="\u00a0key").api_key == "\u00a0key"  # bytes a client does send


def test_serve_refuses_a_bad_key_before_loading_the_model(pair):
    from pixtral_cpp.cli import main

    result = CliRunner().invoke(main, ["serve", "-m", str(pair[0]), "--api-key", "bad\x01key"])
    assert result.exit_code == 1 and "control character" in result.output, result.output


# ---------------------------------------------------------------------------------------------------
# Costly schemas


def _schema_request(schema: dict[str, Any]) -> dict[str, Any]:
    return {**HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


def test_schemas_over_the_cost_limits_are_refused_with_400_at_once(model):
    over = {"enum": [f"word{i}" for i in range(MAX_GRAMMAR_ALTERNATIVES + 10)]}
    huge = {"enum": [f"word{i}" for i in range(60_000)]}  # the 0.5 MB body that cost 28 s a token
    with client_for(model) as client:
        for schema, words in ((over, ["alternatives", f"{MAX_GRAMMAR_ALTERNATIVES}"]),
                              (huge, ["bytes of JSON", f"{MAX_SCHEMA_BYTES:,}"]),
                              ({"type": "string", "pattern": "^a{0,99999999}$"}, ["pattern count"])):
            started = time.monotonic()
            error = _error(client.post(CHAT, json=_schema_request(schema)), 400, *words)
            assert error["param"] == "response_format" and time.monotonic() - started < 2
        # an ordinary schema still answers, with JSON
        ordinary = {"type": "object", "properties": {"status": {"enum": ["draft", "sent", "paid"]}},
                    "required": ["status"]}
        answer = client.post(CHAT, json={**_schema_request(ordinary), "max_tokens": 12})
        assert answer.status_code == 200


def test_the_library_refuses_them_too(model):
    over = {"anyOf": [{"const": i} for i in range(MAX_GRAMMAR_ALTERNATIVES + 1)]}
    with pytest.raises(GrammarError, match="alternatives"):
        model.chat([{"role": "user", "content": "hi"}], GenerationOptions(max_tokens=2, json_schema=over))


# ---------------------------------------------------------------------------------------------------
# Admission before decoding


def test_extra_uploads_are_refused_at_once_and_every_slot_comes_back(model):
    config = ServerConfig(max_queued_requests=2, max_image_pixels=5000 * 4000)
    body = json.dumps(_image_request(_jpeg(4000, 3000))).encode()  # 12 MP: ~1 MB of base64
    headers = {"Content-Type": "application/json"}
    with served(create_app(model, config)) as base, httpx.Client(base_url=base, timeout=60, headers=headers) as client:
        def post(_: int) -> tuple[int, float]:
            started = time.monotonic()
            response = client.post(CHAT, content=body)
            return response.status_code, time.monotonic() - started

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(post, range(6)))
        refused = [seconds for status, seconds in results if status == 503]
        assert sorted(status for status, _ in results) == [200, 200, 503, 503, 503, 503], results
        assert max(refused) < 1.0, results
        # the worker gives a slot back just after the answer's last chunk is handed over
        _wait_for(lambda: client.get("/health").json()["pending"] == 0, 5)


def test_image_decoding_waits_for_the_gate_and_text_does_not():
    gate = threading.Semaphore(1)
    gate.acquire()  # another request is decoding
    image_body = json.dumps(_image_request(_jpeg(64, 48))).encode()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(parse_chat_request, image_body, ServerConfig(), gate)
        time.sleep(0.3)
        assert not waiting.done()
        gate.release()
        assert waiting.result(10).messages[0].parts[0].source.shape == (48, 64, 3)
    gate.acquire()
    assert parse_chat_request(json.dumps(HELLO).encode(), ServerConfig(), gate).messages  # no wait


def test_images_are_decoded_once_and_only_inside_the_gate():
    gate = threading.Semaphore(1)
    gate.acquire()  # another request is decoding
    broken = json.dumps(_image_request(b"not an image")).encode()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(parse_chat_request, broken, ServerConfig(), gate)
        time.sleep(0.3)
        assert not waiting.done()  # not even a bad image is opened before the gate
        gate.release()
        with pytest.raises(ImageError, match="message 0: part 0"):
            waiting.result(10)


def test_a_half_sent_body_holds_its_slot_until_the_client_leaves(model, caplog):
    config = ServerConfig(max_queued_requests=2)
    app = create_app(model, config)
    with served(app) as base:
        port = int(base.rsplit(":", 1)[1])
        stalled = []
        for _ in range(2):  # headers and a tenth of the body, then silence
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 10000\r\n\r\n".encode() + b"{" * 1000)
            stalled.append(sock)
        worker = app.state.worker
        _wait_for(lambda: worker.pending == 2)
        started = time.monotonic()
        third = httpx.post(base + CHAT, json=HELLO, timeout=10)
        assert _error(third, 503, "limit is 2")["code"] == "server_busy"
        assert time.monotonic() - started < 1.0 and third.headers["Retry-After"] == "1"
        with caplog.at_level(logging.INFO, logger="pixtral_cpp.server"):
            for sock in stalled:
                sock.close()
            _wait_for(lambda: worker.pending == 0)
        assert httpx.post(base + CHAT, json=HELLO, timeout=30).status_code == 200
    messages = [record.getMessage() for record in caplog.records if record.name == "pixtral_cpp.server.app"]
    assert messages.count("client went away while sending its request") == 2
    assert not [record for record in caplog.records if record.exc_info], "a traceback was logged"


def _wait_for(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------
# Inputs that gave 500s


def test_deeply_nested_bodies_are_400(model):
    with client_for(model) as client:
        for body in (b"[" * 100_000, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
            response = client.post(CHAT, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, response.text


def test_bad_local_paths_are_400_naming_the_problem(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "loop-a").symlink_to(folder / "loop-b")
    (folder / "loop-b").symlink_to(folder / "loop-a")
    with client_for(model, ServerConfig(allowed_image_folder=folder)) as client:
        for path, word in ((f"{folder}/nul\x00byte.png", "NUL byte"), (str(folder / "loop-a"), "loop"),
                           ("~no_such_user_xyz/a.png", "cannot be resolved")):
            request = _image_request(b"")
            request["messages"][0]["content"][0]["image_url"]["url"] = path
            assert _error(client.post(CHAT, json=request), 400, word)["code"] == "invalid_image"


def test_lone_surrogates_are_400_not_500(model):
    with client_for(model) as client:
        for content in ('"\\ud800 hello"', '[{"type": "text", "text": "a\\udfff"}]'):
            body = f'{{"messages": [{{"role": "user", "content": {content}}}], "max_tokens": 2}}'.encode()
            response = client.post(CHAT, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, response.text
            assert "lone surrogate" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------
# SIGTERM with a stream running and a request waiting


def test_sigterm_ends_streams_cleanly_and_refuses_waiting_requests(pair, tmp_path):
    text, mmproj = pair
    port = _free_port()
    stderr = (tmp_path / "stderr.log").open("w+")
    command = [sys.executable, "-m", "pixtral_cpp.cli", "serve", "-m", str(text), "--mmproj", str(mmproj),
               "--port", str(port), "--ctx", "2048", "--threads", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                               env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    base = f"http://127.0.0.1:{port}"
    endless = {"messages": [{"role": "user", "content": "Write"}], "max_tokens": 1500, "temperature": 0,
               "stream": True, "response_format": {"type": "json_schema", "json_schema": {
                   "schema": {"type": "string", "minLength": 1400}}}}
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            _wait_for(lambda: _healthy(client), 90)
            with ThreadPoolExecutor(1) as pool, client.stream("POST", CHAT, json=endless) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                waiting = pool.submit(client.post, CHAT, json=HELLO)
                _wait_for(lambda: client.get("/health").json()["pending"] == 2)
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                events = [line.removeprefix("data: ") for line in lines if line]
                refused = waiting.result(10)
            assert process.wait(10) == 0
            assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
    assert _error(refused, 503, "shutting down")["code"] == "server_shutting_down"
    stderr.seek(0)
    log = stderr.read()
    assert "Traceback" not in log and "ERROR" not in log, log


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False
