"""`pixtral-cpp pull user/repo[@REVISION][:QUANT]`: a GGUF pair from the hub into the Hugging Face cache, checked."""

from __future__ import annotations

import time

import click

from pixtral_cpp.cli.progress import TerminalProgress
from pixtral_cpp.defaults import DEFAULT_HUB_MODEL
from pixtral_cpp.formatting import format_bytes


class DownloadProgress(TerminalProgress):
    """TerminalProgress with the speed: one redrawn line per file on a terminal, one summary line on a pipe."""

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.interactive or (not force and now - self.last_draw < 0.1):
            return
        self.last_draw = now
        fraction = min(self.done / self.total, 1.0)
        elapsed = max(now - self.started, 1e-6)
        speed = f"{format_bytes(self.done / elapsed)}/s" if self.done else ""
        eta = f"ETA {elapsed * (1 - fraction) / fraction:5.0f} s" if 0 < fraction < 1 else " " * 11
        line = (f"\r{self.label:<36.36} [{'#' * int(fraction * 24):<24}] {self._amount(self.done):>9}/"
                f"{self._amount(self.total):<9} {speed:>11} {eta}")
        click.echo(line, file=self.stream, nl=False)

    def end(self) -> None:
        if self.interactive:
            super().end()
            return
        seconds = max(time.monotonic() - self.started, 1e-6)
        click.echo(f"{self.label}: {self._amount(self.total)} in {seconds:.1f} s "
                   f"({format_bytes(self.total / seconds)}/s)", file=self.stream)


@click.command()
@click.argument("spec", metavar="USER/REPO[@REVISION][:QUANT]", default=DEFAULT_HUB_MODEL)
@click.option("--mmproj-quant", help="Which projector when the repo offers several (default: F16, BF16, F32, Q8_0).")
def pull(spec: str, mmproj_quant: str | None) -> None:
    """Download a GGUF pair from the Hugging Face hub (text model and mmproj) and check it."""
    from pixtral_cpp.hub_models import pull as pull_pair

    pulled = pull_pair(spec, mmproj_quant=mmproj_quant, progress=DownloadProgress())
    for note in pulled.notes:
        click.echo(note, err=True)
    plan, info = pulled.plan, pulled.info
    source = "from the local cache" if plan.listing.from_cache else f"at {plan.listing.commit or plan.listing.revision}"
    got = f"downloaded {format_bytes(pulled.downloaded_bytes)}" if pulled.downloaded_bytes else "already in the cache"
    click.echo(f"{plan.spec.repo_id} {source}: {got}")
    click.echo(f"text model  {pulled.files.text}  ({info.text.file_type}, {format_bytes(info.text.size_bytes)})")
    click.echo(f"mmproj      {pulled.files.mmproj}  ({info.vision.file_type}, {format_bytes(info.vision.size_bytes)})")
    click.echo(f"ready: pixtral-cpp describe IMAGE --model {spec}")
