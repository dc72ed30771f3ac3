"""The prediction server: FastAPI routes, request limits, a bounded queue and the micro-batcher.

    GET  /         the web page (drop an image, see the top-5 classes and the attention overlay)
    GET  /health   model, backend, limits and batching counters
    GET  /metrics  answers by status, rejections, recent latency percentiles, queue depth, batch sizes
    POST /predict  multipart field `file` (one image) -> top-k classes with probabilities

Overload is refused early and cheaply: a request takes a place in the queue before its upload is
read, and gets 503 with Retry-After when there is none, so what a burst costs in memory is bounded.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import socket
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from .batcher import Capacity, MicroBatcher, QueueFull, Ticket
from .page import PAGE
from .predictor import OnnxPredictor, TorchPredictor, decode_image, load_predictor

DEFAULT_MAX_UPLOAD = 10 * 2**20
DEFAULT_MAX_QUEUE = 64  # two full batches of the default --max-batch waiting behind the running one
DEFAULT_TIMEOUT_S = 30.0
# One decode peaks at about 14 bytes per pixel (RGB image, its tensor, the resize): ~560 MiB at 40 MP.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
LATENCY_WINDOW = 1000  # /metrics' percentiles are over the last this many answered requests

# The request body /predict reads itself (after taking its place in the queue), described for /docs.
_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "the image (PNG, JPEG, ... anything PIL reads)"}}}}}}}


class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` (declared, or counted as a chunked body streams) gets
    413 before the app sees it. The rest is read and dropped (up to `DRAIN_LIMIT`; beyond, the connection
    is closed) so that a client still sending receives the 413 instead of a reset connection."""

    DRAIN_LIMIT = 256 * 2**20

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= self.DRAIN_LIMIT:
                await _drain(receive, 0)
            return await _send_json(send, 413, {"detail": self._message(int(length))})
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                if message.get("more_body"):
                    seen = await _drain(receive, seen)
                # Raised while /predict reads the form: FastAPI answers it like any HTTPException.
                raise HTTPException(413, self._message(seen))
            return message

        await self.app(scope, counted_receive, send)

    def _message(self, size: int) -> str:
        return f"the upload is {_size(size)}; this server accepts at most {_size(self.max_bytes)} per request"


