"""`batch --server`: a folder done across two real `pixtral-cpp serve` processes on 127.0.0.1, one of them
killed midway, the batch itself interrupted and resumed, a key required; 429/503 sequences from a stub."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pixtral_cpp.batch import BatchProgress, collect_images, run_batch
from pixtral_cpp.cli import main
from pixtral_cpp.errors import EndpointError
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.remote_batch import RemoteOptions, prepared_png, run_remote_batch
from pixtral_cpp.remote_endpoint import DEFAULT_TIMEOUT, base_url, retry_after
from tests.test_batch import read_records  # the same record invariant as the local batch's

KEY = "remote-batch-key"
PROMPT = "What is this?"
BUDGET = 64  # the servers' --max-image-size and the client's: small images, quick answers
GREEDY = GenerationOptions(max_tokens=4, temperature=0)
STARTUP_SECONDS = 90


# -- servers --------------------------------------------------------------------------------------------


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(model_files: tuple[Path, Path], log_folder: Path) -> Serve:
    """`python -m pixtral_cpp.cli.serve` on the tiny model, a free port and the key, once /health says ok."""
    text, mmproj = model_files
    port = _free_port()
    log = (log_folder / f"serve-{port}.log").open("w+")
    command = [sys.executable, "-m", "pixtral_cpp.cli.serve", "-m", str(text), "--mmproj", str(mmproj),
               "--port", str(port), "--ctx", "2048", "--threads", "1", "--max-image-size", str(BUDGET),
               "--no-cache"]
    env = {**os.environ, "PIXTRAL_CPP_API_KEY": KEY, "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    serve = Serve(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"serve exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"{serve.url}/health", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()[
                    "status"] == "ok":
                return serve
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    serve.stop()
    pytest.fail(f"serve did not answer /health within {STARTUP_SECONDS} s")


@pytest.fixture(scope="module")
def model_files(converted) -> tuple[Path, Path]:
    return converted("F16", "F16")


@pytest.fixture(scope="module")
def servers(model_files, tmp_path_factory) -> Iterator[list[Serve]]:
    started = [start_serve(model_files, tmp_path_factory.mktemp("serve-logs")) for _ in range(2)]
    yield started
    for serve in started:
        serve.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """10 images of various sizes and modes, and one corrupt PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for n in range(10):
        width, height = int(rng.integers(12, 120)), int(rng.integers(12, 120))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert("L" if n % 4 == 3 else "RGB").save(root / f"img{n:02}.png")
    (root / "zz-corrupt.png").write_bytes((root / "img00.png").read_bytes()[:60])
    return root


@pytest.fixture(scope="module")
def local_records(model_files, folder, tmp_path_factory) -> dict[str, dict]:
    """What the local batch answers, by file name: the oracle for every remote answer."""
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    options = ModelOptions(n_ctx=2048, max_image_size=BUDGET, disk_cache=False)
    with PixtralModel.load(*model_files, options) as model:
        run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY)
    return {Path(r["path"]).name: r for r in read_records(out)}


def assert_each_image_once(records: list[dict], folder: Path) -> None:
    names = [Path(r["path"]).name for r in records]
    assert len(names) == len(set(names)), "an image was described twice"
    assert sorted(names) == sorted(p.name for p in collect_images([folder])), "an image was lost"


def assert_answers_are_the_local_batchs(records: list[dict], local: dict[str, dict]) -> None:
    for record in records:
        expected = local[Path(record["path"]).name]
        assert (record["answer"], record["error"]) == (expected["answer"], expected["error"]), record["path"]


def remote(**fields: Any) -> RemoteOptions:
    return RemoteOptions(**{"api_key": KEY, "max_image_size": BUDGET, **fields})


# -- real servers ---------------------------------------------------------------------------------------


def test_a_folder_is_shared_by_two_servers_and_answered_as_the_local_batch(servers, folder, local_records,
                                                                            tmp_path):
    out = tmp_path / "answers.jsonl"
    summary = run_remote_batch([s.url for s in servers], collect_images([folder]), out, prompt=PROMPT,
                               generation=GREEDY, remote=remote())
    assert (summary.done, summary.failed, summary.skipped_already_done) == (10, 1, 0)
    records = read_records(out)
    assert_each_image_once(records, folder)
    assert_answers_are_the_local_batchs(records, local_records)
    # the corrupt image fails here, with the local batch's words, and is never sent
    assert "zz-corrupt.png" in next(r["error"] for r in records if r["error"])

    by_server = {report.url: report for report in summary.endpoints}
    assert set(by_server) == {f"{s.url}/v1" for s in servers}
    assert all(report.images > 0 for report in by_server.values()), "both servers took part"
    assert sum(report.images for report in by_server.values()) == 11
    assert all(report.concurrency == 1 and report.model == "pixtral-12b" for report in by_server.values())
    answered = [r for r in records if r["answer"] is not None]
    assert {r["stats"]["server"] for r in answered} == set(by_server)
    assert sum(report.completion_tokens for report in by_server.values()) == sum(
        r["stats"]["generated_tokens"] for r in answered) > 0
    assert all(report.images_per_second > 0 and report.tokens_per_second > 0 for report in by_server.values())

    again = run_remote_batch([s.url for s in servers], collect_images([folder]), out, prompt=PROMPT,
                             generation=GREEDY, remote=remote())
    assert (again.done, again.failed, again.skipped_already_done) == (0, 0, 11)
    assert read_records(out) == records


