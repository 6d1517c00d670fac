"""`pixtral-cpp convert`: a checkpoint folder or hub repo id into the text GGUF and the mmproj GGUF."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from pixtral_cpp.cli.progress import TerminalProgress
from pixtral_cpp.convert import ConvertOptions, NullProgress, convert_checkpoint, plan_conversion
from pixtral_cpp.convert.quant_types import MMPROJ_TYPES, TEXT_TYPES, QuantType, mmproj_quant, text_quant


class QuantChoice(click.Choice):
    """The library's list of types, looked up by the library's own rule (any case; a type that needs an
    importance matrix says so), so a wrong name is the library's one-line error, as from the API."""

    def __init__(self, names: Iterable[str], lookup: Callable[[str], QuantType]) -> None:
        super().__init__(list(names))  # listed as the library spells them
        self.lookup = lookup

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return self.lookup(str(value)).name


@click.command()
@click.argument("source")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the two GGUF files go (default: the models folder the runtime looks in).")
@click.option("--quant", type=QuantChoice(TEXT_TYPES, text_quant), default=ConvertOptions.quant,
              show_default=True, help="Text model type.")
@click.option("--mmproj-quant", type=QuantChoice(MMPROJ_TYPES, mmproj_quant), default=ConvertOptions.mmproj_quant,
              show_default=True, help="Vision projector type.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, tensors, sizes, disk needed) and stop.")
@click.option("--threads", type=click.IntRange(min=1), help="Quantizer threads (default: all cores).")
@click.option("--context-length", type=click.IntRange(min=1), help="Training context written into the GGUF.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def convert(source: str, output_dir: Path | None, quant: str, mmproj_quant: str, force: bool, dry_run: bool,
            threads: int | None, context_length: int | None, revision: str | None, quiet: bool) -> None:
    """Convert a Pixtral checkpoint (folder or hub repo id) into a text GGUF and an mmproj GGUF."""
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
