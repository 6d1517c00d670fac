"""`pixtral-cpp models`: what can run here without a download; `pixtral-cpp models rm NAME` removes one."""

from __future__ import annotations

import sys

import click

from pixtral_cpp.formatting import format_bytes


@click.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """The models available here (converted, pulled, in the Hugging Face cache); `models rm NAME` removes one.

    RUNS says whether the pair a run takes works as is (ok), faithfully with a correction pixtral-cpp makes at
    load (corrected), or not (no); the line after the table says which correction or why not."""
    if ctx.invoked_subcommand is None:
        list_models()


def list_models() -> None:
    from pixtral_cpp.local_models import list_local_models

    found = list_local_models()
    if not found:
        from pixtral_cpp.defaults import DEFAULT_HUB_MODEL

        click.echo(f"no models here; `pixtral-cpp pull {DEFAULT_HUB_MODEL}` downloads one")
        return
    rows = [("NAME", "QUANTIZATIONS", "SIZE", "RUNS", "WHERE")]
    rows += [(m.name, ",".join(m.quants), format_bytes(m.size_bytes), m.runs, str(m.where)) for m in found]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])
    for m in found:
        if m.problem is not None or m.correction is not None:
            click.echo(f"{m.name}: {m.problem or m.correction}")


@models.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Remove without asking.")
def remove(name: str, yes: bool) -> None:
    """Remove one model: a converted model's files, or a repo from the Hugging Face cache (all its revisions)."""
    from pixtral_cpp.local_models import find_local_model, list_local_models, remove_local_model

    model = find_local_model(name, list_local_models())
    what = f"{model.name} ({model.kind}, {format_bytes(model.size_bytes)}, {model.where})"
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(f"removing {what} needs confirmation: add --yes")
        click.confirm(f"Remove {what}?", abort=True, err=True)
    removal = remove_local_model(model)
    click.echo(f"removed {model.name}: {format_bytes(removal.freed_bytes)} freed")
