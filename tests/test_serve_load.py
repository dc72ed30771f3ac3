"""The prediction server under load and abuse: a flood against a small queue, and 1,000+ malformed uploads."""

import io
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from vitkit.serve import BackgroundServer, create_app, load_predictor  # noqa: E402

# The server of the flood test, in its own process so that its memory is its own: a predictor slowed
# to `delay` s per batch of one saturates it on any machine.
SLOW_SERVER = r"""
import sys, time
import uvicorn
from vitkit.serve import create_app, load_predictor

run_dir, port, delay, max_queue = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
class Slow:
    def __init__(self, predictor):
        self.predictor = predictor

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def __call__(self, x, attention=False):
        time.sleep(delay)
        return self.predictor(x, attention=attention)

app = create_app(Slow(load_predictor(run_dir)), max_queue=max_queue, max_batch=1, max_wait_ms=0, timeout_s=30)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random pixels: they do not compress, so a cut file always lacks pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.fixture()
def slow_server(digits16_run):
    """A `max_queue=2`, one-image-batch server taking 50 ms per batch, in its own process: (url, pid)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(digits16_run), str(port), "0.05", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_flood_gets_503_with_retry_after_in_bounded_memory(slow_server):
    url, pid = slow_server
    # ~0.9 MiB uploads: a queue that admitted all 48 at once would hold ~48 of them (and their spooled
    # copies); two waiting and one running hold three.
    payload = _png(_noise(540, 540))
    assert 0.8 * 2**20 < len(payload) < 2**20

    def post(client: httpx.Client) -> httpx.Response:
        return client.post("/predict", files={"file": ("noise.png", payload, "image/png")})

    with httpx.Client(base_url=url, timeout=60) as c:  # warm up: the first requests allocate for good
        for _ in range(3):
            assert post(c).status_code == 200
    exact = _reset_peak(pid)
    base = _kib(pid, "VmRSS" if exact else "VmHWM")

    def client(_: int) -> list[httpx.Response]:
        with httpx.Client(base_url=url, timeout=60) as c:
            return [post(c) for _ in range(4)]

    with ThreadPoolExecutor(48) as pool:
        answers = [r for rs in pool.map(client, range(48)) for r in rs]
    growth_mib = (_kib(pid, "VmHWM") - base) / 1024

    statuses = [r.status_code for r in answers]
    refused = [r for r in answers if r.status_code == 503]
    assert set(statuses) <= {200, 503}, statuses
    assert len(refused) >= 48 and statuses.count(200) >= 3  # 192 requests at ~20/s: most are refused
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert "the server is busy" in refused[0].json()["detail"]
    assert growth_mib < 32, f"the server's peak RSS grew by {growth_mib:.0f} MiB during the flood"

    m = httpx.get(url + "/metrics").json()
    assert m["rejected"] == len(refused) and m["by_status"]["503"] == len(refused)
    assert m["queue"]["max"] == 2 and m["queue"]["peak"] <= 2 and m["queue"]["depth"] == 0
    assert m["largest_batch"] == 1 and m["latency_ms"]["p99"] >= m["latency_ms"]["p50"] >= 50
    with httpx.Client(base_url=url, timeout=60) as c:  # and it still serves
        r = post(c)
        assert r.status_code == 200 and len(r.json()["top"]) == 5


# --- fuzzing -------------------------------------------------------------------------------------

