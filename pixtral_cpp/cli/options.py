"""Options and model loading shared by the CLI commands that run a model.

Every default is the library's own constant (pixtral_cpp.defaults, images.MAX_IMAGE_SIZE), never retyped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from pixtral_cpp.defaults import DEFAULT_CONTEXT, DEFAULT_HUB_MODEL, DEFAULT_TEMPERATURE, DISK_CACHE_ENV, YES_ENV
from pixtral_cpp.images import MAX_IMAGE_SIZE
from pixtral_cpp.model_files import MODEL_ENV

if TYPE_CHECKING:
    from pixtral_cpp.model import PixtralModel
    from pixtral_cpp.model_sources import ResolvedModel
    from pixtral_cpp.options import ModelOptions

# The options model_options adds, named as ModelOptions names its fields.
_MODEL_OPTION_FIELDS = ("n_ctx", "threads", "gpu_layers", "vision_gpu", "max_image_size", "use_mmap",
                        "repack_weights", "disk_cache")


@dataclass(frozen=True)
class ModelArgs:
    """The model-loading options of a command, handed over as one value: which files, and how to load them."""

    model: str | None
    mmproj: str | None
    options: ModelOptions
    mmproj_quant: str | None = None
    yes: bool = False  # accept the offer to pull the default model when none is found


def model_options(f: Any) -> Any:
    """The options every command that loads a model shares, passed to it as `model_args: ModelArgs`."""

    @functools.wraps(f)
    def with_model_args(*args: Any, **kwargs: Any) -> Any:
        from pixtral_cpp.options import ModelOptions

        options = ModelOptions(**{name: kwargs.pop(name) for name in _MODEL_OPTION_FIELDS},
                               verbose=bool(click.get_current_context().find_root().params.get("verbose")))
        model_args = ModelArgs(model=kwargs.pop("model"), mmproj=kwargs.pop("mmproj"), options=options,
                               mmproj_quant=kwargs.pop("mmproj_quant"), yes=kwargs.pop("yes"))
        return f(*args, model_args=model_args, **kwargs)

    return _apply(with_model_args, [
        click.option("-m", "--model", "model",
                     help=f"Text GGUF, FOLDER[:QUANT] or hub repo USER/REPO[@REVISION][:QUANT] (default: "
                          f"${MODEL_ENV}, then the models folder, then {DEFAULT_HUB_MODEL} if pulled)."),
        click.option("--mmproj", help="Vision projector GGUF (default: the mmproj beside the model)."),
        click.option("--mmproj-quant", help="Which projector when several are offered (default: F16, BF16, F32, "
                                            "Q8_0)."),
        click.option("--yes", is_flag=True,
                     help=f"Pull {DEFAULT_HUB_MODEL} without asking when no model is found (or ${YES_ENV}=1)."),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=256), default=DEFAULT_CONTEXT, show_default=True,
                     help="Context size in tokens (images take up to 4160 each)."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: physical cores)."),
        click.option("--gpu-layers", type=int, default=0, show_default=True,
                     help="Text layers to offload to the GPU (-1: all) on Metal/CUDA builds."),
        click.option("--vision-gpu/--vision-cpu", "vision_gpu", default=None,
                     help="Vision encoder on the GPU or the CPU (default: the GPU when text layers are offloaded)."),
        click.option("--max-image-size", type=int, default=MAX_IMAGE_SIZE, show_default=True,
                     callback=check_image_size,
                     help="Longest image edge in px (16..1024, multiple of 16); smaller is faster, less detail."),
        click.option("--repack/--no-repack", "repack_weights", default=False, show_default=True,
                     help="llama.cpp's repacked CPU weights: faster generation, slower load and prompt."),
        click.option("--mmap/--no-mmap", "use_mmap", default=None,
                     help="Map the model file (default: yes, unless --repack) or read it into memory."),
        click.option("--cache/--no-cache", "disk_cache", default=True, show_default=True,
                     help=f"Keep evaluated prompts on disk, so a later process asking about the same image "
                          f"answers in seconds (folder: ${DISK_CACHE_ENV} or the user's cache; see "
                          f"`pixtral-cpp cache`)."),
    ])


def generation_options(*, max_tokens: int) -> Callable[[Any], Any]:
    """--max-tokens (the command's default), --temperature and --seed, as the library defaults them."""
    return lambda f: _apply(f, [
        click.option("--max-tokens", type=click.IntRange(min=1), default=max_tokens, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0), default=DEFAULT_TEMPERATURE, show_default=True),
        click.option("--seed", type=int, help="Sampling seed, for repeatable answers."),
    ])


