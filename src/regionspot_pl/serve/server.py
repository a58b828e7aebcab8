"""The naming server on LitServe: ``POST /predict``, ``GET /health``, ``GET /info``, ``/docs``.

Requests that LitServe gathers into a batch are answered by one :meth:`NamingEngine.answer_all`
call. A refused request is answered with its own 4xx JSON error and never fails the others of its
batch: LitServe fails a whole batch when one of its requests raises, so a refusal travels as a
value and becomes the response. Before any of it, :class:`RequestGate` refuses a body that is not
JSON (415) or is too large (413) without reading it, and malformed JSON or fields of the wrong type
are answered by FastAPI's validation, as one line naming the field.
"""

# No postponed annotations: LitServe hands decode_request's annotation to FastAPI as the body
# type, which must be the class itself.
import json
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..errors import RegionSpotError
from ..utils.stopping import STOP_SIGNALS, Stopped
from .engine import NamingEngine, check_before_start
from .requests import NamingRequest, NamingRequestBody, RequestError, read_request
from .settings import ServeConfig, ServeConfigError

logger = logging.getLogger(__name__)
JSON = "application/json"


class RequestGate:
    """ASGI middleware on ``POST path``: 415 unless the body is JSON; 413 when the declared
    Content-Length or the bytes received pass ``max_bytes``, before the body is read further."""

    def __init__(self, app: Any, max_bytes: int, path: str = "/predict") -> None:
        self.app, self.max_bytes, self.path = app, max_bytes, path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1").lower()
        refusal = None
        if kind != JSON:
            refusal = (415, f"Content-Type is {kind or 'missing'!r}; send the body as {JSON}")
        elif int(headers.get(b"content-length", b"0") or 0) > self.max_bytes:
            refusal = (413, self._too_large())
        if refusal:
            await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a body sent without (or past) its Content-Length
                raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> str:
        return f"the body is too large: over the limit of {self.max_bytes} bytes (--max_request_bytes)"


def describe_invalid_body(exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's validation errors -> (400 for malformed JSON, else 422; one line naming the fields)."""
    errors = exc.errors()
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:
        return 400, f"the body is not valid JSON: {broken.get('ctx', {}).get('error', broken.get('msg'))}"
    parts = []
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "the body"
        parts.append(f"{where}: {error.get('msg')}")
    return 422, "; ".join(parts)


async def refuse_invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, message = describe_invalid_body(exc)
    return JSONResponse({"detail": message}, status_code=status)


def response_of(answer: dict | RequestError) -> tuple[int, bytes]:
    """An answer or a refusal -> (HTTP status, JSON bytes); never raises."""
    if isinstance(answer, RequestError):
        return answer.status, json.dumps({"detail": str(answer)}).encode()
    try:
        return 200, json.dumps(answer, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        logger.exception("an answer could not be written as JSON")
        return 500, json.dumps({"detail": f"internal error writing the answer ({err})"}).encode()


class NamingAPI(ls.LitAPI):
    """LitServe's API around a :class:`NamingEngine` loaded in each worker. ``setup_errors``: a file
    where a worker that cannot load the models writes why, for the main process to report."""

    def __init__(self, config: ServeConfig, setup_errors: str | None = None) -> None:
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout)
        self.config, self.setup_errors = config, setup_errors
        self.limits = config.limits()
        self.engine: NamingEngine | None = None

    def setup(self, device: str) -> None:
        try:
            self.engine = NamingEngine.from_settings(self.config, device=device)
        except RegionSpotError as err:
            if self.setup_errors:
                Path(self.setup_errors).write_text(str(err))
                # the main process reports it as one error line; LitServe would add a traceback
                logging.getLogger("litserve").disabled = True
                logging.getLogger("litserve.loops.loops").disabled = True
            raise

    def decode_request(self, request: NamingRequestBody) -> NamingRequest | RequestError:
        try:
            return read_request(request, self.engine.vocabularies, self.limits)
        except RequestError as err:
            return err
        except Exception:  # a fault of ours: this request fails, the others of its batch go on
            logger.exception("reading a request failed")
            return RequestError("internal error while reading the request (the server's log has the details)", 500)

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def unbatch(self, outputs: list) -> list:
        return list(outputs)

    def predict(self, requests: Any) -> Any:
        if isinstance(requests, list):
            return [response_of(answer) for answer in self.engine.answer_all(requests)]
        return response_of(self.engine.answer_all([requests])[0])

    def encode_response(self, output: tuple[int, bytes]) -> Response:
        status, body = output
        return Response(content=body, status_code=status, media_type=JSON)


def build_server(config: ServeConfig, setup_errors: str | None = None) -> ls.LitServer:
    """The LitServer of ``config`` (not started)."""
    server = ls.LitServer(
        NamingAPI(config, setup_errors),
        accelerator=config.device,
        devices=config.devices,
        workers_per_device=config.workers_per_device,
        timeout=config.request_timeout,
        middlewares=[(RequestGate, {"max_bytes": config.max_request_bytes})],
        model_metadata={"head": config.head, "sam_type": config.sam_type, "clip_model": config.clip_model},
    )
    server.app.add_exception_handler(RequestValidationError, refuse_invalid_body)
    return server


@contextmanager
def stops_as_keyboard_interrupt() -> Iterator[list[int]]:
    """Within the block, SIGTERM and SIGINT raise KeyboardInterrupt in this process's main thread,
    which is what LitServe shuts down cleanly on (another exception, raised while the main thread
    waits on LitServe's manager, leaves that connection waiting forever). Yields the signals
    received. A forked child (LitServe's manager, a uvicorn server) exits at once instead."""
    owner, received = os.getpid(), []

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        received.append(signum)
        raise KeyboardInterrupt

    quiet = MonitorQuietAfterStop(received)
    logging.getLogger("litserve.server").addFilter(quiet)
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if not received:  # after a stop, LitServe's monitor thread runs on until the process exits
            logging.getLogger("litserve.server").removeFilter(quiet)


class MonitorQuietAfterStop(logging.Filter):
    """Drops LitServe's "Monitoring worker crashed" once a stop signal has come: a signal sent to
    the whole process group (Ctrl+C, systemd) ends LitServe's manager process at the same time as
    this one, and LitServe's worker-monitoring thread, which polls that manager until this process
    exits, then fails on a closed pipe. Before a stop the message means what it says and stays."""

    def __init__(self, stops: list[int]) -> None:
        super().__init__()
        self.stops = stops

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.stops and record.getMessage() == "Monitoring worker crashed")


def serve(config: ServeConfig) -> None:
    """Serve until stopped, on ``config.host``:``config.port``; a stop signal ends in Stopped."""
    check_before_start(config)
    with tempfile.TemporaryDirectory(prefix="regionspot-serve-") as folder, stops_as_keyboard_interrupt() as stops:
        setup_errors = Path(folder) / "setup_error.txt"
        server = build_server(config, str(setup_errors))
        try:
            server.run(
                host=config.host, port=config.port, generate_client_file=False,
                limit_concurrency=config.max_connections,
            )  # fmt: skip
        except RuntimeError:
            if not setup_errors.is_file():
                raise
            for worker in getattr(server, "inference_workers", []):
                worker.terminate()
                worker.join(timeout=30)
            raise ServeConfigError(f"the models could not be loaded: {setup_errors.read_text()}") from None
    if stops:
        raise Stopped(stops[0])
