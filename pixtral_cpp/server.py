"""An OpenAI-compatible HTTP server over one loaded PixtralModel: `/v1/chat/completions`, `/v1/models`,
`/health`.

    from pixtral_cpp.server import ServerConfig, run_server
    with PixtralModel.load("~/models") as model:
        run_server(model, ServerConfig(api_key="..."), port=8080)

Why Starlette and uvicorn: a small, well-kept ASGI stack with streaming responses and client-disconnect
detection, which is all this needs; FastAPI and pydantic would add weight without adding anything
here (requests are validated in server_protocol, where the rules can be tested without a server).
Why not llama-cpp-python's own server: it owns the model through its own `Llama` class and prompt
format, so it could not use pixtral-cpp's mistral-common prompt, image/KV-cache reuse or the NaN checks.

Concurrency: one model, one KV cache, so generations take turns in arrival order on one worker thread
(server_worker); request parsing and image decoding run in a thread pool beforehand, so a bad request
is refused without waiting in line. A client that disconnects stops its generation at the next token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as exc:  # an optional dependency
    raise ImportError("the server needs Starlette and uvicorn: pip install 'pixtral-cpp[server]'") from exc

from pixtral_cpp.errors import PixtralError
from pixtral_cpp.results import Chunk, GenerationStats
from pixtral_cpp.server_protocol import (
    RequestError,
    ResponseHeader,
    ServerConfig,
    finish_reason,
    model_object,
    parse_chat_request,
    request_error_from,
    sse_event,
    usage,
)
from pixtral_cpp.server_worker import GenerationWorker, ServerBusyError

__all__ = ["ServerConfig", "UnsafeBindError", "check_bind_address", "create_app", "run_server"]

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it, the log does
DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to 4x the limit, see _read_body


class UnsafeBindError(PixtralError):
    """The server would listen beyond this machine without an API key."""


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other name may resolve to a public interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, config: ServerConfig, *, allow_remote: bool = False) -> None:
    """Refuse a non-loopback address unless requests need a key, or the operator says it is fine."""
    if is_loopback(host) or config.api_key is not None or allow_remote:
        return
    raise UnsafeBindError(
        f"refusing to listen on {host} without an API key: anyone who can reach it could use the model. "
        "Set --api-key (or PIXTRAL_CPP_API_KEY), or pass --allow-remote if something in front of the "
        "server (a reverse proxy) already checks who may call it")


def run_server(model: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080, *,
               allow_remote: bool = False, log_level: str = "warning") -> None:
    """Serve `model` (a PixtralModel) until interrupted; the caller still owns and closes the model."""
    import uvicorn

    check_bind_address(host, config, allow_remote=allow_remote)
    if not is_loopback(host) and config.api_key is None:
        logger.warning("listening on %s without an API key (--allow-remote)", host)
    uvicorn.run(create_app(model, config), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


def create_app(model: Any, config: ServerConfig | None = None) -> Starlette:
    """The ASGI application serving `model` (a PixtralModel) under `config`'s key and limits."""
    config = config or ServerConfig()
    worker = GenerationWorker(model, config.max_queued_requests)
    endpoints = _Endpoints(worker, config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)  # joins the thread: not on the event loop

    app = Starlette(
        routes=[Route("/health", endpoints.health, methods=["GET"]),
                Route("/v1/models", endpoints.models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", endpoints.model, methods=["GET"]),
                Route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"])],
        middleware=[Middleware(_RequireApiKey, api_key=config.api_key)],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan)
    app.state.worker = worker
    return app


class _RequireApiKey:
    """Every HTTP request, unknown paths and /health included, needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.key is not None:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how much of a guessed key was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                error = RequestError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                     code="invalid_api_key")
                await _error_response(error, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Endpoints:
    def __init__(self, worker: GenerationWorker, config: ServerConfig) -> None:
        self.worker, self.config = worker, config
        self.started = int(time.time())

    async def health(self, request: Request) -> Response:
        worker = self.worker
        return JSONResponse({"status": "ok", "model": self.config.model_id, "pending": worker.pending,
                             "completed": worker.completed, "cancelled": worker.cancelled})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_object(self.config, self.started)]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model_id"] != self.config.model_id:
            return _error_response(RequestError(404, f"the model {request.path_params['model_id']!r} does "
                                                f"not exist; this server serves {self.config.model_id!r}",
                                                code="model_not_found"))
        return JSONResponse(model_object(self.config, self.started))

    async def chat_completions(self, request: Request) -> Response:
        try:
            if self.worker.pending >= self.config.max_queued_requests:  # before reading megabytes of body
                raise ServerBusyError("too many requests are waiting; retry shortly")
            body = await _read_body(request, self.config.max_body_bytes)
            parsed = await run_in_threadpool(parse_chat_request, body, self.config)
            job = self.worker.submit(parsed.messages, parsed.options)
        except Exception as error:  # noqa: BLE001 - every refusal becomes an OpenAI-style error
            return _error_response(error)
        chunks = job.chunks(request.is_disconnected)
        try:
            first = await anext(chunks)  # errors found before any text still get their own status
        except StopAsyncIteration:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:  # noqa: BLE001
            return _error_response(error)
        header = ResponseHeader.new(self.config.model_id)
        if parsed.stream:
            return StreamingResponse(_events(header, first, chunks, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _completion(header, first, chunks)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes.

    An oversized body is still read, and dropped, up to DRAIN_FACTOR x the limit: answering while the
    client is still sending makes it see a reset connection instead of the 413 (and retry).
    """
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    body, received = bytearray(), 0
    async for piece in request.stream():
        received += len(piece)
        if received > limit:
            too_large = True
        if too_large:
            if received > limit * DRAIN_FACTOR:
                break
            continue
        body += piece
    if too_large:
        raise RequestError(413, f"the request body is over this server's limit of {limit:,} bytes; send "
                           "smaller or fewer images", code="request_too_large")
    return bytes(body)


async def _completion(header: ResponseHeader, item: Chunk, chunks: AsyncGenerator[Chunk, None]
                      ) -> Response:
    parts: list[str] = []
    while not isinstance(item, GenerationStats):
        parts.append(item.text)
        try:
            item = await anext(chunks)
        except StopAsyncIteration:  # the client left
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:  # noqa: BLE001
            return _error_response(error)
    return JSONResponse(header.completion("".join(parts), item))


async def _events(header: ResponseHeader, item: Chunk, chunks: AsyncGenerator[Chunk, None],
                  include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream: the role, text deltas, the finish reason, [usage], then [DONE]."""
    try:
        yield sse_event(header.chunk({"role": "assistant", "content": ""}))
        while not isinstance(item, GenerationStats):
            yield sse_event(header.chunk({"content": item.text}))
            item = await anext(chunks)  # StopAsyncIteration (the client left) ends this generator too
        yield sse_event(header.chunk({}, finish_reason(item)))
        if include_usage:
            yield sse_event(header.chunk({}, usage_counts=usage(item)))
        yield sse_event("[DONE]")
    except StopAsyncIteration:
        return
    except Exception as error:  # noqa: BLE001 - the status is sent already; OpenAI clients raise on this
        _log_unexpected(error)
        yield sse_event(request_error_from(error).body())
    finally:
        await chunks.aclose()  # cancels the job if it is still running


def _error_response(error: Exception, headers: dict[str, str] | None = None) -> Response:
    if isinstance(error, ServerBusyError):
        answer = RequestError(503, str(error), type="server_error", code="server_busy")
        headers = {"Retry-After": "1", **(headers or {})}
    else:
        _log_unexpected(error)
        answer = request_error_from(error)
    return JSONResponse(answer.body(), status_code=answer.status, headers=headers)


def _log_unexpected(error: Exception) -> None:
    if not isinstance(error, (RequestError, PixtralError, ServerBusyError)):
        logger.error("request failed", exc_info=error)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in OpenAI's error shape."""
    status = getattr(exc, "status_code", 500)
    message = f"no endpoint {request.method} {request.url.path}"
    return _error_response(RequestError(status, message, code="not_found" if status == 404 else None))
