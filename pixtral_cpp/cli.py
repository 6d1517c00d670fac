"""The `pixtral-cpp` command line: parsing and printing over the library's public API."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from pixtral_cpp import __version__
from pixtral_cpp.errors import PixtralError

RAISE_ENV = "PIXTRAL_CPP_RAISE_ERRORS"  # set to 1 to see full tracebacks


class _Group(click.Group):
    """Turns the library's domain errors into one-line messages (exit 1), in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PixtralError as exc:
            if os.environ.get(RAISE_ENV):
                raise
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; nothing half-written was left behind") from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="pixtral-cpp")
@click.option("-v", "--verbose", is_flag=True, help="Show what the library and llama.cpp log.")
def main(verbose: bool) -> None:
    """Run Mistral's Pixtral 12B on llama.cpp: convert checkpoints, describe images, chat."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


@main.command()
@click.argument("source")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the two GGUF files go (default: the models folder the runtime looks in).")
@click.option("--quant", default="Q4_K_M", show_default=True,
              help="Text model type: F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_M Q4_0 Q5_0 ...")
@click.option("--mmproj-quant", default="F16", show_default=True, help="Vision projector type: F32 F16 BF16 Q8_0.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, tensors, sizes, disk needed) and stop.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for llama.cpp's quantizer.")
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


if __name__ == "__main__":
    main()
