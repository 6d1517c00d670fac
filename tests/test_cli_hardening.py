"""The command line against an unlucky user: undecodable text, odd terminals, pipes, SIGTERM, bad images
in a chat. Each ends in one line (or goes on), never in a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage

from pixtral_cpp.cli import main
from pixtral_cpp.cli.chat import run_chat
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import GenerationOptions

EXE = str(Path(sys.executable).with_name("pixtral-cpp"))
SHORT = ("--max-tokens", "2", "--temperature", "0", "--ctx", "2048")


@pytest.fixture(scope="module")
def model_path(pair) -> str:
    return str(pair[0])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def run(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def assert_one_error_line(output: str, problem: str) -> None:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and problem in errors[0], output


# -- text that is not valid UTF-8 -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["describe", "batch"])
def test_an_undecodable_prompt_is_one_line_before_loading(command, photo, tmp_path):
    # argv bytes that are not UTF-8 reach Python surrogate-escaped: b"ok\xff" is "ok\udcff"
    extra = ["--jsonl", str(tmp_path / "out.jsonl")] if command == "batch" else []
    result = run(command, str(photo), "-p", "ok\udcff", *extra, "--model", str(tmp_path / "no-model.gguf"))
    assert result.exit_code == 1
    # the prompt is checked first: the missing model is not even looked for
    assert_one_error_line(result.output, "the prompt is not valid UTF-8 (byte 0xff at position 2); "
                                         "check your terminal's")


def test_an_invalid_system_prompt_is_one_line(tmp_path):
    result = run("chat", "--system", "\ud800", "--model", str(tmp_path / "no-model.gguf"))
    assert result.exit_code == 1
    assert_one_error_line(result.output, "the system prompt holds a lone surrogate U+D800 at position 0")


def test_a_schema_file_that_is_not_text_or_holds_bad_text(photo, tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"enum": ["caf\xe9"]}')
    result = run("describe", str(photo), "--schema", str(tmp_path / "latin1.json"))
    assert result.exit_code == 2 and "not UTF-8 text (byte 0xe9 at offset 14)" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "lone.json").write_text('{"enum": ["\\ud800"]}')
    result = run("describe", str(photo), "--schema", str(tmp_path / "lone.json"))
    assert result.exit_code == 1
    assert_one_error_line(result.output, "the JSON schema['enum'][0] holds a lone surrogate U+D800")


def test_real_bytes_argv_exits_with_one_line(photo):
    proc = subprocess.run([EXE.encode(), b"describe", bytes(photo), b"-p", b"caf\xe9 \xff"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        "Error: the prompt is not valid UTF-8 (byte 0xe9 at position 3); check your terminal's or file's encoding"]


def test_chat_skips_an_undecodable_line_and_goes_on(model_path):
    result = run("chat", "--model", model_path, *SHORT, input=b"hi \xff there\nhello\n")
    assert result.exit_code == 0, result.output
    assert_one_error_line(result.output, "your message is not valid UTF-8 (byte 0xff at position 3)")
    assert "> " not in result.output, "piped input: no prompt noise"


# -- odd terminals and pipes -----------------------------------------------------------------------------


def test_an_answer_the_terminal_cannot_encode_is_escaped(model_path, tmp_path):
    folder = tmp_path / "日本"
    folder.mkdir()
    for name in Path(model_path).parent.iterdir():
        os.symlink(name, folder / name.name)
    proc = subprocess.run([EXE, "info", str(folder / Path(model_path).name)], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    assert proc.returncode == 0, proc.stderr
    assert b"\\u65e5\\u672c" in proc.stdout and b"Traceback" not in proc.stderr


def test_a_closed_pipe_is_a_quiet_exit(model_path):
    proc = subprocess.Popen([EXE, "info", model_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that stopped reading
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr


def test_piped_chat_has_no_prompt_noise_and_ends_at_eof(model_path, photo):
    proc = subprocess.run([EXE, "chat", "--model", model_path, *SHORT], input=f"hi\n/image {photo}\n".encode(),
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert b">" not in proc.stdout and b"attached photo.png" in proc.stderr
    assert b"Traceback" not in proc.stderr


# -- chat and bad images ---------------------------------------------------------------------------------


def test_chat_refuses_a_non_image_at_attach_time(model_path, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture\n")
    result = run("chat", "--model", model_path, *SHORT, input=f"/image {tmp_path / 'notes.png'}\n/image\nhi\n")
    assert result.exit_code == 0, result.output
    assert "notes.png" in result.output and "(not attached)" in result.output
    assert "/image needs a path" in result.output and "attached notes.png" not in result.output


def reader(*lines: str, before: dict | None = None):
    """A read_line for run_chat: these lines, then end of input; `before[line]()` runs before a line."""
    queue = iter(lines)

    def read_line() -> str:
        line = next(queue, None)
        if line is None:
            raise EOFError
        (before or {}).get(line, lambda: None)()
        return line

    return read_line


def test_chat_drops_an_image_that_fails_and_says_so(pair, photo, tmp_path, capsys):
    image = tmp_path / "photo.png"
    image.write_bytes(photo.read_bytes())
    # the file changes on disk after it was attached
    read_line = reader(f"/image {image}", "What is it?", "And now?",
                       before={"What is it?": lambda: image.write_bytes(b"\x89PNG\r\n\x1a\n broken")})
    with PixtralModel.load(*pair, n_ctx=2048) as model:
        run_chat(model, [], GenerationOptions(max_tokens=2, temperature=0), None, read_line)
        encoded = model.images_encoded
    err = capsys.readouterr().err
    assert "(attached photo.png to your next message)" in err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "photo.png" in errors[0], err
    assert errors[0].endswith("(the image was dropped; attach another with /image PATH)")
    assert encoded == 0, "the next message was answered without the dropped image"


def test_chat_drops_an_image_too_big_for_the_context(pair, tmp_path, capsys):
    big = tmp_path / "big.png"
    PILImage.fromarray(np.zeros((320, 320, 3), np.uint8)).save(big)  # 20 x 21 positions > 256
    with PixtralModel.load(*pair, n_ctx=256) as model:
        run_chat(model, [], GenerationOptions(max_tokens=2, temperature=0), None,
                 reader(f"/image {big}", "What is it?", "Hello"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "context holds 256" in errors[0] and "the image was dropped" in errors[0], err


# -- SIGTERM ---------------------------------------------------------------------------------------------


def test_sigterm_during_convert_cleans_up_like_ctrl_c(tiny_native, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([EXE, "convert", str(tiny_native), "-o", str(out), "--quant", "Q4_K_M", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert stderr.decode().splitlines() == ["Error: interrupted by SIGTERM; nothing half-written was left behind"]
    assert sorted(p.name for p in out.iterdir()) == [], "no .partial and no finished-looking file"


def test_the_sigterm_handler_lasts_only_as_long_as_the_command(model_path):
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    original_info = main.commands["info"].callback

    def spy(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return original_info(*args, **kwargs)

    main.commands["info"].callback = spy
    try:
        assert run("info", model_path).exit_code == 0
    finally:
        main.commands["info"].callback = original_info
    assert seen and seen[0] is not before, "SIGTERM must unwind like Ctrl-C while the command runs"
    assert signal.getsignal(signal.SIGTERM) is before, "the CLI must not leave its handler behind"


def test_sigterm_ends_a_waiting_chat_with_one_line(model_path):
    proc = subprocess.Popen([EXE, "chat", "--model", model_path, *SHORT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr.readline().startswith(b"Commands:")  # loaded, now waiting for a line
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    # a chat writes no file, so it does not speak of half-written ones (issue 10)
    assert stderr.decode().splitlines() == ["Error: interrupted by SIGTERM"]


# -- serve options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, problem", [(" ", "the API key must not be empty"),
                                          ("ab\x01cd", "the API key holds a control character")])
def test_an_unusable_api_key_is_one_line_before_loading(key, problem, tmp_path):
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "no-model.gguf")],
                                env={"PIXTRAL_CPP_API_KEY": key})
    assert result.exit_code == 1
    assert_one_error_line(result.output, problem)  # not "no model at ...": the key is checked first