async def _drain(receive, seen: int) -> int:
    """Read and drop the rest of a request body (up to `UploadLimit.DRAIN_LIMIT`); the bytes seen."""
    while seen <= UploadLimit.DRAIN_LIMIT:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    return seen


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{n} bytes"


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()  # as FastAPI writes its own errors
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class RequestStats:
    """What /metrics says about POST /predict: answers by status and the latency of recent successes."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.by_status: Counter[int] = Counter()
        # Successes only: refusals take microseconds and would hide how long an answer takes.
        self.latencies: deque[float] = deque(maxlen=window)
        self.started = time.monotonic()

    def record(self, status: int, seconds: float) -> None:
        self.by_status[status] += 1
        if status == 200:
            self.latencies.append(seconds)

    def percentiles_ms(self) -> dict[str, float | int | None]:
        """Nearest-rank p50/p90/p99 of the window in ms (None before the first success), and its size."""
        ordered = sorted(self.latencies)

        def pick(q: float) -> float | None:
            return round(1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2) if ordered else None

        return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "samples": len(ordered)}


class PredictStats:
    """ASGI middleware, outermost (so UploadLimit's 413s count): times each /predict and records its status."""

    def __init__(self, app, stats: RequestStats) -> None:
        self.app, self.stats = app, stats

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # an exception escaping the app is answered 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.stats.record(status, time.perf_counter() - start)


class _Server:
    """The state behind the routes: the predictor, its batchers, the queue bound and the counters."""

    def __init__(self, predictor, *, max_upload_bytes: int, max_batch: int, max_wait_ms: float, max_queue: int,
                 timeout_s: float, max_image_pixels: int, decode_threads: int) -> None:
        self.predictor, self.max_upload_bytes, self.max_batch = predictor, max_upload_bytes, max_batch
        self.timeout_s, self.max_image_pixels = timeout_s, max_image_pixels
        # One model thread: batches run one after another, never two forward passes at once.
        self.model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitkit-model")
        # Few decoding threads: each holds at most one decoded image, so they bound decoding memory.
        self.decode_pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="vitkit-decode")
        self.capacity = Capacity(max_queue)  # shared: the bound holds across both batchers
        # Requests that want the attention overlay take the slower explicit-attention path: batch them apart.
        self.batchers = {flag: MicroBatcher(self._run_batch(flag), self.model_pool, max_batch=max_batch,
                                            max_wait_ms=max_wait_ms, capacity=self.capacity) for flag in (False, True)}
        self.stats = RequestStats()
        self.rejected = 0
        self._retry_after = (-math.inf, 1)  # (when computed, seconds)

    def _run_batch(self, with_attention: bool):
        def fn(images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
            probs, maps = self.predictor(torch.stack(images), attention=with_attention)  # (B, classes), (B, h, w)
            return [(probs[i], None if maps is None else maps[i]) for i in range(len(images))]
        return fn

    async def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def stop(self) -> None:
        """Finish what is queued (uvicorn has stopped accepting and waited for open requests), then stop."""
        for b in self.batchers.values():
            await b.stop(drain_timeout=self.timeout_s)
        self.model_pool.shutdown(wait=False)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def admit(self) -> Ticket:
        """A place in the queue, or 503 with Retry-After."""
        try:
            return self.capacity.enter()
        except QueueFull as e:
            self.rejected += 1
            wait = self.retry_after()
            raise HTTPException(503, f"the server is busy: {e}; retry in {wait} s",
                                headers={"Retry-After": str(wait)}) from None

    def retry_after(self) -> int:
        """Seconds to wait: the recent median latency, about what a queued request waits when the queue is full."""
        now = time.monotonic()
        if now - self._retry_after[0] > 1:  # refreshed once a second: a flood of refusals must stay cheap
            p50 = self.stats.percentiles_ms()["p50"]
            self._retry_after = (now, min(60, max(1, math.ceil((p50 or 0) / 1000))))
        return self._retry_after[1]

    async def classify(self, request: Request, ticket: Ticket, attention: bool) -> tuple[str | None, Any]:
        """Read, decode and batch one upload; `ticket` goes back to the queue once its batch starts."""
        try:
            data, filename = await _read_upload(request)
            x = await asyncio.get_running_loop().run_in_executor(
                self.decode_pool, _to_tensor, data, filename, self.predictor.preprocess, self.max_image_pixels)
        except BaseException:
            ticket.leave()  # never queued: the place is free again (cancellation by the timeout included)
            raise
        batcher = self.batchers[attention and self.predictor.has_attention]
        try:
            return filename, await batcher.submit(x, ticket)
        except QueueFull as e:  # the server began shutting down meanwhile
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None

    def health(self) -> dict[str, Any]:
        pre, stats = self.predictor.preprocess, [b.stats() for b in self.batchers.values()]
        batching = {"requests": sum(s["requests"] for s in stats), "batches": sum(s["batches"] for s in stats),
                    "largest_batch": max(s["largest_batch"] for s in stats), "max_batch": self.max_batch}
        return {"status": "ok", "model": self.predictor.name, "backend": self.predictor.backend,
                "classes": len(self.predictor.classes), "img_size": list(pre.img_size), "mode": pre.mode,
                "attention": self.predictor.has_attention, "max_upload_bytes": self.max_upload_bytes,
                "max_queue": self.capacity.limit, "timeout_s": self.timeout_s,
                "max_image_pixels": self.max_image_pixels, "batching": batching}

    def metrics(self) -> dict[str, Any]:
        b = [x.stats() for x in self.batchers.values()]
        run, batches, by_status = sum(s["requests"] for s in b), sum(s["batches"] for s in b), self.stats.by_status
        return {"requests": sum(by_status.values()), "by_status": {str(k): v for k, v in sorted(by_status.items())},
                "rejected": self.rejected, "timed_out": by_status[504], "latency_ms": self.stats.percentiles_ms(),
                "queue": {"depth": self.capacity.depth, "max": self.capacity.limit, "peak": self.capacity.peak},
                "batches": batches, "mean_batch_size": round(run / batches, 3) if batches else None,
                "largest_batch": max(s["largest_batch"] for s in b), "max_batch": self.max_batch,
                "dropped": sum(s["dropped"] for s in b), "uptime_s": round(time.monotonic() - self.stats.started, 1)}


def create_app(predictor: TorchPredictor | OnnxPredictor, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               max_batch: int = 32, max_wait_ms: float = 2.0, max_queue: int = DEFAULT_MAX_QUEUE,
               timeout_s: float = DEFAULT_TIMEOUT_S, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               decode_threads: int | None = None) -> FastAPI:
    """The FastAPI app serving `predictor` (see `load_predictor`). `max_queue`: requests waiting at once
    (from admission to the start of their batch), more get 503; `timeout_s`: a request not answered by
    then gets 504 and its work is dropped; `max_image_pixels`: larger images (or resized copies) get
    413; `decode_threads`: default min(4, cores)."""
    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_queue", max_queue),
                        ("timeout_s", timeout_s), ("max_image_pixels", max_image_pixels)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    server = _Server(predictor, max_upload_bytes=max_upload_bytes, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     max_queue=max_queue, timeout_s=timeout_s, max_image_pixels=max_image_pixels,
                     decode_threads=decode_threads or min(4, os.cpu_count() or 1))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        yield
        await server.stop()

    app = FastAPI(title="vitkit", summary=f"Image classification with {predictor.name}", lifespan=lifespan)
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    app.add_middleware(PredictStats, stats=server.stats)  # added last: the outermost
    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: _Server) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return server.metrics()

    @app.post("/predict", openapi_extra=_UPLOAD_SCHEMA)
    async def predict(
        request: Request,
        topk: int = Query(5, ge=1, le=1000, description="number of classes to return"),
        attention: bool = Query(False, description="add the attention-rollout map (served run directories)"),
    ) -> dict[str, Any]:
        # Read here, not by FastAPI: a request refused for a full queue costs no upload (uvicorn drops it unread).
        ticket = server.admit()
        try:
            answer = server.classify(request, ticket, attention)
            filename, (probs, attn) = await asyncio.wait_for(answer, server.timeout_s)
        except asyncio.TimeoutError:  # the wait cancelled the request: a queued one is dropped, not run
            raise HTTPException(504, f"no answer within {server.timeout_s:g} s (the server is overloaded, or the "
                                     "upload came too slowly); the request was dropped") from None
        classes = server.predictor.classes
        p, idx = probs.topk(min(topk, len(classes)))
        return {"image": filename, "model": server.predictor.name,
                "top": [{"class": classes[j], "prob": round(float(q), 6)} for q, j in zip(p, idx.tolist())],
                "attention": None if attn is None else {"grid": list(attn.shape), "values": attn.round(decimals=4).tolist()}}


