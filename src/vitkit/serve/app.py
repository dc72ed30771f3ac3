"""The prediction server: FastAPI routes, a request size limit and the micro-batcher.

    GET  /         the web page (drop an image, see the top-5 classes and the attention overlay)
    GET  /health   model, backend, limits and batching counters
    POST /predict  multipart field `file` (one image) -> top-k classes with probabilities
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError

from .batcher import MicroBatcher
from .page import PAGE
from .predictor import OnnxPredictor, TorchPredictor, decode_image, load_predictor

DEFAULT_MAX_UPLOAD = 10 * 2**20


class UploadLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app sees it.

    A declared Content-Length over the limit is refused without parsing; a body without one
    (chunked) is counted as it streams. Either way the rest of the body is read and dropped, up
    to `DRAIN_LIMIT`, so that the client, still sending, receives the 413 instead of a reset
    connection; beyond that the connection is closed.
    """

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
                # FastAPI passes an HTTPException raised while reading the body through as the response.
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


def create_app(
    predictor: TorchPredictor | OnnxPredictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
) -> FastAPI:
    """The FastAPI app serving `predictor` (see `load_predictor`)."""
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
    # One model thread: batches run one after another, never two forward passes at once.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitkit-model")

    def run_batch(with_attention: bool):
        def fn(images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
            probs, maps = predictor(torch.stack(images), attention=with_attention)  # (B, classes), (B, h, w)
            return [(probs[i], None if maps is None else maps[i]) for i in range(len(images))]
        return fn

    # Requests that want the attention overlay take the slower explicit-attention path: batch them apart.
    batchers = {flag: MicroBatcher(run_batch(flag), executor, max_batch=max_batch, max_wait_ms=max_wait_ms)
                for flag in (False, True)}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for b in batchers.values():
            b.start()
        yield
        for b in batchers.values():
            await b.stop()
        executor.shutdown(wait=False)

    app = FastAPI(title="vitkit", summary=f"Image classification with {predictor.name}", lifespan=lifespan)
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/health")
    async def health() -> dict[str, Any]:
        pre, stats = predictor.preprocess, [b.stats() for b in batchers.values()]
        batching = {"requests": sum(s["requests"] for s in stats), "batches": sum(s["batches"] for s in stats),
                    "largest_batch": max(s["largest_batch"] for s in stats), "max_batch": max_batch}
        return {"status": "ok", "model": predictor.name, "backend": predictor.backend,
                "classes": len(predictor.classes), "img_size": list(pre.img_size), "mode": pre.mode,
                "attention": predictor.has_attention, "max_upload_bytes": max_upload_bytes, "batching": batching}

    @app.post("/predict")
    async def predict(
        file: UploadFile | None = File(None, description="the image (PNG, JPEG, ... anything PIL reads)"),
        topk: int = Query(5, ge=1, le=1000, description="number of classes to return"),
        attention: bool = Query(False, description="add the attention-rollout map (served run directories)"),
    ) -> dict[str, Any]:
        if file is None:
            raise HTTPException(400, "no image: send it as the multipart/form-data field 'file'")
        data = await file.read()
        if not data:
            raise HTTPException(400, f"the upload {file.filename!r} is empty")
        x = await run_in_threadpool(_to_tensor, data, file.filename, predictor)
        probs, attn = await batchers[attention and predictor.has_attention].submit(x)
        p, idx = probs.topk(min(topk, len(predictor.classes)))
        return {"image": file.filename, "model": predictor.name,
                "top": [{"class": predictor.classes[j], "prob": round(float(q), 6)} for q, j in zip(p, idx.tolist())],
                "attention": None if attn is None else {"grid": list(attn.shape), "values": attn.round(decimals=4).tolist()}}

    return app


def _to_tensor(data: bytes, filename: str | None, predictor) -> torch.Tensor:
    """Decode and preprocess one upload (in a worker thread: decoding is CPU work)."""
    try:
        image = decode_image(data, predictor.preprocess.mode)
    except ValueError as e:
        cause = e.__cause__
        if isinstance(cause, Image.DecompressionBombError):
            raise HTTPException(413, f"{filename!r} has too many pixels: {cause}") from e
        # PIL's own message for an unknown format names the in-memory buffer, which helps nobody.
        why = "unknown format" if isinstance(cause, UnidentifiedImageError) else str(cause or e)
        raise HTTPException(415, f"{filename!r} is not an image this server can read (PNG, JPEG, WebP, ...): {why}") from e
    return predictor.preprocess([image])[0]


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, **app_options: Any) -> None:
    """Serve a run directory or an ONNX export until interrupted (`vitkit serve`)."""
    import uvicorn

    uvicorn.run(create_app(load_predictor(path), **app_options), host=host, port=port, log_level="info")


class BackgroundServer:
    """A real uvicorn server for `app` in a daemon thread, on a free loopback port (tests, notebooks).

        with BackgroundServer(app) as url:
            httpx.get(url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
