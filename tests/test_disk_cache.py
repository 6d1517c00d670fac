"""The prompt cache on disk through the whole runtime: a later process restores what an earlier one evaluated,
with the logits of a cold evaluation; whatever changes the state misses; damage and failing disks cost only
the cache, never the answer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from pixtral_cpp import disk_cache
from pixtral_cpp.backend import TextModel, TextModelOptions
from pixtral_cpp.cli import main
from pixtral_cpp.disk_cache import entries
from pixtral_cpp.errors import BackendError, OptionsError
from pixtral_cpp.kv_cache import KVCache
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.results import GenerationStats

# Exact arithmetic (F32 KV cache, no flash attention), as the parity tests use.
OPTIONS = dict(n_ctx=2048, threads=2, kv_cache_type="f32", flash_attn="off")
PARITY = 1e-3  # relative logit error tests/test_runtime_parity.py allows against the same pixels


def picture(seed: int = 0, width: int = 320, height: int = 240) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def answer(pair, folder: Path, image: np.ndarray, question: str = "What is this?", system: str | None = None,
           **options) -> GenerationStats:
    """One answer by a freshly loaded model (as a new process would: nothing in memory)."""
    with PixtralModel.load(pair[0], pair[1], ModelOptions(**{**OPTIONS, "disk_cache_dir": folder, **options})) as m:
        return m.describe(image, question, max_tokens=2, temperature=0, system=system).stats


CHILD = """
import json, sys
import numpy as np
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import ModelOptions
text, mmproj, folder, image, question, out, cache = sys.argv[1:8]
options = ModelOptions(**json.loads(sys.argv[8]), disk_cache=cache == "on", disk_cache_dir=folder)
pixels = np.load(image)
messages = [{"role": "user", "content": [{"type": "image", "image": pixels}, {"type": "text", "text": question}]}]
with PixtralModel.load(text, mmproj, options) as model:
    stats = model.describe(pixels, question, max_tokens=1, temperature=0).stats
    np.save(out, model.prompt_logits(messages))
print(json.dumps(stats.to_dict()))
"""


def in_a_process(pair, folder: Path, image: Path, question: str, out: Path, cache: str = "on") -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(pair[0]), str(pair[1]), str(folder), str(image), question,
                          str(out), cache, json.dumps(OPTIONS)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_a_second_process_answers_from_the_cache_with_a_cold_evaluations_logits(pair, tmp_path):
    image = tmp_path / "photo.npy"
    np.save(image, picture(1))
    folder = tmp_path / "cache"
    first = in_a_process(pair, folder, image, "What is this?", tmp_path / "first.npy")
    assert first["restored_tokens"] == 0 and first["images_encoded"] == 1
    prefix = 2 + first["image_tokens"] - 1  # <s>[INST], the image; its [IMG_END] comes with the question
    assert [e.positions for e in entries(folder)] == [prefix], "written before the first process exited"
    second = in_a_process(pair, folder, image, "And the colours?", tmp_path / "second.npy")
    cold = in_a_process(pair, tmp_path / "unused", image, "And the colours?", tmp_path / "cold.npy", cache="off")
    assert second["restored_tokens"] == prefix and second["images_encoded"] == 0 and second["reused_tokens"] == 0
    assert second["prompt_tokens"] == cold["prompt_tokens"] and cold["images_encoded"] == 1
    assert second["restore_seconds"] > 0
    ours, reference = np.load(tmp_path / "second.npy"), np.load(tmp_path / "cold.npy")
    assert np.abs(ours - reference).max() / np.abs(reference).max() < PARITY
    assert not (tmp_path / "unused").exists()  # --no-cache: nothing written, not even the folder


@pytest.fixture
def own_pair(pair, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny pair that a test may touch."""
    folder = tmp_path / "model"
    folder.mkdir()
    return shutil.copy(pair[0], folder), shutil.copy(pair[1], folder)


def touched(pair, image: np.ndarray) -> tuple:
    os.utime(pair[0], ns=(10**9, 10**9))  # same bytes, another modification time
    return image, None, {}