async def _read_upload(request: Request) -> tuple[bytes, str | None]:
    """The bytes and file name of the multipart field `file`; 400 when it is missing or empty."""
    # One file: the parser refuses more (400) instead of spooling them.
    form = await request.form(max_files=1, max_fields=16)
    try:
        file = form.get("file")
        if file is None:
            raise HTTPException(400, "no image: send it as the multipart/form-data field 'file'")
        if not isinstance(file, UploadFile):
            raise HTTPException(400, "the field 'file' is text: send the image as a file (multipart/form-data)")
        data = await file.read()
    finally:
        await form.close()
    if not data:
        raise HTTPException(400, f"the upload {file.filename!r} is empty")
    return data, file.filename


def _to_tensor(data: bytes, filename: str | None, preprocess, max_pixels: int) -> torch.Tensor:
    """Check, decode and preprocess one upload (in a decoding thread: this is CPU work)."""
    try:
        _check_pixels(data, filename, tuple(preprocess.img_size), max_pixels)
        return preprocess([decode_image(data, preprocess.mode)])[0]
    except HTTPException:
        raise
    # A crafted file can make a decoder raise anything (struct.error, IndexError, ...): still the client's file.
    except Exception as e:  # noqa: BLE001
        raise _unreadable(filename, e) from e


def _check_pixels(data: bytes, filename: str | None, img_size: tuple[int, int], max_pixels: int) -> None:
    """413 for an image over `max_pixels`, or whose copy resized for the model would be, from its header alone:
    a decompression bomb is a small file declaring a huge image, and a 1 x 10^7 strip within the limit
    would grow 10^7 times when its shorter side is resized to the model's size."""
    with Image.open(io.BytesIO(data)) as im:  # parses the header; no pixel is decoded yet
        w, h = im.size
    if min(w, h) < 1:
        raise HTTPException(415, f"{filename!r} declares an image of {w}x{h} pixels")
    side = min(img_size)
    resized = side * side * max(w, h) / min(w, h)  # the shorter side becomes `side`, before the crop
    if w * h > max_pixels or resized > max_pixels:
        what = ("" if w * h > max_pixels
                else f"; resized to {side} px on its shorter side it would be {resized / 1e6:.0f} MP")
        raise HTTPException(413, f"{filename!r} is {w}x{h} pixels{what}; this server decodes images of at most "
                                 f"{max_pixels / 1e6:g} MP")


def _unreadable(filename: str | None, e: Exception) -> HTTPException:
    """The 4xx for an upload PIL could not open or decode."""
    cause = e.__cause__ if isinstance(e, ValueError) and e.__cause__ is not None else e  # load_image wraps PIL's error
    if isinstance(cause, Image.DecompressionBombError):  # over PIL's own limit, whatever max_image_pixels says
        return HTTPException(413, f"{filename!r} has too many pixels: {cause}")
    # PIL's own message for an unknown format names the in-memory buffer, which helps nobody.
    why = "unknown format" if isinstance(cause, UnidentifiedImageError) else str(cause) or type(cause).__name__
    return HTTPException(415, f"{filename!r} is not an image this server can read (PNG, JPEG, WebP, ...): {why}")


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, **app_options: Any) -> None:
    """Serve a run directory or an ONNX export until interrupted (`vitkit serve`). On SIGTERM or Ctrl-C
    uvicorn stops accepting, waits for open requests and the queue drains: no request outlives `timeout_s`."""
    import uvicorn

    grace = app_options.get("timeout_s", DEFAULT_TIMEOUT_S) + 5
    uvicorn.run(create_app(load_predictor(path), **app_options), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=grace)


class BackgroundServer:
    """A real uvicorn server for `app` in a daemon thread, on a free loopback port (tests, notebooks).

        with BackgroundServer(app) as url:
            httpx.get(url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1") -> None:
        import uvicorn

        # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off only on sockets that say so, and
        # with it on, each response waits ~40 ms for the client's delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind((host, 0))  # the OS picks a free port; uvicorn serves on this very socket
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(1000):
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the server did not start")
        return self.url

    def __exit__(self, *exc) -> None:
        """Stop as uvicorn does on SIGTERM: no new connections, open requests answered, queue drained."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
