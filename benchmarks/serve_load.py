"""The load `vitkit serve` holds: requests/s, latency, refusals and memory at 1, 8 and 64 clients.

Run from the repository root (needs the serve extra, in the dev extra: `pip install -e ".[dev]"`):

    python benchmarks/serve_load.py                  # ~1.5 min: a tiny run, 10 s per row, two queue sizes
    python benchmarks/serve_load.py --seconds 3      # a quicker, noisier look
    python benchmarks/serve_load.py --run runs/mnist --clients 1 8 64 256

It trains a tiny run (`digits` at 16 px, one epoch) unless `--run` names one, then starts
`vitkit serve` on it in its own process on 127.0.0.1, once with the default queue and once with a
small one (`--small-queue`, default 4), and drives each with closed-loop clients (asyncio + httpx:
each client sends its next request as soon as it has an answer, for `--seconds`). A refused client
retries at once, ignoring Retry-After: the worst case for the server. The clients run on the same
machine as the server and share its cores. There is no peer server in this environment to compare
with, so the comparison is the same server with a small queue (overloaded) against the default.
Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

DEFAULT_QUEUE = 64  # `vitkit serve --max-queue`'s default


@dataclass
class Row:
    queue: int
    clients: int
    answered: int  # requests answered 200
    ok_per_s: float  # answered requests per second
    p50_ms: float | None  # latency of the answered requests
    p99_ms: float | None
    rejected: int  # 503s
    errors: int  # any other status, or no answer
    mean_batch: float | None  # images per forward pass during the row (the server's /metrics)
    peak_rss_mib: float | None  # the server process's VmHWM over this row (since its start where it cannot be reset)


def cpu_line() -> str:
    """Model name, cores, and which of AVX-512 (with bf16) / AVX2 `lscpu` lists."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    kind = "AVX-512" if any(f.startswith("avx512") for f in flags) else "AVX2" if "avx2" in flags else "no AVX2"
    if "avx512_bf16" in flags:
        kind += " with bf16"
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, {kind}"


def tiny_run(out: Path) -> Path:
    """A run directory trained quickly: `digits` at 16 px for one epoch."""
    import vitkit

    vitkit.train(vitkit.TrainConfig(data="digits", img_size=16, epochs=1, batch_size=64, num_workers=0, out=str(out)))
    return out


def test_image() -> bytes:
    """A 64x64 RGB PNG (the server resizes it to the model's 16 px); its content does not change the cost."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([(x * 4) % 256, (y * 4) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, max_queue: int) -> subprocess.Popen:
    """`vitkit serve` as a user starts it (access log included, sent to /dev/null), ready to answer."""
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", "serve", str(run), "--port", str(port),
                             "--max-queue", str(max_queue)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vitkit serve did not start (exit status {proc.poll()})")
        time.sleep(0.2)


def peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def reset_peak(pid: int) -> None:
    """Start the server's VmHWM again from its current RSS (Linux >= 4.0), so each row has its own peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is since the server started


async def drive(url: str, clients: int, seconds: float, image: bytes,
                kind: str = "raw") -> tuple[list[float], int, int, float]:
    """`clients` closed-loop clients for `seconds`: latencies (s) of the 200s, 503s, other outcomes, elapsed s."""
    latencies: list[float] = []
    counts = {"rejected": 0, "errors": 0}
    deadline = time.perf_counter() + seconds

    def record(status: int | None, started: float) -> None:
        if status == 200:
            latencies.append(time.perf_counter() - started)
        else:
            counts["rejected" if status == 503 else "errors"] += 1

    start = time.perf_counter()
    if kind == "httpx":
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            await asyncio.gather(*[httpx_client(client, image, deadline, record) for _ in range(clients)])
    else:
        request = raw_request(url, image)
        await asyncio.gather(*[raw_client(url, request, deadline, record) for _ in range(clients)])
    return latencies, counts["rejected"], counts["errors"], time.perf_counter() - start


async def httpx_client(client: httpx.AsyncClient, image: bytes, deadline: float, record) -> None:
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        try:
            r = await client.post("/predict", files={"file": ("image.png", image, "image/png")})
            record(r.status_code, t)
        except httpx.HTTPError:
            record(None, t)


