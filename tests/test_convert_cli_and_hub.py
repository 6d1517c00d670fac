"""`pixtral-cpp convert` through Click and a real subprocess; hub repo ids from a local HF cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pixtral_cpp.cli import main
from tests.gguf_helpers import field, read_gguf

REPO = "mistralai/Pixtral-12B-2409"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `pixtral-cpp` entry point in a fresh process (HF settings are read at import)."""
    exe = Path(sys.executable).with_name("pixtral-cpp")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def offline_hub_cache(tiny_native: Path, tmp_path: Path) -> dict[str, str]:
    """A Hugging Face cache holding the tiny checkpoint under Pixtral's repo id, and an offline env."""
    repo_dir = tmp_path / "hf-cache" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / SNAPSHOT
    shutil.copytree(tiny_native, snapshot)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: vllm\n---\n# Pixtral\n")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)
    return {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"}


def test_convert_by_repo_id_from_the_cache(offline_hub_cache, tmp_path):
    proc = run_cli("convert", REPO, "-o", str(tmp_path / "out"), "--quant", "BF16", env=offline_hub_cache)
    assert proc.returncode == 0, proc.stderr
    text = tmp_path / "out" / "Pixtral-12B-2409-BF16.gguf"
    assert text.is_file() and (tmp_path / "out" / "mmproj-Pixtral-12B-2409-F16.gguf").is_file()
    assert f"text model  {text}" in proc.stdout
    # Not a terminal: one summary line per step instead of a redrawn bar.
    assert "mmproj (F16):" in proc.stderr and "text model (BF16):" in proc.stderr and "\r" not in proc.stderr
    reader = read_gguf(text)
    assert field(reader, "general.name") == "Pixtral-12B-2409"
    assert field(reader, "general.license") == "apache-2.0"
    assert field(reader, "general.source.url") == f"https://huggingface.co/{REPO}"


def test_unknown_repo_offline_is_a_clear_error(offline_hub_cache, tmp_path):
    proc = run_cli("convert", "mistralai/Not-There", "-o", str(tmp_path / "out"), env=offline_hub_cache)
    assert proc.returncode == 1
    assert "not in the local Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_dry_run(tiny_hf, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny_hf), "-o", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "hf layout" in result.output and "Q4_K_M" in result.output and "disk needed" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line_with_exit_code_1(tiny_native, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny_native), "-o", str(tmp_path), "--quant", "Q9_K"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: unknown text model quantization 'Q9_K'")
    assert "Traceback" not in result.output


def test_cli_usage_error_exit_code_2():
    result = CliRunner().invoke(main, ["convert"])
    assert result.exit_code == 2
    assert "Missing argument 'SOURCE'" in result.output
