"""`pixtral-cpp describe`: one question about one or more images, the answer streamed (or as JSON)."""

from __future__ import annotations

import json
from typing import Any

import click

from pixtral_cpp.cli.options import ModelArgs, generation_options, load_model, model_options
from pixtral_cpp.defaults import DEFAULT_MAX_TOKENS, DEFAULT_PROMPT
from pixtral_cpp.valid_text import check_text


@click.command()
@click.argument("images", nargs=-1, required=True)
@click.option("-p", "--prompt", default=DEFAULT_PROMPT, show_default=True)
@model_options
@generation_options(max_tokens=DEFAULT_MAX_TOKENS)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the answer and statistics.")
@click.option("--schema", type=click.File("r"), help="JSON schema file: the answer is JSON that follows it.")
def describe(images: tuple[str, ...], prompt: str, model_args: ModelArgs, max_tokens: int,
             temperature: float, seed: int | None, as_json: bool, schema: Any) -> None:
    """Answer one question about one or more images, streaming the answer."""
    from pixtral_cpp.options import GenerationOptions
    from pixtral_cpp.results import TextChunk

    check_text(prompt, "the prompt")  # before loading the model
    schema_dict = _read_schema(schema) if schema else None
    generation = GenerationOptions(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   json_schema=schema_dict)
    with load_model(model_args) as pixtral:
        if as_json:
            result = pixtral.describe(list(images), prompt, generation)
            click.echo(json.dumps({"answer": result.text, "stats": result.stats.to_dict(),
                                   "load_seconds": round(pixtral.load_seconds, 3)}, ensure_ascii=False))
            return
        for chunk in pixtral.stream_describe(list(images), prompt, generation):
            if isinstance(chunk, TextChunk):
                click.echo(chunk.text, nl=False)
        click.echo()


def _read_schema(handle: Any) -> dict[str, Any]:
    try:
        schema = json.load(handle)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--schema") from None
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                                 param_hint="--schema") from None
    if not isinstance(schema, dict):
        raise click.BadParameter("a JSON schema must be an object", param_hint="--schema")
    return schema