MAX_UPLOAD = 256 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(w: int, h: int) -> bytes:
    """A well-formed PNG header (CRCs right) for a w x h RGB image, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _jpeg_declaring(w: int, h: int, good_jpeg: bytes) -> bytes:
    """`good_jpeg` with its frame header (SOF0) rewritten to declare w x h."""
    i = good_jpeg.index(b"\xff\xc0")
    return good_jpeg[: i + 5] + struct.pack(">HH", h, w) + good_jpeg[i + 9 :]


def _gif_declaring(w: int, h: int) -> bytes:
    size = struct.pack("<HH", w, h)
    return b"GIF89a" + size + b"\x00\x00\x00" + b",\x00\x00\x00\x00" + size + b"\x00\x02\x02D\x01\x00;"


def _bmp_declaring(w: int, h: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 12, 0, 0, 54) + header + b"\0" * 12


def _multipart(parts: list[tuple[str, str | None, str, bytes]], boundary: str = "fuzzb") -> bytes:
    """A multipart/form-data body of (field, filename, content type, data) parts."""
    out = b""
    for field, filename, ctype, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n"
        out += head.encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {"content-type": "multipart/form-data; boundary=fuzzb"}


def _malformed_requests(rng: random.Random, png: bytes, jpeg: bytes):
    """Endless (description, request kwargs) of malformed uploads, cycling through every kind."""

    def file(data: bytes, name: str = "x.png", ctype: str = "image/png") -> dict:
        return {"files": {"file": (name, data, ctype)}}

    def cut(data: bytes) -> bytes:  # noise images: any cut before 80% lacks pixel data
        return data[: rng.randrange(1, int(0.8 * len(data)))]

    kinds = [
        ("random bytes", lambda: file(rng.randbytes(rng.randrange(1, 4000)))),
        ("random bytes behind a PNG signature", lambda: file(png[:8] + rng.randbytes(rng.randrange(0, 2000)))),
        ("random bytes behind a JPEG marker",
         lambda: file(b"\xff\xd8\xff\xe0" + rng.randbytes(rng.randrange(0, 2000)), "x.jpg", "image/jpeg")),
        ("truncated PNG", lambda: file(cut(png))),
        ("truncated JPEG", lambda: file(cut(jpeg), "x.jpg", "image/jpeg")),
        ("text as a file", lambda: file(b"just some notes\n" * rng.randrange(1, 50), "notes.txt", "text/plain")),
        ("empty file", lambda: file(b"")),
        ("empty body", lambda: {}),
        ("empty multipart body", lambda: {"content": b"", "headers": MULTIPART}),
        ("JSON body", lambda: {"json": {"file": "x.png", "data": rng.random()}}),
        ("raw image bytes, not multipart", lambda: {"content": png, "headers": {"content-type": "image/png"}}),
        ("url-encoded form", lambda: {"data": {"image": "x"}}),
        ("missing field 'file'", lambda: {"files": {"image": ("x.png", png, "image/png")}}),
        ("'file' as a text field",
         lambda: {"content": _multipart([("file", None, "text/plain", b"x.png")]), "headers": MULTIPART}),
        ("two files", lambda: {"content": _multipart([("file", "a.png", "image/png", png)] * 2), "headers": MULTIPART}),
        ("no boundary parameter", lambda: {"content": _multipart([("file", "a.png", "image/png", png)]),
                                           "headers": {"content-type": "multipart/form-data"}}),
        ("wrong boundary",
         lambda: {"content": _multipart([("file", "a.png", "image/png", png)], "other"), "headers": MULTIPART}),
        ("unterminated multipart",
         lambda: {"content": _multipart([("file", "a.png", "image/png", png)])[: -rng.randrange(10, 200)],
                  "headers": MULTIPART}),
        ("garbage multipart", lambda: {"content": rng.randbytes(rng.randrange(1, 3000)), "headers": MULTIPART}),
        ("PNG declaring 100000 x 100000", lambda: file(_png_declaring(100_000, 100_000))),
        ("PNG declaring 8000 x 8000", lambda: file(_png_declaring(8000, 8000))),
        ("PNG declaring 1 x 5000000", lambda: file(_png_declaring(1, 5_000_000))),
        ("PNG declaring 0 x 10", lambda: file(_png_declaring(0, 10))),
        ("JPEG declaring 65000 x 65000", lambda: file(_jpeg_declaring(65000, 65000, jpeg), "x.jpg", "image/jpeg")),
        ("GIF declaring 65535 x 65535", lambda: file(_gif_declaring(65535, 65535), "x.gif", "image/gif")),
        ("BMP declaring 40000 x 40000", lambda: file(_bmp_declaring(40000, 40000), "x.bmp", "image/bmp")),
        ("upload over the size limit", lambda: file(png[:8] + rng.randbytes(MAX_UPLOAD + 1))),
    ]
    while True:
        for kind in kinds:
            yield kind[0], kind[1]()


def test_fuzz_malformed_uploads_all_get_4xx(digits16_run):
    png = _png(_noise(48, 48, seed=1))
    jpeg_buf = io.BytesIO()
    _noise(48, 48, seed=2).save(jpeg_buf, "JPEG", quality=95)
    jpeg = jpeg_buf.getvalue()
    app = create_app(load_predictor(digits16_run), max_upload_bytes=MAX_UPLOAD)
    requests = _malformed_requests(random.Random(0), png, jpeg)
    wrong: dict[str, set[int]] = {}
    n = 0
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(1100):
            kind, kwargs = next(requests)
            status = c.post("/predict", **kwargs).status_code
            n += 1
            if not 400 <= status < 500:
                wrong.setdefault(kind, set()).add(status)
        assert c.get("/health").status_code == 200
        assert c.post("/predict", files={"file": ("ok.png", _png(_noise(20, 20)), "image/png")}).status_code == 200
        m = c.get("/metrics").json()
    assert n >= 1000 and not wrong, f"not a 4xx: {wrong}"
    assert m["requests"] == n + 1 and sum(v for k, v in m["by_status"].items() if k.startswith("4")) == n
