"""`pixtral-cpp serve`: the OpenAI-compatible server over pixtral_cpp.server.

The request limits default to ServerConfig's own; Starlette and uvicorn are imported only when the
server starts (the `server` extra).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from pixtral_cpp.cli.options import ModelArgs, load_model, model_options
from pixtral_cpp.server import ServerConfig, check_bind_address

API_KEY_ENV = "PIXTRAL_CPP_API_KEY"  # so the key need not show in `ps`
MB = 1_000_000
DEFAULTS = {field.name: field.default for field in dataclasses.fields(ServerConfig)}


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key or --allow-remote.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar=API_KEY_ENV, help=f"Key every request must send as a Bearer token "
              f"(or ${API_KEY_ENV}).")
@click.option("--allow-remote", is_flag=True,
              help="Listen beyond loopback without a key (when a proxy in front checks who may call).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A name clients may use in the Host header besides loopback ones (repeatable); on a "
                   "non-loopback address, only these names are then served.")
@click.option("--allow-image-folder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder whose images requests may name by local path (default: none, data URLs only).")
@click.option("--model-id", default=DEFAULTS["model_id"], show_default=True, help="Model name clients use.")
@click.option("--alias", "aliases", multiple=True, metavar="NAME",
              help="Another name for the model (repeatable); listed in /v1/models.")
@click.option("--strict-model-name", is_flag=True,
              help="Answer only requests naming --model-id or an --alias (others get 404); by default any "
                   "name is the one model served.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (e.g. http://localhost:3000, or *) whose pages may call the server from a "
                   "browser (repeatable; default: none).")
@click.option("--max-body-mb", type=click.IntRange(min=1), default=DEFAULTS["max_body_bytes"] // MB,
              show_default=True, help="Largest request body in MB.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULTS["max_image_pixels"],
              show_default=True, help="Largest image (width x height) a request may send.")
@click.option("--max-images", type=click.IntRange(min=1), default=DEFAULTS["max_images_per_request"],
              show_default=True, help="Most images per request.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1),
              default=DEFAULTS["default_max_tokens"],
              help="Answer length when a request names none (default: to the end of the context, at most "
                   "--max-tokens-limit).")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=DEFAULTS["max_tokens_limit"],
              show_default=True, help="Most tokens a request may ask for.")
@click.option("--max-queued", type=click.IntRange(min=1), default=DEFAULTS["max_queued_requests"],
              show_default=True, help="Requests waiting or running at once; more get 503.")
@model_options
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, api_key: str | None, allow_remote: bool,
          allowed_hosts: tuple[str, ...], allow_image_folder: Path | None, model_id: str,
          aliases: tuple[str, ...], strict_model_name: bool, cors_origins: tuple[str, ...], max_body_mb: int,
          max_image_pixels: int, max_images: int, default_max_tokens: int | None, max_tokens_limit: int,
          max_queued: int, model_args: ModelArgs) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).

    Also the Responses API (/v1/responses) and legacy completions (/v1/completions, the prompt as one user
    turn); /health answers without the API key."""
    try:
        from pixtral_cpp.server import run_server
    except ImportError as exc:  # the `server` extra is not installed
        raise click.ClickException(str(exc)) from None

    config = ServerConfig(api_key=api_key or None, allowed_image_folder=allow_image_folder,
                          max_body_bytes=max_body_mb * MB, max_image_pixels=max_image_pixels,
                          max_tokens_limit=max_tokens_limit, max_images_per_request=max_images,
                          max_queued_requests=max_queued, model_id=model_id, allowed_hosts=allowed_hosts,
                          default_max_tokens=default_max_tokens, model_aliases=aliases,
                          strict_model_name=strict_model_name, cors_origins=cors_origins)
    check_bind_address(host, config, allow_remote=allow_remote)  # before minutes of loading
    verbose = bool(ctx.find_root().params.get("verbose"))
    with load_model(model_args) as pixtral:
        click.echo(f"serving {model_id} on http://{host}:{port}/v1", err=True)
        run_server(pixtral, config, host, port, allow_remote=allow_remote,
                   log_level="info" if verbose else "warning")


if __name__ == "__main__":  # `python -m pixtral_cpp.cli.serve`
    serve()