def test_a_server_killed_midway_loses_nothing_and_the_other_finishes(servers, model_files, folder,
                                                                   local_records, tmp_path):
    doomed = start_serve(model_files, tmp_path)
    out, notices = tmp_path / "answers.jsonl", []

    def kill_after_three(update: BatchProgress) -> None:
        if update.completed == 3:
            doomed.process.send_signal(signal.SIGKILL)  # mid-request, most likely: a reset, then refusals

    try:
        summary = run_remote_batch([doomed.url, servers[0].url], collect_images([folder]), out, prompt=PROMPT,
                                   generation=GREEDY, remote=remote(), on_progress=kill_after_three,
                                   on_notice=notices.append)
    finally:
        doomed.stop()
    assert summary.done + summary.failed == 11
    records = read_records(out)
    assert_each_image_once(records, folder)
    assert_answers_are_the_local_batchs(records, local_records)
    dead, alive = summary.endpoints
    assert dead.url == f"{doomed.url}/v1" and "connection failed" in (dead.dropped or ""), dead
    assert alive.dropped is None and alive.images == 11 - dead.images and dead.images <= 4
    assert [n for n in notices if n.startswith(dead.url)] and "dropped" in notices[0]


def test_an_interrupted_batch_resumes_where_it_stopped(servers, folder, local_records, tmp_path):
    out = tmp_path / "answers.jsonl"

    def interrupt_after_four(update: BatchProgress) -> None:
        if update.completed == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_remote_batch([s.url for s in servers], collect_images([folder]), out, prompt=PROMPT,
                         generation=GREEDY, remote=remote(), on_progress=interrupt_after_four)
    assert len(read_records(out)) == 4
    summary = run_remote_batch([s.url for s in servers], collect_images([folder]), out, prompt=PROMPT,
                               generation=GREEDY, remote=remote())
    assert summary.skipped_already_done == 4 and summary.done + summary.failed == 7
    records = read_records(out)
    assert_each_image_once(records, folder)
    assert_answers_are_the_local_batchs(records, local_records)