def _apply(f: Any, decorators: list[Callable[[Any], Any]]) -> Any:
    """Options in the order listed (click decorators apply bottom-up)."""
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def check_image_size(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """The library's own rule, reported as a usage error (exit code 2)."""
    from pixtral_cpp.errors import ImageError
    from pixtral_cpp.images import check_max_image_size

    try:
        check_max_image_size(value)
    except ImageError as error:
        raise click.BadParameter(str(error)) from None
    return value


def load_model(args: ModelArgs, **extra_options: Any) -> PixtralModel:
    """The PixtralModel the options name; says what a smaller image budget costs."""
    from pixtral_cpp.images import max_image_tokens
    from pixtral_cpp.model import PixtralModel

    budget = args.options.max_image_size
    if budget != MAX_IMAGE_SIZE:
        click.echo(f"image budget {budget} px: at most {max_image_tokens(budget)} positions per image "
                   f"({MAX_IMAGE_SIZE} px: {max_image_tokens(MAX_IMAGE_SIZE)}); less detail, faster", err=True)
    files = resolve_model_files(args).files
    return PixtralModel.load(files.text, files.mmproj, dataclasses.replace(args.options, **extra_options))


def resolve_model_files(args: ModelArgs) -> ResolvedModel:
    """The pair the options name, a hub repo pulled with a progress bar; a first run offers the default model."""
    from pixtral_cpp.cli.progress import TerminalProgress
    from pixtral_cpp.model_sources import model_available_without_download, resolve_model

    if args.model is None and not model_available_without_download():
        offer_default_model(args.yes)
    resolved = resolve_model(args.model, args.mmproj, args.mmproj_quant, progress=TerminalProgress(show_speed=True))
    for note in resolved.notes:
        click.echo(note, err=True)
    return resolved


def offer_default_model(yes: bool) -> None:
    """No model anywhere: pull the default when accepted (--yes, $PIXTRAL_CPP_YES, or asked on a terminal)."""
    from pixtral_cpp.cli.progress import TerminalProgress
    from pixtral_cpp.hub_models import hub_cache_dir, pull
    from pixtral_cpp.paths import default_models_dir

    command = f"pixtral-cpp pull {DEFAULT_HUB_MODEL}"
    accepted = yes or os.environ.get(YES_ENV, "").strip().lower() in {"1", "yes", "true", "on"}
    if not accepted and not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise click.ClickException(f"no model found (not in {default_models_dir()} nor in the Hugging Face cache); "
                                   f"run `{command}` (or add --yes), convert a checkpoint with `pixtral-cpp "
                                   f"convert mistralai/Pixtral-12B-2409`, or pass --model PATH or --model user/repo")
    if not accepted:
        size = _default_model_size()
        click.echo(f"No model found. {DEFAULT_HUB_MODEL} ({size}) can be downloaded into the Hugging Face cache "
                   f"({hub_cache_dir()}).", err=True)
        if not click.confirm("Download it now?", default=True, err=True):
            raise click.ClickException(f"no model; run `{command}` when you want it, or pass --model")
    pull(DEFAULT_HUB_MODEL, progress=TerminalProgress(show_speed=True))


def _default_model_size() -> str:
    """The default pair's size from the hub's listing (or the cache's), 'size unknown' when neither answers."""
    from pixtral_cpp.errors import PixtralError
    from pixtral_cpp.formatting import format_bytes
    from pixtral_cpp.hub_models import list_repo, parse_hub_spec, plan_pull

    spec = parse_hub_spec(DEFAULT_HUB_MODEL)
    try:
        size = plan_pull(spec, list_repo(spec)).size_bytes if spec else None
    except PixtralError:
        size = None
    return format_bytes(size) if size else "size unknown"
