"""`pixtral-cpp batch`: one answer per image into a JSONL file, resumable (see pixtral_cpp.batch)."""

from __future__ import annotations

from pathlib import Path

import click

from pixtral_cpp.cli.options import ModelArgs, generation_options, load_model, model_options
from pixtral_cpp.cli.progress import TerminalProgress
from pixtral_cpp.defaults import DEFAULT_MAX_TOKENS, DEFAULT_PROMPT


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--jsonl", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file, one record per image; re-run with the same file to resume.")
@click.option("-p", "--prompt", default=DEFAULT_PROMPT, show_default=True,
              help="Asked of each image on its own (an image counts as done only for the same prompt).")
@click.option("-r", "--recursive", is_flag=True, help="Look for images in sub-folders too.")
@click.option("--retry-failed", is_flag=True,
              help="Try again the images whose record for this prompt is an error (after fixing them).")
@model_options
@generation_options(max_tokens=DEFAULT_MAX_TOKENS)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def batch(inputs: tuple[str, ...], out: Path, prompt: str, recursive: bool,
          retry_failed: bool, model_args: ModelArgs, max_tokens: int, temperature: float, seed: int | None,
          quiet: bool) -> None:
    """Describe each image of INPUTS (folders, image files) on its own: one JSON line per image.

    Unreadable images are recorded with their error and the batch goes on; exit code 0 unless every
    image tried failed. Interrupt at any time: running the same command again finishes the rest.
    Failed images count as done: fix them and add --retry-failed to try them again.
    """
    from pixtral_cpp.batch import BatchProgress, collect_images, run_batch
    from pixtral_cpp.options import GenerationOptions
    from pixtral_cpp.valid_text import check_text

    check_text(prompt, "the prompt")  # before loading the model
    images = collect_images(inputs, recursive=recursive)  # before loading: a typo fails in a second
    generation = GenerationOptions(max_tokens=max_tokens, temperature=temperature, seed=seed)
    progress = None if quiet else TerminalProgress()
    finished = 0

    def on_progress(update: BatchProgress) -> None:
        nonlocal finished
        finished = update.completed
        if progress is None or update.total == 0:
            return
        if update.record is None:
            progress.begin(f"describing {update.total} images", update.total, unit="images")
        else:
            progress.advance(1)
            if update.completed == update.total:
                progress.end()

    # One image at a time: keeping past embeddings for follow-up questions would only use memory.
    with load_model(model_args, image_cache_size=1) as pixtral:
        try:
            summary = run_batch(pixtral, images, out, prompt=prompt, generation=generation,
                                on_progress=on_progress, retry_failed=retry_failed)
        except KeyboardInterrupt:
            if progress is not None and progress.interactive:
                click.echo(err=True)  # leave the half-drawn bar on its own line
            raise click.ClickException(f"interrupted after {finished} images; {out} holds every finished "
                                       "one: run the same command again to resume") from None
    retried = f" ({summary.retried} retried)" if summary.retried else ""
    click.echo(f"{summary.done} described, {summary.skipped_already_done} already done, "
               f"{summary.failed} failed{retried} in {summary.seconds:.1f} s -> {out}")
    if not summary.failed:
        return
    one = summary.failed == 1
    advice = (f"{'its error is' if one else 'their errors are'} in {out}; fix {'it' if one else 'them'} and "
              "re-run with --retry-failed")
    if not summary.done:
        raise click.ClickException(f"{'the image' if one else f'all {summary.failed} images'} failed; {advice}")
    click.echo(f"{summary.failed} image{'' if one else 's'} failed; {advice}", err=True)
