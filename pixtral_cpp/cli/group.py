"""The `pixtral-cpp` group: commands loaded only when they run, domain errors and signals in one place.

Each command lives in its own module of this package; the table below names it and carries its short
help, so `pixtral-cpp --help` lists every command without importing one (the model, the converter and
llama.cpp stay unloaded until a command needs them).
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import click

from pixtral_cpp import __version__
from pixtral_cpp.errors import PixtralError

RAISE_ENV = "PIXTRAL_CPP_RAISE_ERRORS"  # set to 1 to see full tracebacks


@dataclass(frozen=True)
class CommandSpec:
    """Where a command is defined ("module:attribute") and its docstring's first sentence, for `--help`
    (tests/test_cli_startup.py checks both against the command itself)."""

    target: str
    short_help: str
    writes_files: bool = False  # an interruption is worth a word on what it left on disk

    def load(self) -> click.Command:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


COMMANDS: dict[str, CommandSpec] = {
    "backend": CommandSpec("pixtral_cpp.cli.backend:backend",
                           "What the installed llama.cpp can do (default), or rebuild it for CPU, Metal, CUDA or "
                           "Vulkan."),
    "cache": CommandSpec("pixtral_cpp.cli.cache:cache",
                         "The prompt cache on disk: its folder, size and entries; `cache clear` empties it."),
    "batch": CommandSpec("pixtral_cpp.cli.batch:batch",
                         "Describe each image of INPUTS (folders, image files) on its own: one JSON line per "
                         "image.", writes_files=True),
    "chat": CommandSpec("pixtral_cpp.cli.chat:chat",
                        "Talk about images interactively; IMAGES go with your first message."),
    "convert": CommandSpec("pixtral_cpp.cli.convert:convert",
                           "Convert a Pixtral checkpoint (folder or hub repo id) into a text GGUF and an mmproj "
                           "GGUF.", writes_files=True),
    "describe": CommandSpec("pixtral_cpp.cli.describe:describe",
                            "Answer one question about one or more images, streaming the answer."),
    "doctor": CommandSpec("pixtral_cpp.cli.doctor:doctor",
                          "Check the installation offline: backend, convert and run a tiny random Pixtral (a few "
                          "seconds)."),
    "fix": CommandSpec("pixtral_cpp.cli.fix:fix",
                       "Write a corrected copy of a GGUF pair (missing [IMG_BREAK], wrong image std, missing "
                       "context length).", writes_files=True),
    "info": CommandSpec("pixtral_cpp.cli.info:info",
                        "What a GGUF pair is: types, sizes, hyper-parameters, and whether the two files match."),
    "models": CommandSpec("pixtral_cpp.cli.models:models",
                          "The models available here (converted, pulled, in the Hugging Face cache); `models rm "
                          "NAME` removes one."),
    "pull": CommandSpec("pixtral_cpp.cli.pull:pull",
                        "Download a GGUF pair from the Hugging Face hub (text model and mmproj) and check it.",
                        writes_files=True),
    "serve": CommandSpec("pixtral_cpp.cli.serve:serve",
                         "Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, "
                         "/health)."),
}


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's command table that imports a command's module on first access."""

    def __init__(self, specs: dict[str, CommandSpec]) -> None:
        self.specs = specs
        self.loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self.loaded:
            if name not in self.specs:
                raise KeyError(name)
            self.loaded[name] = self.specs[name].load()
        return self.loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self.loaded[name] = command

    def __delitem__(self, name: str) -> None:
        self.loaded.pop(name, None)
        self.specs = {key: spec for key, spec in self.specs.items() if key != name}

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self.specs, *self.loaded]))

    def __len__(self) -> int:
        return len(set(self.specs) | set(self.loaded))


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so the same cleanup runs (a chat stops instead of going on)."""


class LazyGroup(click.Group):
    """Loads a command when it runs; turns the library's domain errors into one-line messages (exit 1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table: `--help` imports no command module."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))  # as click lays out its own list
        rows = [(name, self._short_help(name, limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def _short_help(self, name: str, limit: int) -> str:
        if name not in COMMANDS:  # one added with add_command
            return self.commands[name].get_short_help_str(limit)
        # shortened by click's own rule, on a stand-in that costs nothing to build
        return click.Command(name, help=COMMANDS[name].short_help).get_short_help_str(limit)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PixtralError as exc:
            if os.environ.get(RAISE_ENV):
                raise
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt as exc:
            raise click.ClickException(interrupted_message(ctx.invoked_subcommand, exc)) from None


def interrupted_message(command: str | None, exc: KeyboardInterrupt) -> str:
    """What an interrupted command says; only the commands that write files speak of them."""
    message = "interrupted by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
    spec = COMMANDS.get(command or "")
    if spec is not None and spec.writes_files:
        message += "; nothing half-written was left behind"
    return message


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="pixtral-cpp")
@click.option("-v", "--verbose", is_flag=True, help="Show what the library and llama.cpp log.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Run Mistral's Pixtral 12B on llama.cpp: convert checkpoints, describe images, chat."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _tolerate_odd_text_streams()
    if ctx.invoked_subcommand != "serve":  # uvicorn shuts down gracefully on SIGTERM by itself
        _interrupt_on_sigterm(ctx)


def _tolerate_odd_text_streams() -> None:
    """An answer the terminal cannot encode (LANG=C, PYTHONIOENCODING=ascii) is printed with \\x escapes
    instead of ending in a traceback; undecodable input arrives surrogate-escaped, so a chat refuses that
    one line (pixtral_cpp.valid_text) and goes on, and a file name typed after /image stays exact."""
    for stream, errors in ((sys.stdout, "backslashreplace"), (sys.stdin, "surrogateescape")):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors=errors)


def _interrupt_on_sigterm(ctx: click.Context) -> None:
    """SIGTERM (kill, a service manager) unwinds like Ctrl-C, so the library's cleanup runs: convert
    removes its .partial files, batch leaves its file valid. The handler lasts as long as the command."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may install handlers (e.g. a CliRunner in a worker thread)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated
