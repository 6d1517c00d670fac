"""The interactive `pixtral-cpp chat` loop: history and pending images; the model does the rest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from pixtral_cpp.conversation import Image, Message, Text
from pixtral_cpp.errors import PixtralError
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import GenerationStats, TextChunk

HELP = "Commands: /image PATH (attach to your next message), /reset, /quit (or Ctrl-D)."


def run_chat(model: PixtralModel, images: list[str], generation: GenerationOptions, system: str | None,
             read_line: Callable[[], str] = input) -> None:
    """Read messages until end of input; each answer streams, and the cache carries over turns."""
    history: list[Message] = [Message("system", (Text(system),))] if system else []
    pending = [Image(Path(p)) for p in images]
    click.echo(HELP, err=True)
    while True:
        try:
            line = read_line().strip()
        except EOFError:
            click.echo("", err=True)
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
            pending += _attach(line)
            continue
        user = Message("user", (*pending, Text(line)))
        answer = _answer(model, [*history, user], generation)
        if answer is not None:
            history += [user, Message("assistant", (Text(answer),))]
            pending = []


def _attach(line: str) -> list[Image]:
    path = Path(line.removeprefix("/image").strip()).expanduser()
    if not path.is_file():
        click.echo(f"Error: no such image: {path}", err=True)
        return []
    click.echo(f"(attached {path.name} to your next message)", err=True)
    return [Image(path)]


def _answer(model: PixtralModel, messages: list[Message], generation: GenerationOptions) -> str | None:
    """Stream one answer; Ctrl-C stops it and keeps what was said. Errors are reported, not fatal."""
    parts: list[str] = []
    stream = model.stream_chat(messages, generation)
    try:
        for chunk in stream:
            if isinstance(chunk, TextChunk):
                parts.append(chunk.text)
                click.echo(chunk.text, nl=False)
            elif isinstance(chunk, GenerationStats):
                click.echo("")
    except KeyboardInterrupt:
        stream.close()
        click.echo(" [stopped]")
    except PixtralError as exc:
        click.echo(f"Error: {exc}", err=True)
        return None
    return "".join(parts)
