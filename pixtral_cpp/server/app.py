"""The Starlette application: routes, the Host and API-key gate, request admission and the answers."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as exc:  # an optional dependency
    raise ImportError("the server needs Starlette and uvicorn: pip install 'pixtral-cpp[server]'") from exc

from pixtral_cpp.errors import PixtralError, ServerBusyError, ServerShuttingDownError
from pixtral_cpp.results import Chunk, GenerationStats
from pixtral_cpp.server.completions import CompletionFormat, parse_completion_request
from pixtral_cpp.server.config import ServerConfig, is_loopback
from pixtral_cpp.server.protocol import (
    RequestError,
    check_host,
    check_json_content_type,
    parse_chat_request,
    request_error_from,
)
from pixtral_cpp.server.responses import ChatFormat, ResponseHeader, model_object
from pixtral_cpp.server.responses_api import ResponsesFormat, ResponseStore, parse_responses_request
from pixtral_cpp.server.worker import GenerationWorker, Job

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it, the log does
DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to 4x the limit, see _read_body
OPEN_PATHS = ("/health",)  # answered without the API key: probes and load balancers cannot send one
CORS_MAX_AGE = 600  # seconds a browser may keep a preflight's answer


class AnswerFormat(Protocol):
    """How one protocol writes an answer: whole (`completion`) or as server-sent events."""

    def completion(self, text: str, stats: GenerationStats) -> dict[str, Any]: ...
    def opening(self) -> list[bytes]: ...
    def delta(self, text: str) -> list[bytes]: ...
    def closing(self, text: str, stats: GenerationStats) -> list[bytes]: ...
    def failure(self, error: dict[str, Any]) -> list[bytes]: ...


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

    # Outermost first: paths lose a trailing slash, CORS answers preflights (a browser sends them without
    # the key) and adds its headers to every answer, then the Host and key gate.
    cors = [Middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["*"], max_age=CORS_MAX_AGE)] if config.cors_origins else []
    app = Starlette(
        routes=[Route("/health", endpoints.health, methods=["GET"]),
                Route("/v1/models", endpoints.models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", endpoints.model, methods=["GET"]),
                Route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"]),
                Route("/v1/completions", endpoints.completions, methods=["POST"]),
                Route("/v1/responses", endpoints.responses, methods=["POST"]),
                Route("/v1/responses/{response_id}", endpoints.stored_response, methods=["GET"])],
        middleware=[Middleware(_WithoutTrailingSlash), *cors,
                    Middleware(_Gate, config=config, loopback_only=is_loopback(bind_host))],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan)
    app.router.redirect_slashes = False  # never a 307: clients do not all follow it for a POST
    app.state.worker = worker
    return app


class _WithoutTrailingSlash:
    """`/v1/chat/completions/` is `/v1/chat/completions`: some clients join a base URL and a path that way."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
            if isinstance(scope.get("raw_path"), bytes):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


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
                if scope["path"] not in OPEN_PATHS:
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
        self.store = ResponseStore(config.max_stored_responses, config.max_stored_image_bytes)
        # held by parse_chat_request in a pool thread while it decodes a request's images
        self.decoding_gate = threading.BoundedSemaphore(config.max_concurrent_decodes)

    async def health(self, request: Request) -> Response:
        worker = self.worker
        return JSONResponse({"status": "ok", "model": self.config.model_id, "pending": worker.pending,
                             "completed": worker.completed, "cancelled": worker.cancelled})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_object(self.config, self.started)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        if not self.config.serves(name):
            names = ", ".join(repr(name) for name in self.config.model_names)
            return _error_response(RequestError(404, f"the model {name[:100]!r} does not exist; this server "
                                                f"serves {names}", code="model_not_found"))
        return JSONResponse(model_object(self.config, self.started))

    async def chat_completions(self, request: Request) -> Response:
        def parse(body: bytes) -> Any:
            return parse_chat_request(body, self.config, self.decoding_gate, max_image_size=self.max_image_size)

        def answer_format(parsed: Any) -> AnswerFormat:
            return ChatFormat(ResponseHeader.new(self.config.model_id), parsed.include_usage)

        return await self._generate(request, parse, answer_format)

    async def completions(self, request: Request) -> Response:
        def parse(body: bytes) -> Any:
            return parse_completion_request(body, self.config)

        return await self._generate(request, parse, lambda parsed: CompletionFormat(parsed, self.config.model_id))

    async def responses(self, request: Request) -> Response:
        def parse(body: bytes) -> Any:
            return parse_responses_request(body, self.config, self.store, self.decoding_gate,
                                           max_image_size=self.max_image_size)

        return await self._generate(request, parse,
                                    lambda parsed: ResponsesFormat(parsed, self.config.model_id, self.store))

    async def stored_response(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        response = self.store.response(response_id)
        if response is None:
            return _error_response(RequestError(404, f"no response {response_id[:80]!r} is kept by this server",
                                                code="not_found"))
        return JSONResponse(response)

    async def _generate(self, request: Request, parse: Callable[[bytes], Any],
                        answer_format: Callable[[Any], AnswerFormat]) -> Response:
        """Admit, read, parse (in a pool thread) and queue one request, then answer it in its format.
        `parse` gives an object with `messages`, `options` and `stream`."""
        job, slot = None, None
        try:
            check_json_content_type(request.headers.get("content-type"))
            slot = self.worker.admit()  # before reading megabytes of body: over the limit is 503 at once
            body = await _read_body(request, self.config.max_body_bytes)
            parsed = await run_in_threadpool(parse, body)
            job = self.worker.submit(slot, parsed.messages, parsed.options)
        except ClientDisconnect:
            logger.info("client went away while sending its request")
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:  # noqa: BLE001 - every refusal becomes an OpenAI-style error
            return _error_response(error)
        finally:
            if job is None and slot is not None:
                slot.release()
        return await self._answer(request, job, parsed.stream, answer_format(parsed))

    async def _answer(self, request: Request, job: Job, stream: bool, form: AnswerFormat) -> Response:
        chunks = job.chunks(request.is_disconnected)
        try:
            first = await anext(chunks)  # errors found before any text still get their own status
        except StopAsyncIteration:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:  # noqa: BLE001
            return _error_response(error)
        if stream:
            return StreamingResponse(_events(form, first, chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _completion(form, first, chunks)


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


async def _completion(form: AnswerFormat, item: Chunk, chunks: AsyncGenerator[Chunk, None]) -> Response:
    parts: list[str] = []
    while not isinstance(item, GenerationStats):
        parts.append(item.text)
        try:
            item = await anext(chunks)
        except StopAsyncIteration:  # the client left
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:  # noqa: BLE001
            return _error_response(error)
    # ASCII-escaped JSON, as every answer: the text is valid, but the object repeats request fields
    return Response(json.dumps(form.completion("".join(parts), item)), media_type="application/json")


async def _events(form: AnswerFormat, item: Chunk, chunks: AsyncGenerator[Chunk, None]) -> AsyncIterator[bytes]:
    """The format's event stream: its opening, a delta per text chunk, then its closing (or its failure)."""
    parts: list[str] = []
    try:
        for event in form.opening():
            yield event
        while not isinstance(item, GenerationStats):
            parts.append(item.text)
            for event in form.delta(item.text):
                yield event
            item = await anext(chunks)  # StopAsyncIteration (the client left) ends this generator too
        for event in form.closing("".join(parts), item):
            yield event
    except StopAsyncIteration:
        return
    except Exception as error:  # noqa: BLE001 - the status is sent already; OpenAI clients raise on this
        for event in form.failure(_answer_to(error).body()):  # the stream still ends as streams do
            yield event
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
    headers = getattr(exc, "headers", None) or {}
    message = f"no endpoint {request.method} {request.url.path}"
    if status == 405 and "Allow" in headers:
        message = f"{request.url.path} does not answer {request.method}; it answers {headers['Allow']}"
    return _error_response(RequestError(status, message, code="not_found" if status == 404 else None),
                           dict(headers))
