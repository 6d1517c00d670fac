"""Running the app under uvicorn until SIGINT or SIGTERM, ending running answers cleanly."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pixtral_cpp.server.app import create_app
from pixtral_cpp.server.config import ServerConfig, check_bind_address, is_loopback

logger = logging.getLogger(__name__)


def run_server(model: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080, *,
               allow_remote: bool = False, log_level: str = "warning") -> None:
    """Serve `model` (a PixtralModel) until SIGINT or SIGTERM; the caller still owns and closes the model."""
    import uvicorn

    check_bind_address(host, config, allow_remote=allow_remote)
    if not is_loopback(host) and config.api_key is None:
        logger.warning("listening on %s without an API key (--allow-remote)", host)
    if config.api_key is not None and not config.api_key.isascii():
        logger.warning("the API key is not ASCII: curl and clients that send UTF-8 headers can use it, but "
                       "the openai Python client (httpx) refuses to send it")
    app = create_app(model, config, bind_host=host)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.worker.shut_down()  # now, not after the graceful wait: running answers end cleanly
            super().handle_exit(sig, frame)

    with _sigterm_as_a_request_to_stop():
        Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)).run()


@contextmanager
def _sigterm_as_a_request_to_stop() -> Iterator[None]:
    """uvicorn re-raises the SIGTERM it handled once it has stopped: with the default action the process
    would then die of the signal (exit -15) after a clean shutdown. Here it just returns."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; uvicorn installs none elsewhere either
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

