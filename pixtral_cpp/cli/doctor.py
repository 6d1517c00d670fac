"""`pixtral-cpp doctor`: print the self-test's steps as they finish; exit 1 naming the failing one."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pixtral_cpp.doctor import Step, run_doctor


@click.command()
@click.option("--keep", type=click.Path(path_type=Path), metavar="DIR",
              help="Build the tiny model in DIR and keep it (default: a temporary folder, removed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every step.")
def doctor(keep: Path | None, as_json: bool) -> None:
    """Check the installation offline: backend, convert and run a tiny random Pixtral (a few seconds)."""
    report = run_doctor(keep, on_step=None if as_json else _print_step)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        click.echo(f"{'all checks passed' if report.ok else 'FAILED'} in {report.seconds:.1f} s")
    failed = report.failed
    if failed is not None:
        raise click.ClickException(f"doctor: step '{failed.name}' failed: {failed.detail}")


def _print_step(step: Step) -> None:
    mark = "✓" if step.ok else "✗"
    click.echo(f"{mark} {step.name:<16} {step.seconds:6.2f} s  {step.detail}")