def raw_request(url: str, image: bytes) -> bytes:
    """One POST /predict with `image` as the multipart field `file`, encoded once for every request."""
    boundary = "vitkit-bench"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {url.split('//')[1]}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def raw_client(url: str, request: bytes, deadline: float, record) -> None:
    """A keep-alive HTTP/1.1 client that sends the same bytes and reads the status and the body.

    httpx's own work (building each multipart body, its connection pool) saturated the 2-core test
    machine at ~70 requests/s with 64 connections while the server answered in ~20 ms: it measured
    the client. This does the least a client can.
    """
    host, port = url.split("//")[1].split(":")
    reader = writer = None
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            await writer.drain()
            status, keep_alive = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            status, keep_alive = None, False
        record(status, t)
        if not keep_alive and writer is not None:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status of one HTTP/1.1 response, its body read and dropped; whether the connection stays open."""
    status = int((await reader.readline()).split()[1])
    length, keep_alive = 0, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and "close" in value.lower():
            keep_alive = False
    await reader.readexactly(length)
    return status, keep_alive


def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[max(0, int(np.ceil(q * len(ordered))) - 1)]


def measure(run: Path, max_queue: int, client_counts: list[int], seconds: float, image: bytes,
            kind: str) -> tuple[list[Row], dict]:
    """One server with `--max-queue max_queue`: a row per client count, and its /metrics at the end."""
    port = free_port()
    proc = start_server(run, port, max_queue)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(drive(url, 1, 1.0, image, kind))  # warm-up: first requests allocate for good
        for clients in client_counts:
            reset_peak(proc.pid)
            before = httpx.get(url + "/metrics").json()
            lat, rejected, errors, elapsed = asyncio.run(drive(url, clients, seconds, image, kind))
            after = httpx.get(url + "/metrics").json()
            rows.append(Row(max_queue, clients, len(lat), len(lat) / elapsed, percentile_ms(lat, 0.5),
                            percentile_ms(lat, 0.99), rejected, errors, mean_batch(before, after),
                            peak_rss_mib(proc.pid)))
            print(format_row(rows[-1]), flush=True)
        last_metrics = after
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows, last_metrics


def mean_batch(before: dict, after: dict) -> float | None:
    """Images per forward pass between two /metrics answers."""
    batches = after["batches"] - before["batches"]
    images = after["mean_batch_size"] * after["batches"] - (before["mean_batch_size"] or 0) * before["batches"]
    return images / batches if batches else None


HEADER = (f"{'queue':>5} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'503s':>7} {'errors':>6} "
          f"{'batch':>6} {'peak RSS MiB':>12}")


def format_row(r: Row) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rss = "-" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.0f}"
    batch = "-" if r.mean_batch is None else f"{r.mean_batch:.1f}"
    return (f"{r.queue:>5} {r.clients:>7} {r.ok_per_s:>8.1f} {ms(r.p50_ms):>8} {ms(r.p99_ms):>8} {r.rejected:>7} "
            f"{r.errors:>6} {batch:>6} {rss:>12}")


def compare(default: list[Row], small: list[Row]) -> list[str]:
    """Per client count: the small queue's throughput and refusals against the default queue's."""
    lines = []
    for d, s in zip(default, small):
        ratio = s.ok_per_s / d.ok_per_s if d.ok_per_s else float("nan")
        lines.append(f"{d.clients:>3} clients, queue {s.queue} vs {d.queue}: throughput x{ratio:.2f}; "
                     f"refused {refused_share(s):.0%} vs {refused_share(d):.0%} of requests; "
                     f"p99 {s.p99_ms or 0:.1f} vs {d.p99_ms or 0:.1f} ms")
    return lines


def refused_share(r: Row) -> float:
    return r.rejected / max(1, r.answered + r.rejected + r.errors)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run directory to serve (default: train a tiny one, ~10 s)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each row drives the server")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients, one row each")
    p.add_argument("--small-queue", type=int, default=4, help="the overloaded comparison's --max-queue")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="raw: a minimal keep-alive HTTP/1.1 client on asyncio streams; httpx: httpx.AsyncClient")
    args = p.parse_args(argv)

    start = time.perf_counter()
    image = test_image()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or tiny_run(Path(tmp) / "run")
        print(f"CPU: {cpu_line()}")
        print(f"serving {run} with `vitkit serve` (max batch 32); {args.seconds:g} s per row; a {len(image)}-byte "
              f"64x64 PNG per request; {args.client} clients")
        print(HEADER)
        print("-" * len(HEADER))
        default, metrics = measure(run, DEFAULT_QUEUE, args.clients, args.seconds, image, args.client)
        small, _ = measure(run, args.small_queue, args.clients, args.seconds, image, args.client)
    print("\n".join(compare(default, small)))
    print(f"/metrics of the default-queue server at its end: {json.dumps(metrics, separators=(',', ':'))}")
    print(f"total {time.perf_counter() - start:.0f} s; req/s: answered (200) requests per second, p50/p99: their "
          "latency; batch: images per forward pass")


if __name__ == "__main__":
    main()
