"""`pixtral-cpp info`: what a GGUF pair is, read from the headers alone (no model, no llama.cpp)."""

from __future__ import annotations

import click

from pixtral_cpp.cli.formatting import format_pair_info


@click.command()
@click.argument("model")
@click.option("--mmproj", help="Vision projector GGUF (default: the mmproj-*.gguf beside the model).")
def info(model: str, mmproj: str | None) -> None:
    """What a GGUF pair is: types, sizes, hyper-parameters, and whether the two files match."""
    from pixtral_cpp.model_files import find_model_files, inspect_pair

    pair = inspect_pair(find_model_files(model, mmproj))
    click.echo(format_pair_info(pair))
    if not pair.matches:
        raise click.ClickException("the files do not work together: " + "; ".join(pair.problems))
