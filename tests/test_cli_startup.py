"""The command line starts in a blink: `pixtral-cpp --help` and `info` import no model, converter, server or
llama.cpp, each command sits behind a correct entry of the lazy table, and the defaults are the library's."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from pixtral_cpp.cli import main
from pixtral_cpp.cli.group import COMMANDS

# Loaded only by the commands that need them (and never by `--help` or `info`).
HEAVY = ("pixtral_cpp.model", "pixtral_cpp.convert", "pixtral_cpp.server", "pixtral_cpp.backend",
         "pixtral_cpp.images", "llama_cpp", "torch", "transformers", "starlette", "uvicorn")
# `import gguf` brings numpy and, through gguf.vocab, mistral_common and PIL: `info` needs gguf, `--help` not.
NOT_FOR_HELP = (*HEAVY, "numpy", "gguf", "mistral_common", "PIL")

# Runs the CLI as the entry point does, then prints the modules it left loaded.
PROBE = """
import json, runpy, sys
sys.argv = ["pixtral-cpp", *json.loads(sys.argv[1])]
try:
    runpy.run_module("pixtral_cpp.cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
sys.stdout.flush()
print("\\nMODULES", json.dumps(sorted(sys.modules)))
"""


def modules_loaded_by(*argv: str) -> set[str]:
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                         timeout=120)
    assert "Traceback" not in run.stderr, run.stderr
    return set(json.loads(run.stdout.rsplit("\nMODULES ", 1)[1]))


def loaded(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == root or m.startswith(root + ".") for root in roots))


def test_importing_the_cli_loads_no_heavy_module():
    code = "import json, sys, pixtral_cpp.cli; print(json.dumps(sorted(sys.modules)))"
    modules = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout))
    assert loaded(modules, NOT_FOR_HELP) == []
    assert loaded(modules, ("pixtral_cpp",)) == ["pixtral_cpp", "pixtral_cpp.cli", "pixtral_cpp.cli.group",
                                                  "pixtral_cpp.errors"]


def test_help_loads_no_command_module():
    modules = modules_loaded_by("--help")
    assert loaded(modules, NOT_FOR_HELP) == []
    assert [m for m in loaded(modules, ("pixtral_cpp.cli",)) if m.count(".") == 2] == ["pixtral_cpp.cli.group"]


def test_info_reads_headers_without_model_converter_or_llama_cpp(pair):
    text, mmproj = pair
    modules = modules_loaded_by("info", str(text), "--mmproj", str(mmproj))
    assert "pixtral_cpp.model_files" in modules, "the probe must really have run info"
    # gguf (with what its package imports) is what reading the headers costs today; nothing more may come
    assert loaded(modules, HEAVY) == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_listed_command_is_a_real_command_with_its_own_help(name):
    command = main.commands[name]  # imports the module the table names
    assert isinstance(command, click.Command) and command.name == name
    assert COMMANDS[name].short_help == command.get_short_help_str(limit=1000), "the table's help drifted"
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {name} ")


def test_help_lists_every_command_of_the_table():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:\n", 1)[1].splitlines() if line.strip()]
    assert listed == sorted(COMMANDS)


def test_an_unknown_command_is_a_usage_error_with_a_suggestion():
    result = CliRunner().invoke(main, ["describ"])
    assert result.exit_code == 2
    assert "No such command 'describ'" in result.output and "describe" in result.output


def test_python_dash_m_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "pixtral_cpp.cli", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("pixtral-cpp, version ")


# -- one owner per fact: every default is the library's ----------------------------------------------------


def defaults_of(name: str) -> dict[str, object]:
    return {param.name: param.default for param in main.commands[name].params}


@pytest.mark.parametrize("name", ["describe", "batch"])
def test_generation_defaults_are_the_librarys(name):
    from pixtral_cpp.model import DEFAULT_PROMPT
    from pixtral_cpp.options import GenerationOptions, ModelOptions

    defaults = defaults_of(name)
    assert defaults["prompt"] == DEFAULT_PROMPT
    assert defaults["max_tokens"] == GenerationOptions.max_tokens
    assert defaults["temperature"] == GenerationOptions.temperature
    assert defaults["n_ctx"] == ModelOptions.n_ctx
    assert defaults["max_image_size"] == ModelOptions.max_image_size


def test_chat_defaults_are_the_librarys_but_its_longer_answers():
    from pixtral_cpp.cli.chat import CHAT_MAX_TOKENS
    from pixtral_cpp.options import GenerationOptions, ModelOptions

    defaults = defaults_of("chat")
    assert defaults["max_tokens"] == CHAT_MAX_TOKENS
    assert defaults["temperature"] == GenerationOptions.temperature and defaults["n_ctx"] == ModelOptions.n_ctx


def test_quant_choices_are_the_converters_lists():
    from pixtral_cpp.convert import MMPROJ_TYPES, TEXT_TYPES, ConvertOptions

    params = {param.name: param for param in main.commands["convert"].params}
    assert list(params["quant"].type.choices) == list(TEXT_TYPES)
    assert list(params["mmproj_quant"].type.choices) == list(MMPROJ_TYPES)
    assert params["quant"].default == ConvertOptions.quant
    assert params["mmproj_quant"].default == ConvertOptions.mmproj_quant


def test_quant_names_follow_the_librarys_rule(tiny_hf, tmp_path):
    # any case, as the API accepts; a type that needs an importance matrix says so (exit 1, one line)
    result = CliRunner().invoke(main, ["convert", str(tiny_hf), "-o", str(tmp_path), "--quant", "q8_0",
                                       "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Q8_0" in result.output
    result = CliRunner().invoke(main, ["convert", str(tiny_hf), "-o", str(tmp_path), "--quant", "IQ2_XS"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: IQ2_XS needs an importance matrix")


def test_server_limits_are_server_configs():
    from pixtral_cpp.server import ServerConfig

    config = {field.name: field.default for field in dataclasses.fields(ServerConfig)}
    defaults = defaults_of("serve")
    assert defaults["max_body_mb"] * 1_000_000 == config["max_body_bytes"]
    assert defaults["max_image_pixels"] == config["max_image_pixels"]
    assert defaults["max_images"] == config["max_images_per_request"]
    assert defaults["max_tokens_limit"] == config["max_tokens_limit"]
    assert defaults["max_queued"] == config["max_queued_requests"]
    assert defaults["model_id"] == config["model_id"]
