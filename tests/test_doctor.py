"""`pixtral-cpp doctor`: the self-test passes here, reports JSON, and fails with exit 1 and a reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from pixtral_cpp.cli import main
from pixtral_cpp.doctor import Step, run_doctor

STEPS = ["backend", "synthetic model", "convert", "load", "describe", "follow-up", "quantize", "cleanup"]


def test_doctor_passes_quickly_and_keeps_the_files_when_asked(tmp_path: Path):
    seen: list[Step] = []
    report = run_doctor(tmp_path / "doctor", on_step=seen.append)
    assert report.ok, report.failed
    assert [step.name for step in report.steps] == STEPS and seen == report.steps
    assert report.seconds < 60
    assert report.work_dir == tmp_path / "doctor"
    assert sorted(p.name for p in (tmp_path / "doctor" / "gguf").glob("*.gguf")) == [
        "Pixtral-doctor-F16.gguf", "mmproj-Pixtral-doctor-F16.gguf"]


def test_doctor_json_lists_every_step():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True and report["work_dir"] is None
    assert [step["name"] for step in report["steps"]] == STEPS
    assert all(step["ok"] and step["seconds"] >= 0 and step["detail"] for step in report["steps"])


def test_a_failing_step_is_named_and_stops_the_run(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    report = run_doctor(blocker / "doctor")
    assert not report.ok and report.failed is not None
    assert report.failed.name == "synthetic model" and "Not a directory" in report.failed.detail
    assert [step.name for step in report.steps] == ["backend", "synthetic model", "cleanup"]


def test_doctor_exits_1_with_the_reason(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    exe = Path(sys.executable).with_name("pixtral-cpp")  # the installed entry point
    done = subprocess.run([str(exe), "doctor", "--keep", str(blocker / "doctor")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "✓ backend" in done.stdout and "✗ synthetic model" in done.stdout
    assert "step 'synthetic model' failed" in done.stderr and "Not a directory" in done.stderr
