"""`batch`: one record per image, bad images recorded, resume after a re-run, a cut line or Ctrl-C."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from pixtral_cpp.batch import BatchProgress, BatchRecord, collect_images, run_batch
from pixtral_cpp.cli import main
from pixtral_cpp.cli.batch import batch
from pixtral_cpp.errors import ContextLengthError, ImageError, OutputError
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import GenerationOptions

GREEDY_SHORT = GenerationOptions(max_tokens=3, temperature=0)
PROMPT = "What is this?"


def _save(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).convert(mode).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 good images of various sizes and formats, 1 corrupt PNG, 1 text file named .jpg, 1 ignored .txt."""
    root = tmp_path_factory.mktemp("photos")
    _save(root / "a.png", (40, 24), 0)
    _save(root / "b.jpg", (64, 48), 1)
    _save(root / "c.PNG", (20, 70), 2, mode="L")
    _save(root / "d.jpeg", (33, 17), 3)
    (root / "e-corrupt.png").write_bytes((root / "a.png").read_bytes()[:60])  # header, no pixel data
    (root / "f-text.jpg").write_text("not a picture\n")
    (root / "notes.txt").write_text("ignored: not an image suffix\n")
    return root


@pytest.fixture(scope="module")
def model_files(converted) -> tuple[Path, Path]:
    return converted("F16", "F16")


@pytest.fixture(scope="module")
def model(model_files):
    with PixtralModel.load(*model_files, n_ctx=2048) as loaded:
        yield loaded


