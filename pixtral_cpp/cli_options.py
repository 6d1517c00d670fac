"""Options and model loading shared by the CLI commands that run a model."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import click

from pixtral_cpp.model_files import MODEL_ENV
from pixtral_cpp.options import DEFAULT_CONTEXT


@dataclass(frozen=True)
class ModelArgs:
    """The model-loading options of a command, handed over as one value."""

    model: str | None
    mmproj: str | None
    n_ctx: int
    threads: int | None
    gpu_layers: int
    vision_gpu: bool | None
    max_image_size: int
    use_mmap: bool | None
    repack_weights: bool


def model_options(f: Any) -> Any:
    """The options every command that loads a model shares, passed to it as `model_args: ModelArgs`."""

    @functools.wraps(f)
    def with_model_args(*args: Any, **kwargs: Any) -> Any:
        fields = {name: kwargs.pop(name) for name in ModelArgs.__dataclass_fields__}
        return f(*args, model_args=ModelArgs(**fields), **kwargs)

    decorators = [
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
        click.option("--max-image-size", type=int, default=1024, show_default=True, callback=check_image_size,
                     help="Longest image edge in px (16..1024, multiple of 16); smaller is faster, less detail."),
        click.option("--repack/--no-repack", "repack_weights", default=False, show_default=True,
                     help="llama.cpp's repacked CPU weights: faster generation, slower load and prompt."),
        click.option("--mmap/--no-mmap", "use_mmap", default=None,
                     help="Map the model file (default: yes, unless --repack) or read it into memory."),
    ]
    command = with_model_args
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def check_image_size(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """The library's own rule, reported as a usage error (exit code 2)."""
    from pixtral_cpp.errors import ImageError
    from pixtral_cpp.images import check_max_image_size

    try:
        check_max_image_size(value)
    except ImageError as error:
        raise click.BadParameter(str(error)) from None
    return value


def load_model(ctx: click.Context, args: ModelArgs, **extra_options: Any) -> Any:
    """The PixtralModel the options name; says what a smaller image budget costs."""
    from pixtral_cpp.images import MAX_IMAGE_SIZE, max_image_tokens
    from pixtral_cpp.model import PixtralModel
    from pixtral_cpp.options import ModelOptions

    budget = args.max_image_size
    if budget != MAX_IMAGE_SIZE:
        click.echo(f"image budget {budget} px: at most {max_image_tokens(budget)} positions per image "
                   f"({MAX_IMAGE_SIZE} px: {max_image_tokens(MAX_IMAGE_SIZE)}); less detail, faster", err=True)
    verbose = bool(ctx.find_root().params.get("verbose"))
    options = ModelOptions(n_ctx=args.n_ctx, threads=args.threads, gpu_layers=args.gpu_layers,
                           vision_gpu=args.vision_gpu, max_image_size=budget, use_mmap=args.use_mmap,
                           repack_weights=args.repack_weights, verbose=verbose, **extra_options)
    return PixtralModel.load(args.model, args.mmproj, options)