MISSES = {  # what the second answer changes: (image, system prompt, model options)
    "a touched model file": touched,
    "another image budget": lambda pair, image: (image, None, {"max_image_size": 512}),
    "another image": lambda pair, image: (picture(9, 64, 48), None, {}),
    "other text before the image": lambda pair, image: (image, "You are terse.", {}),
}


@pytest.mark.parametrize("change", sorted(MISSES))
def test_whatever_changes_the_state_misses(own_pair, tmp_path, change):
    image = picture(2, 64, 48)  # under both budgets: the pixels are the same at 512 and 1024 px
    folder = tmp_path / "cache"
    assert answer(own_pair, folder, image).restored_tokens == 0
    assert answer(own_pair, folder, image, "Again?").restored_tokens > 0  # what each case changes is all
    other_image, system, options = MISSES[change](own_pair, image)
    missed = answer(own_pair, folder, other_image, "Again?", system=system, **options)
    assert missed.restored_tokens == 0 and missed.images_encoded == 1


def test_a_long_text_prompt_is_stored_whole_and_its_last_position_evaluated_again(pair, tmp_path):
    folder = tmp_path / "cache"
    long_text = "Tell me about this. " * 40
    messages = [{"role": "user", "content": long_text}]
    with PixtralModel.load(pair[0], pair[1], ModelOptions(**OPTIONS, disk_cache_dir=folder)) as model:
        first = model.chat(messages, max_tokens=1, temperature=0).stats
        cold = model.prompt_logits(messages)
    assert first.restored_tokens == 0 and [e.positions for e in entries(folder)] == [first.prompt_tokens]
    with PixtralModel.load(pair[0], pair[1], ModelOptions(**OPTIONS, disk_cache_dir=folder)) as model:
        again = model.chat(messages, max_tokens=1, temperature=0).stats
        restored = model.prompt_logits(messages)
    assert again.restored_tokens == first.prompt_tokens - 1 and again.reused_tokens == 0
    assert np.abs(restored - cold).max() / np.abs(cold).max() < PARITY


def test_a_follow_up_in_the_same_process_stores_only_what_it_evaluates_at_length(pair, tmp_path):
    folder, image = tmp_path / "cache", picture(7)
    with PixtralModel.load(pair[0], pair[1], ModelOptions(**OPTIONS, disk_cache_dir=folder)) as model:
        first = model.describe(image, "What is this?", max_tokens=3, temperature=0)
        history = [{"role": "user", "content": [{"type": "image", "image": image},
                                                {"type": "text", "text": "What is this?"}]},
                   {"role": "assistant", "content": first.text}]
        short = model.chat([*history, {"role": "user", "content": "And?"}], max_tokens=1).stats
        assert len(entries(folder)) == 1 and short.reused_tokens > first.stats.image_tokens  # the image's only
        long = model.chat([*history, {"role": "user", "content": "Tell me more about it. " * 20}], max_tokens=1)
    assert sorted(e.positions for e in entries(folder))[-1] == long.stats.prompt_tokens


def test_a_short_text_prompt_is_not_stored(pair, tmp_path):
    folder = tmp_path / "cache"
    with PixtralModel.load(pair[0], pair[1], ModelOptions(**OPTIONS, disk_cache_dir=folder)) as model:
        model.chat([{"role": "user", "content": "Hi."}], max_tokens=1)
    assert entries(folder) == []


# -- damage and failing disks cost the cache only ---------------------------------------------------------

def test_a_corrupted_entry_is_ignored_with_a_log_line_removed_and_written_again(pair, tmp_path, caplog):
    folder, image = tmp_path / "cache", picture(3)
    answer(pair, folder, image)
    (entry,) = entries(folder)
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="pixtral_cpp.disk_cache"):
        stats = answer(pair, folder, image, "Again?")
    assert stats.restored_tokens == 0 and stats.images_encoded == 1 and stats.finish_reason in ("length", "stop")
    assert "ignored and removed" in caplog.text and "checksum" in caplog.text
    assert answer(pair, folder, image, "Once more?").restored_tokens > 0  # the answer stored it anew


