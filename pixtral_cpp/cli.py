"""The `pixtral-cpp` command line: parsing and printing over the library's public API."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from pixtral_cpp import __version__
from pixtral_cpp.cli_format import format_pair_info
from pixtral_cpp.cli_options import ModelArgs, load_model, model_options
from pixtral_cpp.errors import PixtralError
from pixtral_cpp.valid_text import check_text

RAISE_ENV = "PIXTRAL_CPP_RAISE_ERRORS"  # set to 1 to see full tracebacks


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so the same cleanup runs (a chat stops instead of going on)."""


class _Group(click.Group):
    """Turns the library's domain errors into one-line messages (exit 1), in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PixtralError as exc:
            if os.environ.get(RAISE_ENV):
                raise
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt as exc:
            by = " by SIGTERM" if isinstance(exc, Terminated) else ""
            raise click.ClickException(f"interrupted{by}; nothing half-written was left behind") from None


@click.group(cls=_Group)
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


@main.command()
@click.argument("source")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the two GGUF files go (default: the models folder the runtime looks in).")
@click.option("--quant", default="Q4_K_M", show_default=True,
              help="Text model type: F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_M Q4_0 Q5_0 ...")
@click.option("--mmproj-quant", default="F16", show_default=True, help="Vision projector type: F32 F16 BF16 Q8_0.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, tensors, sizes, disk needed) and stop.")
@click.option("--threads", type=click.IntRange(min=1), help="Quantizer threads (default: all cores).")
@click.option("--context-length", type=click.IntRange(min=1), help="Training context written into the GGUF.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def convert(source: str, output_dir: Path | None, quant: str, mmproj_quant: str, force: bool, dry_run: bool,
            threads: int | None, context_length: int | None, revision: str | None, quiet: bool) -> None:
    """Convert a Pixtral checkpoint (folder or hub repo id) into a text GGUF and an mmproj GGUF."""
    from pixtral_cpp.cli_progress import TerminalProgress
    from pixtral_cpp.convert import ConvertOptions, NullProgress, convert_checkpoint, plan_conversion

    options = ConvertOptions(source=source, output_dir=output_dir, quant=quant, mmproj_quant=mmproj_quant,
                             force=force, threads=threads, context_length=context_length, revision=revision)
    if dry_run:
        click.echo(plan_conversion(options).describe())
        return
    result = convert_checkpoint(options, NullProgress() if quiet else TerminalProgress())
    click.echo(f"text model  {result.text_path}")
    click.echo(f"mmproj      {result.mmproj_path}")
    if not quiet:
        click.echo(f"done in {result.seconds:.1f} s", err=True)


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("-p", "--prompt", default="Describe this image in detail.", show_default=True)
@model_options
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.3, show_default=True)
@click.option("--seed", type=int, help="Sampling seed, for repeatable answers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the answer and statistics.")
@click.option("--schema", type=click.File("r"), help="JSON schema file: the answer is JSON that follows it.")
@click.pass_context
def describe(ctx: click.Context, images: tuple[str, ...], prompt: str, model_args: ModelArgs, max_tokens: int,
             temperature: float, seed: int | None, as_json: bool, schema: Any) -> None:
    """Answer one question about one or more images, streaming the answer."""
    from pixtral_cpp.options import GenerationOptions
    from pixtral_cpp.results import TextChunk

    check_text(prompt, "the prompt")  # before loading the model
    schema_dict = _read_schema(schema) if schema else None
    generation = GenerationOptions(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   json_schema=schema_dict)
    with load_model(ctx, model_args) as pixtral:
        if as_json:
            result = pixtral.describe(list(images), prompt, generation)
            click.echo(json.dumps({"answer": result.text, "stats": result.stats.to_dict(),
                                   "load_seconds": round(pixtral.load_seconds, 3)}, ensure_ascii=False))
            return
        for chunk in pixtral.stream_describe(list(images), prompt, generation):
            if isinstance(chunk, TextChunk):
                click.echo(chunk.text, nl=False)
        click.echo()


def _read_schema(handle: Any) -> dict[str, Any]:
    try:
        schema = json.load(handle)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--schema") from None
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                                 param_hint="--schema") from None
    if not isinstance(schema, dict):
        raise click.BadParameter("a JSON schema must be an object", param_hint="--schema")
    return schema


@main.command()
@click.argument("images", nargs=-1)
@model_options
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.3, show_default=True)
@click.option("--seed", type=int, help="Sampling seed, for repeatable answers.")
@click.pass_context
def chat(ctx: click.Context, images: tuple[str, ...], model_args: ModelArgs, system: str | None, max_tokens: int,
         temperature: float, seed: int | None) -> None:
    """Talk about images interactively; IMAGES go with your first message."""
    from pixtral_cpp.cli_chat import run_chat
    from pixtral_cpp.options import GenerationOptions

    if system is not None:
        check_text(system, "the system prompt")  # before loading the model
    generation = GenerationOptions(max_tokens=max_tokens, temperature=temperature, seed=seed)
    with load_model(ctx, model_args) as pixtral:
        run_chat(pixtral, list(images), generation, system, read_line=_read_line)


def _read_line() -> str:
    """A line typed at the terminal (with line editing), or read from a pipe without '> ' in the output."""
    if sys.stdin.isatty():
        return input("> ")
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


@main.command()
@click.argument("model")
@click.option("--mmproj", help="Vision projector GGUF (default: the mmproj-*.gguf beside the model).")
def info(model: str, mmproj: str | None) -> None:
    """What a GGUF pair is: types, sizes, hyper-parameters, and whether the two files match."""
    from pixtral_cpp.model_files import find_model_files, inspect_pair

    pair = inspect_pair(find_model_files(model, mmproj))
    click.echo(format_pair_info(pair))
    if not pair.matches:
        raise click.ClickException("the files do not work together: " + "; ".join(pair.problems))


def _register_optional_commands() -> None:
    from pixtral_cpp.cli_backend import backend
    from pixtral_cpp.cli_batch import batch
    from pixtral_cpp.cli_doctor import doctor
    from pixtral_cpp.cli_serve import serve

    for command in (backend, batch, doctor, serve):
        main.add_command(command)


_register_optional_commands()

if __name__ == "__main__":
    main()
