"""The prediction server over real HTTP on loopback: good and bad uploads, size limit, concurrency, the CLI."""

import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import vitkit
from vitkit.data import load_data

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
pytest.importorskip("onnxruntime")

from vitkit.export import export_run  # noqa: E402
from vitkit.serve import BackgroundServer, MicroBatcher, QueueFull, create_app, load_predictor  # noqa: E402

MAX_UPLOAD = 64 * 1024


@pytest.fixture(scope="module")
def run_dir(digits16_run):
    return digits16_run  # conftest.py: trained once per session


@pytest.fixture(scope="module")
def run(run_dir):
    return vitkit.load_run(run_dir)


@pytest.fixture(scope="module")
def url(run_dir):
    # A 50 ms batching window, so that concurrent requests reliably meet in one batch.
    app = create_app(load_predictor(run_dir), max_upload_bytes=MAX_UPLOAD, max_batch=8, max_wait_ms=50)
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def images():
    """Eight validation digits as RGB PNG bytes (the model is greyscale: the server converts)."""
    val = load_data("digits").val
    out = []
    for i in range(8):
        im = Image.fromarray(val.images[i, 0].numpy()).resize((64, 64), Image.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _expected(run, data: bytes, k: int = 5):
    return run.predict([Image.open(io.BytesIO(data))], topk=k)[0]


def _post(client, data: bytes, name="digit.png", **params):
    return client.post("/predict", params=params, files={"file": (name, data, "image/png")})


def test_health(url):
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "vit_pico_conv4_28" and h["backend"] == "pytorch"
    assert h["classes"] == 10 and h["img_size"] == [16, 16] and h["attention"] is True
    assert h["max_upload_bytes"] == MAX_UPLOAD
    assert h["max_queue"] == 64 and h["timeout_s"] == 30 and h["max_image_pixels"] == 40_000_000


def test_predict_good_images(url, run, images):
    with httpx.Client(base_url=url) as c:
        r = _post(c, images[0], topk=3)
        assert r.status_code == 200
        body = r.json()
        assert body["image"] == "digit.png" and body["attention"] is None
        assert [(t["class"], pytest.approx(t["prob"], abs=1e-5)) for t in body["top"]] == _expected(run, images[0], 3)
        jpeg = io.BytesIO()
        Image.open(io.BytesIO(images[1])).save(jpeg, "JPEG", quality=95)
        top = _post(c, jpeg.getvalue(), "digit.jpg").json()["top"]
        assert len(top) == 5 and top[0]["class"] == _expected(run, jpeg.getvalue())[0][0]


def test_attention_map(url, images):
    body = httpx.post(url + "/predict", params={"attention": "true"}, files={"file": ("d.png", images[2])}).json()
    a = body["attention"]
    # vitkit.explain.rollout's map, at the model's input size (16 px): the page lays it over the image.
    assert a["grid"] == [16, 16] and len(a["values"]) == 16 and all(len(row) == 16 for row in a["values"])
    flat = [v for row in a["values"] for v in row]
    assert min(flat) == 0 and max(flat) == 1


def test_bad_uploads_are_clear_4xx(url, images):
    with httpx.Client(base_url=url) as c:
        r = _post(c, b"this is a text file, not a picture", "notes.txt")
        assert r.status_code == 415 and "'notes.txt' is not an image" in r.json()["detail"]
        r = _post(c, images[0][: len(images[0]) // 2], "cut.png")  # a truncated PNG
        assert r.status_code == 415 and "'cut.png'" in r.json()["detail"]
        r = _post(c, b"", "empty.png")
        assert r.status_code == 400 and "empty" in r.json()["detail"]
        r = c.post("/predict", data={"image": "x"})
        assert r.status_code == 400 and "field 'file'" in r.json()["detail"]
        r = _post(c, images[0], topk=0)
        assert r.status_code == 422


def test_oversized_upload_gets_413(url, images):
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(4 * MAX_UPLOAD)
    with httpx.Client(base_url=url) as c:
        r = _post(c, big, "huge.png")  # declared Content-Length
        assert r.status_code == 413 and "at most 64 KiB" in r.json()["detail"]

        body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + big + b"\r\n--b--\r\n")

        def chunks():  # no Content-Length (chunked transfer): counted while streaming
            for i in range(0, len(body), 8192):
                yield body[i : i + 8192]

        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and "at most 64 KiB" in r.json()["detail"]
        assert _post(c, images[0]).status_code == 200  # and the server carries on


def test_concurrent_requests_are_batched_and_answered_correctly(url, run, images):
    async def all_at_once():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*[_apost(c, data) for data in images])

    async def _apost(c, data):
        return await c.post("/predict", files={"file": ("d.png", data, "image/png")})

    before = httpx.get(url + "/health").json()["batching"]
    responses = asyncio.run(all_at_once())
    for r, data in zip(responses, images):
        assert r.status_code == 200
        assert [(t["class"], pytest.approx(t["prob"], abs=1e-5)) for t in r.json()["top"]] == _expected(run, data)
    after = httpx.get(url + "/health").json()["batching"]
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8 and after["largest_batch"] >= 2


def test_micro_batcher_groups_waiting_requests_and_reports_errors():
    calls = []

    def double(items):
        calls.append(len(items))
        time.sleep(0.05)  # a busy model: requests arriving meanwhile wait for the next batch
        if "boom" in items:
            raise ValueError("boom")
        return [2 * i for i in items]

    async def scenario():
        b = MicroBatcher(double, ThreadPoolExecutor(1), max_batch=4, max_wait_ms=0)
        b.start()
        results = await asyncio.gather(*[b.submit(i) for i in range(10)])
        failed = await asyncio.gather(b.submit("boom"), return_exceptions=True)
        await b.stop()
        return results, failed

    results, failed = asyncio.run(scenario())
    assert results == [2 * i for i in range(10)]
    assert calls == [4, 4, 2, 1]  # what was queued, in batches of at most 4; then the failing one alone
    assert isinstance(failed[0], ValueError)


def test_metrics_count_answers_latency_and_batches(url, images):
    before = httpx.get(url + "/metrics").json()
    with httpx.Client(base_url=url) as c:
        for data in images[:3]:
            assert _post(c, data).status_code == 200
        assert _post(c, b"not an image", "notes.txt").status_code == 415
    m = httpx.get(url + "/metrics").json()
    assert m["requests"] - before["requests"] == 4
    assert m["by_status"]["200"] - before["by_status"].get("200", 0) == 3
    assert m["by_status"]["415"] - before["by_status"].get("415", 0) == 1
    lat = m["latency_ms"]
    assert lat["samples"] >= 3 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert m["queue"] == {"depth": 0, "max": 64, "peak": m["queue"]["peak"]} and m["queue"]["peak"] >= 1
    assert m["batches"] - before["batches"] == 3 and 1 <= m["mean_batch_size"] <= m["largest_batch"] <= 8
    assert m["rejected"] == 0 and m["timed_out"] == 0


class SlowPredictor:
    """A predictor taking `delay` s more per batch: a saturated server on any machine."""

    def __init__(self, predictor, delay: float) -> None:
        self.predictor, self.delay = predictor, delay

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def __call__(self, x, attention=False):
        time.sleep(self.delay)
        return self.predictor(x, attention=attention)


def test_timeout_gives_504_and_drops_queued_work(run_dir, images):
    # One batch of one takes 0.8 s and requests time out at 0.4 s: the first times out while it
    # runs, the second while it waits, and is then dropped instead of run.
    app = create_app(SlowPredictor(load_predictor(run_dir), 0.8), max_batch=1, max_wait_ms=0, timeout_s=0.4)

    async def two(url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            return await asyncio.gather(*[c.post("/predict", files={"file": ("d.png", d)}) for d in images[:2]])

    with BackgroundServer(app) as url:
        responses = asyncio.run(two(url))
        time.sleep(0.8)  # the running batch ends; the loop pops the abandoned request
        m = httpx.get(url + "/metrics").json()
    assert [r.status_code for r in responses] == [504, 504]
    assert "no answer within 0.4 s" in responses[0].json()["detail"]
    assert m["timed_out"] == 2 and m["batches"] == 1 and m["dropped"] == 1 and m["queue"]["depth"] == 0


def test_shutdown_answers_the_queued_requests(run_dir, images):
    """As on SIGTERM: uvicorn stops accepting, open requests are answered and the queue drained."""
    app = create_app(SlowPredictor(load_predictor(run_dir), 0.1), max_batch=1, max_wait_ms=0)
    background = BackgroundServer(app)
    url = background.__enter__()
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(httpx.post, url + "/predict", files={"file": ("d.png", images[i])}, timeout=30)
                   for i in range(6)]
        deadline = time.monotonic() + 10
        while httpx.get(url + "/metrics").json()["queue"]["depth"] < 3:  # wait until requests are queued
            assert time.monotonic() < deadline
            time.sleep(0.01)
        background.__exit__(None, None, None)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 6
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(url + "/health")


def test_micro_batcher_bounded_queue_and_draining_stop():
    def slow_double(items):
        time.sleep(0.05)
        return [2 * i for i in items]

    async def scenario():
        b = MicroBatcher(slow_double, ThreadPoolExecutor(1), max_batch=1, max_wait_ms=0, capacity=2)
        b.start()
        running = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.02)  # its batch has started: it left the queue
        queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        assert b.capacity.depth == 2
        with pytest.raises(QueueFull, match="queue is full"):
            await b.submit(4)
        await b.stop(drain_timeout=5)  # finishes what is queued
        with pytest.raises(QueueFull, match="shutting down"):
            await b.submit(5)
        return await running, [await q for q in queued], b.capacity.depth

    assert asyncio.run(scenario()) == (2, [4, 6], 0)


