"""`pixtral-cpp chat`: the interactive loop keeps history and pending images; the model does the rest."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pixtral_cpp.cli.group import Terminated
from pixtral_cpp.cli.options import ModelArgs, generation_options, load_model, model_options
from pixtral_cpp.conversation import Image, Message, Text
from pixtral_cpp.errors import ContextLengthError, ImageError, PixtralError
from pixtral_cpp.images import load_image
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import GenerationStats, TextChunk
from pixtral_cpp.valid_text import check_text

if TYPE_CHECKING:
    from pixtral_cpp.model import PixtralModel

HELP = "Commands: /image PATH (attach to your next message), /reset, /quit (or Ctrl-D)."
CHAT_MAX_TOKENS = 1024  # a conversation's answers may run longer than the library's one-shot default


@click.command()
@click.argument("images", nargs=-1)
@model_options
@click.option("--system", help="System prompt.")
@generation_options(max_tokens=CHAT_MAX_TOKENS)
def chat(images: tuple[str, ...], model_args: ModelArgs, system: str | None, max_tokens: int,
         temperature: float, seed: int | None) -> None:
    """Talk about images interactively; IMAGES go with your first message."""
    if system is not None:
        check_text(system, "the system prompt")  # before loading the model
    generation = GenerationOptions(max_tokens=max_tokens, temperature=temperature, seed=seed)
    with load_model(model_args) as pixtral:
        run_chat(pixtral, list(images), generation, system, read_line=read_terminal_line)


def read_terminal_line() -> str:
    """A line typed at the terminal (with line editing), or read from a pipe without '> ' in the output."""
    if sys.stdin.isatty():
        return input("> ")
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def run_chat(model: PixtralModel, images: list[str], generation: GenerationOptions, system: str | None,
             read_line: Callable[[], str] = input) -> None:
    """Read messages until end of input; each answer streams, and the cache carries over turns."""
    history: list[Message] = [Message("system", (Text(system),))] if system else []
    pending = [image for path in images for image in _attach(path)]
    click.echo(HELP, err=True)
    while True:
        line = _next_line(read_line)
        if line is None:
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history, pending = history[:1] if system else [], []
            click.echo("(conversation cleared)", err=True)
            continue
        if line.startswith("/image"):
            pending += _attach(line.removeprefix("/image").strip())
            continue
        try:
            check_text(line, "your message")
        except PixtralError as exc:
            click.echo(f"Error: {exc}", err=True)
            continue
        user = Message("user", (*pending, Text(line)))
        try:
            answer = _answer(model, [*history, user], generation)
        except (ImageError, ContextLengthError) as exc:
            click.echo(f"Error: {exc} {_dropped(pending, exc)}", err=True)
            pending = []  # kept, the image would fail every later message too
            continue
        except PixtralError as exc:
            click.echo(f"Error: {exc}", err=True)
            continue
        history += [user, Message("assistant", (Text(answer),))]
        pending = []


def _next_line(read_line: Callable[[], str]) -> str | None:
    """The next line, stripped; None at end of input. A line the terminal's encoding cannot decode is
    reported and skipped (normally such bytes arrive surrogate-escaped and are refused later)."""
    while True:
        try:
            return read_line().strip()
        except EOFError:
            click.echo("", err=True)
            return None
        except UnicodeDecodeError as exc:
            click.echo(f"Error: that line is not valid {exc.encoding} text; check your terminal's encoding",
                       err=True)


def _dropped(pending: list[Image], error: PixtralError) -> str:
    """What became of the images that made the answer fail."""
    if len(pending) == 1:
        return "(the image was dropped; attach another with /image PATH)"
    if pending:
        return f"(the {len(pending)} images of this message were dropped; attach others with /image PATH)"
    if isinstance(error, ImageError):
        return "(an image of an earlier message cannot be read any more; /reset to start over)"
    return "(/reset to start over with an empty conversation)"


def _attach(name: str) -> list[Image]:
    """The image to send with the next message, or nothing when it cannot be read: checked now (one
    decode, a fraction of a second even for a large photo) so a bad file fails here, not every answer."""
    if not name:
        click.echo("Error: /image needs a path, e.g. /image photo.jpg", err=True)
        return []
    path = Path(name).expanduser()
    if not path.is_file():
        click.echo(f"Error: no such image: {path}", err=True)
        return []
    try:
        load_image(path).close()
    except ImageError as exc:
        click.echo(f"Error: {exc} (not attached)", err=True)
        return []
    click.echo(f"(attached {path.name} to your next message)", err=True)
    return [Image(path)]


def _answer(model: PixtralModel, messages: list[Message], generation: GenerationOptions) -> str:
    """Stream one answer; Ctrl-C stops it and keeps what was said, SIGTERM stops it and the chat."""
    parts: list[str] = []
    stream = model.stream_chat(messages, generation)
    try:
        for chunk in stream:
            if isinstance(chunk, TextChunk):
                parts.append(chunk.text)
                click.echo(chunk.text, nl=False)
            elif isinstance(chunk, GenerationStats):
                click.echo("")
    except KeyboardInterrupt as exc:
        stream.close()
        click.echo(" [stopped]")
        if isinstance(exc, Terminated):
            raise  # SIGTERM ends the chat; Ctrl-C only this answer
    return "".join(parts)