def read_records(path: Path) -> list[dict]:
    """Every line must be a complete record: the invariant every test checks."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the file must end with a complete line"
    records = [json.loads(line) for line in raw.splitlines()]
    for record in records:
        assert set(record) == {"path", "answer", "error", "stats", "prompt"}
        assert (record["answer"] is None) == (record["error"] is not None) == (record["stats"] is None)
    return records


def assert_each_image_once(records: list[dict], folder: Path) -> None:
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)), "an image was described twice"
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in collect_images([folder]))


# -- collecting inputs --------------------------------------------------------------------------------


def test_collect_images_expands_sorts_and_deduplicates(folder, tmp_path):
    names = [p.name for p in collect_images([folder])]
    assert names == ["a.png", "b.jpg", "c.PNG", "d.jpeg", "e-corrupt.png", "f-text.jpg"]
    # a file given again, and through another spelling of its path, is kept once and first
    again = collect_images([folder / "b.jpg", folder, folder / ".." / folder.name / "a.png"])
    assert [p.name for p in again][:2] == ["b.jpg", "a.png"] and len(again) == 6
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "deep.png", (16, 16), 4)
    _save(tmp_path / "top.png", (16, 16), 5)
    (tmp_path / "._top.png").write_bytes(b"macOS resource fork")
    assert [p.name for p in collect_images([tmp_path])] == ["top.png"]
    assert [p.name for p in collect_images([tmp_path], recursive=True)] == ["deep.png", "top.png"]


def test_collect_images_refuses_missing_inputs_and_empty_folders(folder, tmp_path):
    with pytest.raises(ImageError, match="nope.jpg: no such file or folder"):
        collect_images([folder, tmp_path / "nope.jpg"])
    with pytest.raises(ImageError, match="no image files"):
        collect_images([tmp_path])


# -- running and resuming -----------------------------------------------------------------------------


def test_batch_records_every_image_then_resumes_with_nothing_to_do(model, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    updates: list[BatchProgress] = []
    summary = run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY_SHORT,
                        on_progress=updates.append)
    assert (summary.done, summary.skipped_already_done, summary.failed) == (4, 0, 2)
    records = read_records(out)
    assert_each_image_once(records, folder)
    failed = {Path(r["path"]).name: r["error"] for r in records if r["error"]}
    assert set(failed) == {"e-corrupt.png", "f-text.jpg"}
    assert all(name in error for name, error in failed.items()), "the error names the file"
    assert all(r["prompt"] == PROMPT and Path(r["path"]).is_absolute() for r in records)
    assert all(r["stats"]["generated_tokens"] <= 3 for r in records if r["stats"])
    assert [u.completed for u in updates] == [0, 1, 2, 3, 4, 5, 6] and updates[0].record is None

    before, encoded = out.read_bytes(), model.images_encoded
    again = run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY_SHORT)
    assert (again.done, again.skipped_already_done, again.failed) == (0, 6, 0)
    assert model.images_encoded == encoded and out.read_bytes() == before

    # another prompt is another question: the same image is described again, next to the first answer
    other = run_batch(model, [folder / "a.png"], out, prompt="Colours?", generation=GREEDY_SHORT)
    assert (other.done, other.skipped_already_done) == (1, 0)
    assert [r["prompt"] for r in read_records(out)].count("Colours?") == 1


def test_partial_last_line_is_cut_off_and_that_image_redone(model, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY_SHORT)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a write cut half-way

    summary = run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY_SHORT)
    assert summary.skipped_already_done == 5 and summary.done + summary.failed == 1
    records = read_records(out)
    assert_each_image_once(records, folder)
    assert records[-1]["path"] == json.loads(lines[-1])["path"]


def test_record_cut_just_before_its_newline_is_kept(model, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    images = collect_images([folder])[:2]
    run_batch(model, images, out, prompt=PROMPT, generation=GREEDY_SHORT)
    out.write_bytes(out.read_bytes()[:-1])
    summary = run_batch(model, images, out, prompt=PROMPT, generation=GREEDY_SHORT)
    assert (summary.done, summary.skipped_already_done) == (0, 2) and len(read_records(out)) == 2


def test_interrupt_keeps_finished_records_and_rerun_does_the_rest(model, folder, tmp_path):
    out = tmp_path / "answers.jsonl"

    def stop_after_two(update: BatchProgress) -> None:
        if update.completed == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY_SHORT,
                  on_progress=stop_after_two)
    assert len(read_records(out)) == 2

    summary = run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY_SHORT)
    assert summary.skipped_already_done == 2 and summary.done + summary.failed == 4
    assert_each_image_once(read_records(out), folder)


def test_a_line_that_is_not_a_record_is_an_error_not_dropped(model, folder, tmp_path):
    out = tmp_path / "mine.jsonl"
    out.write_text('{"path": "x.png", "prompt": "p", "answer": "a", "error": null, "stats": null}\nhello\n')
    with pytest.raises(OutputError, match="line 2 is not a batch record"):
        run_batch(model, collect_images([folder]), out, prompt=PROMPT, generation=GREEDY_SHORT)
    assert out.read_text().endswith("hello\n")
    with pytest.raises(OutputError, match="is a folder"):
        run_batch(model, collect_images([folder]), tmp_path, prompt=PROMPT)


def test_a_second_batch_on_the_same_file_is_refused(model, folder, tmp_path):
    out = tmp_path / "answers.jsonl"

    def start_another(update: BatchProgress) -> None:
        if update.record is None:
            with pytest.raises(OutputError, match="another batch is writing to"):
                run_batch(model, [folder / "a.png"], out, prompt=PROMPT, generation=GREEDY_SHORT)

    run_batch(model, [folder / "a.png"], out, prompt=PROMPT, generation=GREEDY_SHORT,
              on_progress=start_another)
    assert len(read_records(out)) == 1


def test_records_are_utf8_and_keep_names_that_are_not():
    name = os.fsdecode(b"/photos/caf\xe9.png")  # a Latin-1 file name on a UTF-8 system
    line = BatchRecord(name, "un caf\u00e9", None, None, "Qu'est-ce ?").to_line()
    assert "café".encode() in line and line.endswith(b"\n") and line.count(b"\n") == 1
    assert os.fsencode(json.loads(line)["path"]) == b"/photos/caf\xe9.png"


def test_an_error_every_image_would_hit_stops_the_batch(model_files, folder, tmp_path):
    # a 256-position context cannot hold a 320x320 image (20 rows of 21 positions): a setting to fix,
    # not a property of the image, so it must not be recorded as if the image were done
    _save(tmp_path / "big.png", (320, 320), 6)
    out = tmp_path / "answers.jsonl"
    with PixtralModel.load(*model_files, n_ctx=256) as small:
        with pytest.raises(ContextLengthError):
            run_batch(small, [tmp_path / "big.png", folder / "a.png"], out, prompt=PROMPT,
                      generation=GREEDY_SHORT)
    assert out.read_bytes() == b""


# -- the command ------------------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(batch, [*args, "--max-tokens", "3", "--ctx", "2048"])


def test_cli_batch_shows_progress_and_summary_then_resumes(model_files, folder, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = invoke(str(folder), "--jsonl", str(out), "--model", str(model_files[0]), "--prompt", PROMPT)
    assert result.exit_code == 0, result.output
    assert "describing 6 images: 6 images in" in result.output  # a pipe gets one line, no bar
    assert "4 described, 0 already done, 2 failed" in result.output
    assert_each_image_once(read_records(out), folder)

    again = invoke(str(folder), "--jsonl", str(out), "--model", str(model_files[0]), "--prompt", PROMPT)
    assert again.exit_code == 0, again.output
    assert "0 described, 6 already done, 0 failed" in again.output and "describing" not in again.output


def test_cli_batch_exit_codes(model_files, folder, tmp_path):
    bad = [str(folder / "e-corrupt.png"), str(folder / "f-text.jpg")]
    result = invoke(*bad, "--jsonl", str(tmp_path / "out.jsonl"), "--model", str(model_files[0]))
    assert result.exit_code == 1
    assert "Error: all 2 images failed; their errors are in" in result.output
    assert len(read_records(tmp_path / "out.jsonl")) == 2

    assert invoke(str(folder), "--model", str(model_files[0])).exit_code == 2  # --jsonl is required
    # through `pixtral-cpp` itself, whose group turns library errors into one line
    missing = CliRunner().invoke(main, ["batch", str(tmp_path / "nope"), "--jsonl", str(tmp_path / "o.jsonl")])
    assert missing.exit_code == 1 and "nope: no such file or folder" in missing.output
    assert "Traceback" not in missing.output


# -- retrying failed images -------------------------------------------------------------------------------


def latest_by_path(records: list[dict]) -> dict[str, dict]:
    """The record that counts for each path (one prompt): the latest one."""
    return {Path(r["path"]).name: r for r in records}


def test_failed_images_are_retried_only_when_asked(model, folder, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "e-corrupt.png", "f-text.jpg"):
        (photos / name).write_bytes((folder / name).read_bytes())
    out = tmp_path / "answers.jsonl"
    first = run_batch(model, collect_images([photos]), out, prompt=PROMPT, generation=GREEDY_SHORT)
    assert (first.done, first.failed, first.retried) == (1, 2, 0)

    _save(photos / "e-corrupt.png", (24, 24), 7)  # the user fixes one of the two
    unchanged = out.read_bytes()
    plain = run_batch(model, collect_images([photos]), out, prompt=PROMPT, generation=GREEDY_SHORT)
    assert (plain.done, plain.skipped_already_done, plain.failed) == (0, 3, 0) and out.read_bytes() == unchanged

    retry = run_batch(model, collect_images([photos]), out, prompt=PROMPT, generation=GREEDY_SHORT,
                      retry_failed=True)
    assert (retry.done, retry.skipped_already_done, retry.failed, retry.retried) == (1, 1, 1, 2)
    records = read_records(out)
    assert out.read_bytes().startswith(unchanged), "append-only: earlier records stay as they were"
    assert len(records) == 5
    latest = latest_by_path(records)
    assert latest["e-corrupt.png"]["answer"] is not None and latest["f-text.jpg"]["error"] is not None

    # the latest record wins: the fixed image is done now, only the still-broken one is tried again
    again = run_batch(model, collect_images([photos]), out, prompt=PROMPT, generation=GREEDY_SHORT,
                      retry_failed=True)
    assert (again.done, again.skipped_already_done, again.failed, again.retried) == (0, 2, 1, 1)
    # another prompt has its own records: nothing failed for it, everything is new
    other = run_batch(model, [photos / "a.png"], out, prompt="Colours?", generation=GREEDY_SHORT, retry_failed=True)
    assert (other.done, other.retried) == (1, 0)


def test_cli_batch_says_how_to_retry_and_retries(model_files, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    inputs = [str(folder / "a.png"), str(folder / "f-text.jpg")]
    result = invoke(*inputs, "--jsonl", str(out), "--model", str(model_files[0]))
    assert result.exit_code == 0, result.output
    assert "1 image failed; its error is in" in result.output
    assert "fix it and re-run with --retry-failed" in result.output

    retried = invoke(*inputs, "--jsonl", str(out), "--model", str(model_files[0]), "--retry-failed")
    assert retried.exit_code == 1, retried.output  # every image tried failed again
    assert "0 described, 1 already done, 1 failed (1 retried)" in retried.output
    assert "Error: the image failed; its error is in" in retried.output
    assert len(read_records(out)) == 3
