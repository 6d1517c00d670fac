"""`pixtral-cpp pull user/repo[@REVISION][:QUANT]`: a GGUF pair from the hub into the Hugging Face cache, checked."""

from __future__ import annotations

import click

from pixtral_cpp.cli.progress import TerminalProgress
from pixtral_cpp.defaults import DEFAULT_HUB_MODEL
from pixtral_cpp.formatting import format_bytes


@click.command()
@click.argument("spec", metavar="USER/REPO[@REVISION][:QUANT]", default=DEFAULT_HUB_MODEL)
@click.option("--mmproj-quant", help="Which projector when the repo offers several (default: F16, BF16, F32, Q8_0).")
def pull(spec: str, mmproj_quant: str | None) -> None:
    """Download a GGUF pair from the Hugging Face hub (text model and mmproj) and check it."""
    from pixtral_cpp.hub_models import pull as pull_pair

    pulled = pull_pair(spec, mmproj_quant=mmproj_quant, progress=TerminalProgress(show_speed=True))
    for note in pulled.notes:
        click.echo(note, err=True)
    plan, info = pulled.plan, pulled.info
    source = "from the local cache" if plan.listing.from_cache else f"at {plan.listing.commit or plan.listing.revision}"
    got = f"downloaded {format_bytes(pulled.downloaded_bytes)}" if pulled.downloaded_bytes else "already in the cache"
    click.echo(f"{plan.spec.repo_id} {source}: {got}")
    click.echo(f"text model  {pulled.files.text}  ({info.text.file_type}, {format_bytes(info.text.size_bytes)})")
    click.echo(f"mmproj      {pulled.files.mmproj}  ({info.vision.file_type}, {format_bytes(info.vision.size_bytes)})")
    click.echo(f"ready: pixtral-cpp describe IMAGE --model {spec}")
