"""`pixtral-cpp fix`: a corrected copy of a GGUF pair that others converted (docs/others-ggufs.md)."""

from __future__ import annotations

from pathlib import Path

import click

from pixtral_cpp.cli.progress import TerminalProgress


@click.command()
@click.argument("model")
@click.option("--mmproj", help="Vision projector GGUF (default: the mmproj-*.gguf beside the model).")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the corrected pair goes (not the folder of the source files).")
@click.option("--keep-template", is_flag=True, help="Keep the file's chat template instead of pixtral-cpp's.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def fix(model: str, mmproj: str | None, output_dir: Path, keep_template: bool, force: bool, quiet: bool) -> None:
    """Write a corrected copy of a GGUF pair (missing [IMG_BREAK], wrong image std, missing context length)."""
    from pixtral_cpp.convert import NullProgress
    from pixtral_cpp.fix_pair import fix_pair
    from pixtral_cpp.model_files import find_model_files

    result = fix_pair(find_model_files(model, mmproj), output_dir, force=force, keep_template=keep_template,
                      progress=NullProgress() if quiet else TerminalProgress())
    for correction in result.corrections or ("nothing to correct: the files are copied as they are",):
        click.echo(f"- {correction}")
    click.echo(f"text model  {result.text_path}")
    click.echo(f"mmproj      {result.mmproj_path}")
