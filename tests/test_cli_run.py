"""`describe`, `chat` and `info` through Click's runner, and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from pixtral_cpp.cli import main


@pytest.fixture(scope="module")
def model_path(converted) -> str:
    return str(converted("F16", "F16")[0])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(path)
    return str(path)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def test_describe_streams_the_answer(model_path, photo):
    result = run("describe", photo, "--model", model_path, "--max-tokens", "6", "--temperature", "0", "--ctx", "2048")
    assert result.exit_code == 0, result.output
    assert result.output.endswith("\n") and len(result.output.strip()) > 0


def test_describe_json_has_answer_and_statistics(model_path, photo):
    result = run("describe", photo, "--model", model_path, "--max-tokens", "4", "--json", "--ctx", "2048")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"answer", "stats", "load_seconds"}
    assert data["load_seconds"] > 0
    assert data["stats"]["image_tokens"] == 8 * 14  # 200x120 px -> 13x8 patches, rows * (cols + 1)
    assert data["stats"]["finish_reason"] in ("stop", "length")


def test_describe_without_mmap_answers_the_same(model_path, photo):
    args = ("describe", photo, "--model", model_path, "--max-tokens", "5", "--temperature", "0", "--ctx", "2048",
            "--json")
    mapped, read = run(*args), run(*args, "--no-mmap")
    assert mapped.exit_code == read.exit_code == 0, read.output
    assert json.loads(mapped.output)["answer"] == json.loads(read.output)["answer"]


def test_repack_where_it_would_crash_is_a_clear_error(model_path, photo, converted):
    """On AMX CPUs llama.cpp's repacked matmul segfaults on the first decode: refused before loading."""
    from pixtral_cpp.backend import repacking_is_safe

    quantized = str(converted("Q4_K_M", "F16")[0])
    result = run("describe", photo, "--model", quantized, "--max-tokens", "2", "--ctx", "2048", "--repack")
    if repacking_is_safe():
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1 and "repacking crashes on this CPU" in result.output


def test_describe_with_schema(model_path, photo, tmp_path):
    schema = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 12}}, "required": ["label"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = run("describe", photo, "--model", model_path, "--schema", str(tmp_path / "schema.json"),
                 "--max-tokens", "120", "--temperature", "0.8", "--seed", "1", "--ctx", "2048")
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.output)["label"], str)


def test_info_reports_the_pair(model_path):
    result = run("info", model_path)
    assert result.exit_code == 0, result.output
    assert "F16" in result.output and "projector pixtral" in result.output and "matches" in result.output
    assert "2 layers, width 256, 8 heads (2 KV) of 64" in result.output


def test_chat_keeps_history_until_end_of_input(model_path, photo):
    session = "What is it?\n/image " + photo + "\nAnd now?\n/reset\nHello\n"
    result = run("chat", "--model", model_path, "--max-tokens", "3", "--ctx", "2048", input=session)
    assert result.exit_code == 0, result.output
    assert "attached photo.png" in result.output and "conversation cleared" in result.output


def test_bad_image_is_exit_1_with_one_line(model_path, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = run("describe", str(tmp_path / "bad.jpg"), "--model", model_path, "--ctx", "2048")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output


def test_usage_errors_are_exit_2(model_path, photo):
    assert run("describe", photo, "--model", model_path, "--max-image-size", "1000").exit_code == 2
    assert run("describe").exit_code == 2


def test_missing_model_says_how_to_get_one(photo, tmp_path):
    env = {"PIXTRAL_CPP_MODELS": str(tmp_path / "none"), "PIXTRAL_CPP_MODEL": ""}
    result = CliRunner(env=env).invoke(main, ["describe", photo])
    assert result.exit_code == 1
    assert "pixtral-cpp convert" in result.output


def test_describe_subprocess_is_quiet_by_default(model_path, photo):
    exe = Path(sys.executable).with_name("pixtral-cpp")
    proc = subprocess.run([str(exe), "describe", photo, "--model", model_path, "--max-tokens", "4", "--ctx", "2048"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "llama.cpp's logging must be silent without --verbose"
    verbose = subprocess.run([str(exe), "-v", "describe", photo, "--model", model_path, "--max-tokens", "2",
                              "--ctx", "2048"], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "llama" in verbose.stderr.lower()


def test_smaller_image_budget_says_what_it_costs(model_path, photo):
    result = CliRunner().invoke(main, ["describe", photo, "--model", model_path, "--max-image-size", "512",
                                       "--max-tokens", "2", "--ctx", "2048"])
    assert result.exit_code == 0, result.output
    assert "image budget 512 px: at most 1056 positions per image (1024 px: 4160)" in result.output