def test_a_full_disk_skips_storing_and_the_answer_does_not_fail(pair, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(disk_cache, "open_partial", lambda path: open("/dev/full", "wb"))  # noqa: SIM115 - ENOSPC
    with caplog.at_level(logging.WARNING, logger="pixtral_cpp.disk_cache"):
        stats = answer(pair, tmp_path / "cache", picture(4))
    assert stats.generated_tokens > 0 and "No space left on device" in caplog.text
    assert entries(tmp_path / "cache") == []


def test_an_unwritable_cache_folder_skips_storing_and_the_answer_does_not_fail(pair, tmp_path, caplog):
    # A file where the folder should be: unwritable even for root (chmod is not, and tests may run as root).
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    with caplog.at_level(logging.WARNING, logger="pixtral_cpp.disk_cache"):
        stats = answer(pair, blocker, picture(5))
    assert stats.generated_tokens > 0 and "not storing" in caplog.text and blocker.read_text() == "a file"


def test_a_state_llama_cpp_refuses_leaves_the_kv_cache_empty(pair):
    with TextModel(pair[0], TextModelOptions(n_ctx=256, n_batch=32, n_threads=2)) as text:
        kv = KVCache(text)
        kv.append_tokens([1, 3, 50, 51, 4])
        keys, state = kv.snapshot()
        for bad in (bytearray(b"garbage" * 10), state[: len(state) // 2], bytearray()):
            kv.append_tokens([60])
            with pytest.raises(BackendError, match="refused"):
                kv.restore(keys, bad)
            assert kv.keys == () and text.n_past == 0
        kv.restore(keys, state)  # the real one still restores
        assert kv.keys == keys and text.n_past == 5


def test_disk_cache_options_are_checked():
    for bad in ({"disk_cache_max_bytes": 0}, {"disk_cache_max_bytes": True}, {"disk_cache_dir": 5},
                {"disk_cache_dir": " "}):
        with pytest.raises(OptionsError, match="disk_cache"):
            ModelOptions(**bad)


# -- the command line ----------------------------------------------------------------------------------------

def test_no_cache_stores_nothing_and_cache_shows_and_clears_the_entries(pair, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PIXTRAL_CPP_CACHE_DIR", str(folder))
    photo = tmp_path / "photo.png"
    PILImage.fromarray(picture(6)).save(photo)
    describe = ["describe", str(photo), "-m", str(pair[0]), "--mmproj", str(pair[1]), "--max-tokens", "2",
                "--threads", "2", "--ctx", "2048"]
    runner = CliRunner()
    result = runner.invoke(main, [*describe, "--no-cache"])
    assert result.exit_code == 0, result.output
    assert not folder.exists()
    result = runner.invoke(main, [*describe, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["stats"]["restored_tokens"] == 0
    result = runner.invoke(main, [*describe, "--json", "-p", "Colours?"])
    assert json.loads(result.output.splitlines()[-1])["stats"]["restored_tokens"] > 0
    shown = runner.invoke(main, ["cache"])
    (entry,) = entries(folder)
    assert shown.exit_code == 0 and f"{folder}: 1 entry" in shown.output and entry.path.name in shown.output
    cleared = runner.invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1 entry" in cleared.output and entries(folder) == []
    assert "0 entries" in runner.invoke(main, ["cache", "--dir", str(folder)]).output


def test_the_cache_command_loads_no_model_nor_llama_cpp(tmp_path):
    from tests.test_cli_startup import NOT_FOR_HELP, loaded, modules_loaded_by

    modules = modules_loaded_by("cache", "--dir", str(tmp_path))
    assert "pixtral_cpp.disk_cache" in modules and loaded(modules, NOT_FOR_HELP) == []


def test_the_servers_usage_counts_kept_and_restored_positions_as_cached():
    from pixtral_cpp.server.responses import usage

    stats = GenerationStats(prompt_tokens=20, reused_tokens=3, image_tokens=10, images_encoded=0,
                            image_encode_seconds=0.0, prompt_seconds=1.0, generated_tokens=2, generation_seconds=1.0,
                            finish_reason="length", restored_tokens=11)
    assert usage(stats)["prompt_tokens_details"] == {"cached_tokens": 14}
    assert stats.prompt_tokens_per_second == 6.0  # only the 6 positions evaluated
