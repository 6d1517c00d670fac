"""The Starlette application: routes, the Host and API-key gate, request admission and the answers."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as exc:  # an optional dependency
    raise ImportError("the server needs Starlette and uvicorn: pip install 'pixtral-cpp[server]'") from exc

from pixtral_cpp.errors import PixtralError, ServerBusyError, ServerShuttingDownError
from pixtral_cpp.results import Chunk, GenerationStats
from pixtral_cpp.server.config import ServerConfig, is_loopback
from pixtral_cpp.server.protocol import (
    RequestError,
    check_host,
    check_json_content_type,
    parse_chat_request,
    request_error_from,
)
from pixtral_cpp.server.responses import ResponseHeader, finish_reason, model_object, sse_event, usage
from pixtral_cpp.server.worker import GenerationWorker, Job

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it, the log does
DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to 4x the limit, see _read_body


def create_app(model: Any, config: ServerConfig | None = None, *, bind_host: str = "127.0.0.1") -> Starlette:
    """The ASGI application serving `model` (a PixtralModel) under `config`'s key and limits.

    `bind_host` is the address the server listens on: on loopback, only loopback Host names are served.
    Images are brought to the model's own budget, `model.options.max_image_size`, while parsing.
    """
    config = config or ServerConfig()
    worker = GenerationWorker(model, config.max_queued_requests)
    endpoints = _Endpoints(worker, config, model.options.max_image_size)

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
        middleware=[Middleware(_Gate, config=config, loopback_only=is_loopback(bind_host))],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan)
    app.state.worker = worker
    return app


class _Gate:
    """Every HTTP request, unknown paths and /health included: the Host check, then the API key."""

    def __init__(self, app: ASGIApp, config: ServerConfig, loopback_only: bool) -> None:
        self.app, self.loopback_only, self.allowed_hosts = app, loopback_only, config.allowed_hosts
        # Compared as bytes, never as Starlette's latin-1 text: clients send a non-ASCII key as UTF-8
        # (curl, httpx given bytes) or as latin-1 (browsers' fetch), so both spellings are the key.
        self.keys = _key_spellings(config.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])  # raw (name, value) bytes; names are lower case
            try:
                check_host(headers.get(b"host"), loopback_only=self.loopback_only, allowed_hosts=self.allowed_hosts)
                self._check_key(headers.get(b"authorization", b""))
            except RequestError as error:
                extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                await _error_response(error, extra)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check_key(self, authorization: bytes) -> None:
        if not self.keys:
            return
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()  # bytes.strip: ASCII whitespace only, as HTTP strips
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != b"bearer" or not any([hmac.compare_digest(token, key) for key in self.keys]):
            raise RequestError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")


def _key_spellings(key: str | None) -> tuple[bytes, ...]:
    if key is None:
        return ()
    spellings = [key.encode("utf-8")]
    try:
        spellings.append(key.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return tuple(dict.fromkeys(spellings))  # one for an ASCII key


class _Endpoints:
    def __init__(self, worker: GenerationWorker, config: ServerConfig, max_image_size: int) -> None:
        self.worker, self.config, self.max_image_size = worker, config, max_image_size
        self.started = int(time.time())
        # held by parse_chat_request in a pool thread while it decodes a request's images
        self.decoding_gate = threading.BoundedSemaphore(config.max_concurrent_decodes)

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
        job, slot = None, None
        try:
            check_json_content_type(request.headers.get("content-type"))
            slot = self.worker.admit()  # before reading megabytes of body: over the limit is 503 at once
            body = await _read_body(request, self.config.max_body_bytes)
            parsed = await run_in_threadpool(parse_chat_request, body, self.config, self.decoding_gate,
                                             max_image_size=self.max_image_size)
            job = self.worker.submit(slot, parsed.messages, parsed.options)
        except ClientDisconnect:
            logger.info("client went away while sending its request")
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:  # noqa: BLE001 - every refusal becomes an OpenAI-style error
            return _error_response(error)
        finally:
            if job is None and slot is not None:
                slot.release()
        return await self._answer(request, job, parsed.stream, parsed.include_usage)

    async def _answer(self, request: Request, job: Job, stream: bool, include_usage: bool) -> Response:
        chunks = job.chunks(request.is_disconnected)
        try:
            first = await anext(chunks)  # errors found before any text still get their own status
        except StopAsyncIteration:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:  # noqa: BLE001
            return _error_response(error)
        header = ResponseHeader.new(self.config.model_id)
        if stream:
            return StreamingResponse(_events(header, first, chunks, include_usage),
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
        yield sse_event(json.dumps(_answer_to(error).body()))
        yield sse_event("[DONE]")  # the stream still ends as streams do: clients wait for it
    finally:
        await chunks.aclose()  # cancels the job if it is still running


def _answer_to(error: Exception) -> RequestError:
    """The OpenAI-style error for a refusal or failure; logs those that are bugs, with their traceback."""
    if isinstance(error, ServerBusyError):
        code = "server_shutting_down" if isinstance(error, ServerShuttingDownError) else "server_busy"
        return RequestError(503, str(error), type="server_error", code=code)
    if not isinstance(error, (RequestError, PixtralError)):
        logger.error("request failed", exc_info=error)
    return request_error_from(error)


def _error_response(error: Exception, headers: dict[str, str] | None = None) -> Response:
    answer = _answer_to(error)
    if answer.status == 503:
        headers = {"Retry-After": "1", **(headers or {})}
    # ASCII-escaped JSON: a message quoting a client's lone surrogate could not be written as UTF-8
    return Response(json.dumps(answer.body()), status_code=answer.status, headers=headers,
                    media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in OpenAI's error shape."""
    status = getattr(exc, "status_code", 500)
    message = f"no endpoint {request.method} {request.url.path}"
    return _error_response(RequestError(status, message, code="not_found" if status == 404 else None))