def test_servers_that_require_a_key_drop_a_batch_without_it(servers, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    for key in (None, "wrong-key"):
        with pytest.raises(EndpointError, match="every server was dropped") as refused:
            run_remote_batch([s.url for s in servers], collect_images([folder]), out, prompt=PROMPT,
                             generation=GREEDY, remote=remote(api_key=key))
        message = str(refused.value)
        assert all(f"{s.url}/v1: it answered 401" in message for s in servers), message
        assert "invalid or missing API key" in message and "11 images are not done" in message
    assert out.read_bytes() == b""
    result = CliRunner().invoke(main, ["batch", str(folder), "--jsonl", str(out), "--server", servers[0].url],
                                env={"PIXTRAL_CPP_API_KEY": ""})
    assert result.exit_code == 1, result.output
    notice, error = result.output.splitlines()  # said when it happened, then the one-line error
    assert notice.startswith(f"{servers[0].url}/v1 dropped: it answered 401") and error.startswith(
        "Error: every server was dropped")
    assert "Traceback" not in result.output


def test_cli_batch_on_two_servers_reports_each_and_resumes(servers, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(folder), "--jsonl", str(out), "--prompt", PROMPT, "--max-tokens", "4",
            "--temperature", "0", "--max-image-size", str(BUDGET)]
    for serve in servers:
        args += ["--server", serve.url]
    unreachable = f"http://127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(main, [*args, "--server", unreachable], env={"PIXTRAL_CPP_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert "10 described, 0 already done, 1 failed" in result.output
    assert f"{unreachable}/v1: no images; dropped (3 failures in a row, the last: connection failed" in result.output
    for serve in servers:
        line = next(line for line in result.output.splitlines() if line.startswith(f"{serve.url}/v1: "))
        assert "images/s" in line and "tokens/s" in line and "1 at a time" in line, line
    assert_each_image_once(read_records(out), folder)
    again = CliRunner().invoke(main, [*args, "--api-key", KEY])
    assert again.exit_code == 0 and "0 described, 11 already done" in again.output, again.output


def test_cli_sigint_keeps_the_file_resumable(servers, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    command = [sys.executable, "-m", "pixtral_cpp.cli", "batch", str(folder), "--jsonl", str(out), "-q",
               "--prompt", PROMPT, "--max-tokens", "4", "--temperature", "0", "--max-image-size", str(BUDGET),
               "--server", servers[0].url]
    process = subprocess.Popen(command, env={**os.environ, "PIXTRAL_CPP_API_KEY": KEY},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 1 and "run the same command again to resume" in output, output
    finished = len(read_records(out))
    assert 2 <= finished < 11
    rerun = subprocess.run(command, env={**os.environ, "PIXTRAL_CPP_API_KEY": KEY}, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0 and f"{finished} already done" in rerun.stdout, rerun.stdout + rerun.stderr
    assert_each_image_once(read_records(out), folder)


def test_cli_refuses_options_that_do_not_apply(folder, tmp_path):
    out = str(tmp_path / "o.jsonl")
    local_only = CliRunner().invoke(main, ["batch", str(folder), "--jsonl", out, "--server", "http://127.0.0.1:9",
                                           "--ctx", "4096"])
    assert local_only.exit_code == 2 and "--ctx is the server's setting" in local_only.output
    remote_only = CliRunner().invoke(main, ["batch", str(folder), "--jsonl", out, "--concurrency", "2"])
    assert remote_only.exit_code == 2 and "--concurrency applies to --server only" in remote_only.output
    bad_url = CliRunner().invoke(main, ["batch", str(folder), "--jsonl", out, "--server", "127.0.0.1:8080"])
    assert bad_url.exit_code == 1 and "is not an http(s) URL" in bad_url.output


def test_the_cli_names_the_librarys_defaults():
    from pixtral_cpp.cli.batch import API_KEY_ENV
    from pixtral_cpp.cli.serve import API_KEY_ENV as SERVE_KEY_ENV
    from pixtral_cpp.remote_endpoint import CONCURRENCY_BY_OWNER, DEFAULT_CONCURRENCY

    assert API_KEY_ENV == SERVE_KEY_ENV
    helps = {param.name: param.help for param in main.commands["batch"].params}
    assert f"default: {int(DEFAULT_TIMEOUT)}" in helps["timeout"]
    assert f"{CONCURRENCY_BY_OWNER['pixtral-cpp']} for pixtral-cpp serve, {DEFAULT_CONCURRENCY} for others" in (
        helps["concurrency"])


# -- busy and failing endpoints (a stub: the sequence of answers is the point) --------------------------


class Stub:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers POSTs from a script of (status, headers)."""

    def __init__(self, script: list[tuple[int, dict[str, str]]], *, owner: str = "stub", repeat_last: bool = False):
        self.script, self.repeat_last, self.owner = list(script), repeat_last, owner
        self.posts: list[float] = []
        self.models: list[str | None] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._send(200, {}, {"object": "list", "data": [{"id": "served-name", "owned_by": stub.owner}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.posts.append(time.monotonic())
                stub.models.append(body.get("model"))
                if stub.script[0][0] == HANG:
                    stub.script.pop(0)
                    time.sleep(HANG_SECONDS)  # then answers: the client has given up by then
                assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
                status, headers = stub.script.pop(0) if len(stub.script) > 1 or not stub.repeat_last else (
                    stub.script[0])
                code = "invalid_image" if status == 400 else None
                answer = {"error": {"message": f"scripted {status}", "code": code}} if status != 200 else {
                    "model": "served-name", "choices": [{"message": {"content": "a stub answer"},
                                                         "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
                self._send(status, headers, answer)

            def _send(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


OK = (200, {})
HANG, HANG_SECONDS = -1, 1.5  # a script entry: no answer for HANG_SECONDS, then the next entry's


def test_429_and_503_are_retried_after_their_retry_after(folder, tmp_path):
    stub = Stub([(429, {"Retry-After": "1"}), (503, {"Retry-After": "0"}), (503, {}), OK], repeat_last=True)
    out = tmp_path / "answers.jsonl"
    try:
        summary = run_remote_batch([stub.url], [folder / "img00.png"], out, prompt=PROMPT, generation=GREEDY,
                                   remote=remote())
    finally:
        stub.close()
    assert summary.done == 1 and summary.endpoints[0].dropped is None
    assert summary.endpoints[0].concurrency == 8, "not a pixtral-cpp server: more in flight by default"
    (record,) = read_records(out)
    assert record["answer"] == "a stub answer" and record["stats"]["attempts"] == 4
    assert record["stats"]["model"] == "served-name" and record["stats"]["generated_tokens"] == 3
    assert stub.models == ["served-name"] * 4, "without --model, the id /v1/models lists"
    gaps = np.diff(stub.posts)
    assert gaps[0] >= 1.0, "Retry-After: 1 was honoured"
    assert gaps[1] < 0.5, "Retry-After: 0 means now"
    # no Retry-After: the backoff of a third try, 0.5 x 2^2 s with jitter (x 0.5 to 1)
    assert 1.0 <= gaps[2] <= 2.3


def test_an_endpoint_that_keeps_failing_is_dropped_and_the_others_finish(folder, tmp_path):
    failing = Stub([(500, {})], repeat_last=True)
    working = Stub([OK], repeat_last=True, owner="pixtral-cpp")
    images = collect_images([folder])[:5]
    notices: list[str] = []
    out = tmp_path / "answers.jsonl"
    try:
        summary = run_remote_batch([failing.url, working.url], images, out, prompt=PROMPT, generation=GREEDY,
                                   remote=remote(concurrency=2), on_notice=notices.append)
    finally:
        failing.close()
        working.close()
    bad, good = summary.endpoints
    assert bad.images == 0 and bad.dropped is not None and "failures in a row" in bad.dropped
    assert "scripted 500" in bad.dropped and notices and notices[0].startswith(failing.url)
    assert good.images == 5 and summary.done == 5 and len(failing.posts) <= 4  # 3 in a row, one more in flight
    assert sorted(Path(r["path"]).name for r in read_records(out)) == sorted(p.name for p in images)


def test_every_endpoint_unreachable_is_one_clear_error(folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(EndpointError, match=r"every server was dropped \(http://127\.0\.0\.1:\d+/v1: 3 failures in a "
                                            r"row, the last: connection failed"):
        run_remote_batch([url], [folder / "img00.png"], out, prompt=PROMPT, remote=remote())
    assert out.read_bytes() == b""


def test_retry_after_reads_seconds_and_dates():
    assert 2.0 <= retry_after("2") < 2.2 and retry_after(None) is None and retry_after("soon") is None
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= retry_after(when) <= 31
    assert retry_after("86400") <= 121, "capped"


def test_prepared_png_is_what_the_local_path_encodes(folder):
    from pixtral_cpp.images import prepare_image

    png = prepared_png(folder / "img01.png", BUDGET)
    local = prepare_image(folder / "img01.png", max_image_size=BUDGET)
    # the server decodes the PNG and finds it at its grid size already: the same pixels
    assert np.array_equal(prepare_image(png, max_image_size=BUDGET, reduce_while_decoding=True).pixels, local.pixels)


def test_an_image_the_server_refuses_is_recorded_and_the_model_named_is_sent(folder, tmp_path):
    stub = Stub([(400, {}), OK], repeat_last=True)
    out = tmp_path / "answers.jsonl"
    try:
        summary = run_remote_batch([stub.url], [folder / "img00.png", folder / "img01.png"], out, prompt=PROMPT,
                                   generation=GREEDY, remote=remote(model="my-served-name", concurrency=1))
    finally:
        stub.close()
    assert (summary.done, summary.failed) == (1, 1) and summary.endpoints[0].dropped is None
    first, second = read_records(out)
    assert first["error"] == "scripted 400" and second["answer"] == "a stub answer"
    assert stub.models == ["my-served-name"] * 2


def test_server_urls_are_openai_base_urls():
    assert base_url("http://127.0.0.1:8080") == base_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080/v1"
    assert base_url("http://gpu1:8000/v1/") == "http://gpu1:8000/v1"
    assert base_url("https://example.org/openai/v1") == "https://example.org/openai/v1"


def test_a_timeout_is_retried(folder, tmp_path):
    stub = Stub([(HANG, {}), OK], repeat_last=True)
    out = tmp_path / "answers.jsonl"
    try:
        summary = run_remote_batch([stub.url], [folder / "img00.png"], out, prompt=PROMPT, generation=GREEDY,
                                   remote=remote(timeout=0.5, concurrency=1))
    finally:
        stub.close()
    (record,) = read_records(out)
    assert summary.done == 1 and record["answer"] == "a stub answer" and record["stats"]["attempts"] == 2
    assert len(stub.posts) == 2 and stub.posts[1] - stub.posts[0] >= 0.5, "sent again once it timed out"
