"""An OpenAI-compatible HTTP server over one loaded PixtralModel: `/v1/chat/completions`, the Responses
API `/v1/responses`, legacy `/v1/completions`, `/v1/models`, `/health`.

    from pixtral_cpp.server import ServerConfig, run_server
    with PixtralModel.load("~/models") as model:
        run_server(model, ServerConfig(api_key="..."), port=8080)

Why Starlette and uvicorn: a small, well-kept ASGI stack with streaming responses and client-disconnect
detection, which is all this needs; FastAPI and pydantic would add weight without adding anything
here (requests are validated in `protocol`, where the rules can be tested without a server).
Why not llama-cpp-python's own server: it owns the model through its own `Llama` class and prompt
format, so it could not use pixtral-cpp's mistral-common prompt, image/KV-cache reuse or the NaN checks.

Concurrency: one model, one KV cache, so generations take turns in arrival order on one worker thread
(`worker`). A request takes its place in line before its body is read (over the limit: 503 at
once); parsing and image decoding then run in a thread pool, a bounded number of decodes at a time, so
a bad request is refused without waiting for the model. A client that disconnects stops its generation
at the next token. SIGTERM or Ctrl-C ends the running answer with a last error event, refuses the
waiting requests with 503, and exits.

Who may call: bound to loopback, only loopback names are accepted in `Host` (a web page that re-points
its own name at 127.0.0.1 cannot read answers), and bodies must be `application/json` (a page may send
text/plain anywhere without asking). With an API key, every request but `/health` needs `Authorization:
Bearer`. Browsers' pages are let in only from the configured CORS origins.

Modules: `config` (ServerConfig, where it may listen), `protocol` (request rules, errors as HTTP),
`responses` (chat completion objects), `responses_api` (the Responses API: requests, kept answers,
events), `completions` (legacy completions), `worker` (the generation thread), `app` (Starlette: routes,
gate, answers), `run` (uvicorn and signals). Every endpoint turns its request into the same messages and
GenerationOptions for the one worker. Only `app` and `run` need Starlette and uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pixtral_cpp.errors import ServerBusyError, ServerConfigError, UnsafeBindError
from pixtral_cpp.server.config import ServerConfig, check_bind_address

if TYPE_CHECKING:
    from pixtral_cpp.server.app import create_app
    from pixtral_cpp.server.run import run_server

__all__ = ["ServerBusyError", "ServerConfig", "ServerConfigError", "UnsafeBindError", "check_bind_address",
           "create_app", "run_server"]

_NEED_STARLETTE = {"create_app": "pixtral_cpp.server.app", "run_server": "pixtral_cpp.server.run"}


def __getattr__(name: str) -> Any:
    """`create_app` and `run_server` on first use: the config, the rules and the CLI's defaults do not
    import Starlette, and only these raise the ImportError that says how to install it."""
    if name in _NEED_STARLETTE:
        import importlib

        return getattr(importlib.import_module(_NEED_STARLETTE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