def test_onnx_export_is_served_without_attention(run_dir, run, images, tmp_path):
    export_run(run_dir, "onnx", tmp_path / "onnx", int8=False)
    app = create_app(load_predictor(tmp_path / "onnx" / "model.onnx"))
    with BackgroundServer(app) as url:
        assert httpx.get(url + "/health").json()["backend"] == "onnxruntime"
        body = httpx.post(url + "/predict", params={"attention": "true"}, files={"file": ("d.png", images[3])}).json()
    assert body["attention"] is None
    assert [(t["class"], pytest.approx(t["prob"], abs=1e-4)) for t in body["top"]] == _expected(run, images[3])


def test_pickled_exports_are_not_served(run_dir, tmp_path):
    export_run(run_dir, "torchscript", tmp_path / "ts")
    with pytest.raises(ValueError, match="runs ONNX exports and run directories"):
        load_predictor(tmp_path / "ts")
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load_predictor(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(run_dir, images):
    """`vitkit serve` in its own process, as a user starts it."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", "serve", str(run_dir), "--port", str(port),
                             "--max-queue", "8", "--timeout-s", "20", "--max-image-pixels", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
            time.sleep(0.2)
        h = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert (h["max_queue"], h["timeout_s"], h["max_image_pixels"]) == (8, 20, 1_000_000)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("d.png", images[0])})
        assert r.status_code == 200 and len(r.json()["top"]) == 5
        assert "<title>vitkit</title>" in httpx.get(f"http://127.0.0.1:{port}/").text
    finally:
        proc.terminate()  # SIGTERM: uvicorn's graceful shutdown (it then re-raises the signal: status -15)
        proc.wait(timeout=20)
        reader.join(timeout=5)
    assert "Application shutdown complete" in "".join(log)
