"""`pixtral-cpp batch`: one answer per image into a JSONL file, resumable (see pixtral_cpp.batch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pixtral_cpp.cli.options import ModelArgs, generation_options, load_model, model_options
from pixtral_cpp.cli.progress import TerminalProgress
from pixtral_cpp.defaults import DEFAULT_MAX_TOKENS, DEFAULT_PROMPT

if TYPE_CHECKING:
    from pixtral_cpp.batch import BatchProgress, BatchSummary
    from pixtral_cpp.options import GenerationOptions

API_KEY_ENV = "PIXTRAL_CPP_API_KEY"  # the variable `serve` reads too: replicas and their batch share one key
# Options that load the model here; with --server the server's own settings decide them.
LOCAL_ONLY = ("mmproj", "mmproj_quant", "yes", "n_ctx", "threads", "gpu_layers", "vision_gpu", "repack_weights",
              "use_mmap", "disk_cache")
REMOTE_ONLY = ("concurrency", "api_key", "timeout")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--jsonl", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file, one record per image; re-run with the same file to resume.")
@click.option("-p", "--prompt", default=DEFAULT_PROMPT, show_default=True,
              help="Asked of each image on its own (an image counts as done only for the same prompt).")
@click.option("-r", "--recursive", is_flag=True, help="Look for images in sub-folders too.")
@click.option("--retry-failed", is_flag=True,
              help="Try again the images whose record for this prompt is an error (after fixing them).")
@click.option("--server", "servers", multiple=True, metavar="URL",
              help="An OpenAI-compatible endpoint to send the images to instead of loading the model "
                   "(repeatable: pixtral-cpp serve replicas, vLLM); --model is then the model id to ask for. "
                   "See docs/scaling.md.")
@click.option("--concurrency", type=click.IntRange(min=1),
              help="Requests in flight per server (default: 1 for pixtral-cpp serve, 8 for others).")
@click.option("--api-key", envvar=API_KEY_ENV, help=f"Key sent to every --server (or ${API_KEY_ENV}).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds one --server answer may take (default: 600).")
@model_options
@generation_options(max_tokens=DEFAULT_MAX_TOKENS)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def batch(ctx: click.Context, inputs: tuple[str, ...], out: Path, prompt: str, recursive: bool,
          retry_failed: bool, servers: tuple[str, ...], concurrency: int | None, api_key: str | None,
          timeout: float | None, model_args: ModelArgs, max_tokens: int, temperature: float, seed: int | None,
          quiet: bool) -> None:
    """Describe each image of INPUTS (folders, image files) on its own: one JSON line per image.

    Unreadable images are recorded with their error and the batch goes on; exit code 0 unless every
    image tried failed. Interrupt at any time: running the same command again finishes the rest.
    Failed images count as done: fix them and add --retry-failed to try them again.
    With --server, the images go to those endpoints (the same file, the same resume rules).
    """
    from pixtral_cpp.batch import collect_images, run_batch
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

    try:
        if servers:
            summary = _run_on_servers(ctx, servers, images, out, prompt, generation, model_args,
                                      concurrency, api_key, timeout, on_progress, retry_failed)
        else:
            _refuse_given(ctx, REMOTE_ONLY, "applies to --server only")
            # One image at a time: keeping past embeddings for follow-up questions would only use memory.
            with load_model(model_args, image_cache_size=1) as pixtral:
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


def _run_on_servers(ctx: click.Context, servers: tuple[str, ...], images: list[Path], out: Path, prompt: str,
                    generation: GenerationOptions, model_args: ModelArgs, concurrency: int | None,
                    api_key: str | None, timeout: float | None, on_progress: Callable[[BatchProgress], None],
                    retry_failed: bool) -> BatchSummary:
    from pixtral_cpp.remote_batch import RemoteOptions, run_remote_batch

    _refuse_given(ctx, LOCAL_ONLY, "is the server's setting, not the batch's: with --server it does nothing")
    remote = RemoteOptions(api_key=api_key or None, model=model_args.model, concurrency=concurrency,
                           max_image_size=model_args.options.max_image_size,
                           **({"timeout": timeout} if timeout is not None else {}))
    summary = run_remote_batch(servers, images, out, prompt=prompt, generation=generation, remote=remote,
                               on_progress=on_progress, on_notice=lambda line: click.echo(line, err=True),
                               retry_failed=retry_failed)
    for report in summary.endpoints:
        state = f"dropped ({report.dropped})" if report.dropped else f"{report.concurrency} at a time"
        if not report.images:
            click.echo(f"{report.url}: no images; {state}", err=True)
            continue
        click.echo(f"{report.url}: {report.images} images in {report.seconds:.1f} s, "
                   f"{report.images_per_second:.2f} images/s, {report.tokens_per_second:.1f} tokens/s; {state}",
                   err=True)
    return summary


def _refuse_given(ctx: click.Context, names: tuple[str, ...], why: str) -> None:
    """A usage error for an option given (not defaulted) that this way of running ignores."""
    from click.core import ParameterSource

    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name) in (ParameterSource.COMMANDLINE,
                                                                            ParameterSource.ENVIRONMENT):
            if param.name == "api_key" and ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT:
                continue  # the shared variable is set for serve too: not a mistake of this command
            raise click.UsageError(f"{param.opts[-1]} {why}")
