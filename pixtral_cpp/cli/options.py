"""Options and model loading shared by the CLI commands that run a model.

Every default is the library's own constant (pixtral_cpp.defaults, images.MAX_IMAGE_SIZE), never retyped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from pixtral_cpp.defaults import DEFAULT_CONTEXT, DEFAULT_TEMPERATURE
from pixtral_cpp.images import MAX_IMAGE_SIZE
from pixtral_cpp.model_files import MODEL_ENV

if TYPE_CHECKING:
    from pixtral_cpp.model import PixtralModel
    from pixtral_cpp.options import ModelOptions

# The options model_options adds, named as ModelOptions names its fields.
_MODEL_OPTION_FIELDS = ("n_ctx", "threads", "gpu_layers", "vision_gpu", "max_image_size", "use_mmap",
                        "repack_weights")


@dataclass(frozen=True)
class ModelArgs:
    """The model-loading options of a command, handed over as one value: which files, and how to load them."""

    model: str | None
    mmproj: str | None
    options: ModelOptions


def model_options(f: Any) -> Any:
    """The options every command that loads a model shares, passed to it as `model_args: ModelArgs`."""

    @functools.wraps(f)
    def with_model_args(*args: Any, **kwargs: Any) -> Any:
        from pixtral_cpp.options import ModelOptions

        options = ModelOptions(**{name: kwargs.pop(name) for name in _MODEL_OPTION_FIELDS},
                               verbose=bool(click.get_current_context().find_root().params.get("verbose")))
        model_args = ModelArgs(model=kwargs.pop("model"), mmproj=kwargs.pop("mmproj"), options=options)
        return f(*args, model_args=model_args, **kwargs)

    return _apply(with_model_args, [
        click.option("-m", "--model", "model",
                     help=f"Text GGUF or folder (default: ${MODEL_ENV}, then the models folder)."),
        click.option("--mmproj", help="Vision projector GGUF (default: the mmproj-*.gguf beside the model)."),
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
    return PixtralModel.load(args.model, args.mmproj, dataclasses.replace(args.options, **extra_options))
