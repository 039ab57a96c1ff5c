"""Benchmark of the API: get_status under concurrent load, and upload_file on large files.

Run from the repository root, with PostgreSQL on 127.0.0.1:5432:

    .venv/bin/python bench/api.py --json var/bench-api.json
    .venv/bin/python bench/api.py --quick

The harness creates a scratch PostgreSQL database and a temporary data directory and starts
`rundpo-server api` on a loopback port. Through the API it creates accounts (`--accounts`),
uploads a file for each and starts runs on it (`--runs-per-account`). It then moves every
run to "Training DPO" with metrics, so that get_status returns a full body. It measures:

1. get_status: requests per second and p50/p99 latency at each client count, and the same
   for `bench/bare_app.py`, a bare FastAPI endpoint that returns the same JSON with no
   database and no API key, served by uvicorn with the same arguments (worker count, log
   level, and uvicorn's automatic choice of event loop and HTTP parser). Each request polls
   a run drawn at random, with its account's key, as many users polling their own runs
   would. The bare endpoint gets the same requests. The two servers are measured in turn,
   repeat by repeat, so that noise from other load hits both alike. The load generator is
   `wrk` when it is installed, otherwise an asyncio client in this process. Each
   measurement stops after `--duration-s` or `--max-requests`.
2. upload_file: MB/s (1 MB = 10^6 bytes) and peak RSS of the server's process tree for
   preference files built by repeating the pairs in examples/data. The client streams each
   file from disk with sendfile. The same file is also parsed line by line with orjson, and
   fed to `PreferenceFileValidator`, in this process, for comparison.

Rate limits are off (RUNDPO_RATE_LIMIT_PER_MINUTE=0), because a benchmark sends far more
requests per key than any limit allows. Results go to stdout as Markdown tables, and as
JSON with `--json`. The exit status is 1 when any target in `check_targets` is missed.
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson
import psutil
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.validation import PreferenceFileValidator  # noqa: E402

DATA_DIR = REPO / "examples" / "data"
HOST = "127.0.0.1"
MB = 1_000_000
READ_CHUNK_BYTES = 1024 * 1024
DEFAULT_POSTGRES_URL = os.environ.get(
    "RUNDPO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
# Each request polls a run drawn at random from BENCH_TARGETS (lines of "API_KEY RUN_NAME").
WRK_SCRIPT = """
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS"))
local done = 0
local requests = {}
for line in io.lines(os.getenv("BENCH_TARGETS")) do
  local key, run_name = line:match("^(%S+) (%S+)$")
  requests[#requests + 1] = wrk.format(
    "GET", wrk.path .. "?run_name=" .. run_name, {["X-API-Key"] = key}
  )
end
function request()
  return requests[math.random(#requests)]
end
function response(status, headers, body)
  done = done + 1
  if done >= max_requests then wrk.thread:stop() end
end
"""

# The targets that the checks at the end of a run compare against.
TARGET_CLIENTS = 64
MAX_STATUS_P99_MS = 50.0
MIN_STATUS_SHARE_OF_BARE = 0.5
MIN_UPLOAD_SHARE_OF_ORJSON = 0.5
MAX_UPLOAD_RSS_MB = 300.0


@dataclass
class LoadResult:
    """One load measurement of one endpoint at one client count."""

    server: str
    clients: int
    requests: int
    errors: int
    duration_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_request: float = 0.0


@dataclass
class UploadResult:
    """One upload of one generated file, with the in-process parsing baselines."""

    size_bytes: int
    pair_count: int
    upload_s: float
    upload_mb_s: float
    validator_mb_s: float
    orjson_parse_mb_s: float
    upload_share_of_orjson: float
    validator_share_of_orjson: float
    server_rss_before_mb: float
    server_rss_peak_mb: float
    largest_process_rss_peak_mb: float


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KB|MB|GB)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; write it like 10MB or 1GB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its URL and drop it afterwards."""
    name = f"rundpo_bench_{secrets.token_hex(6)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Server:
    """A server process started in its own session, so that its workers stop with it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, *args, "--port", str(self.port)],
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_until_healthy(timeout_s=60)

    def _wait_until_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout_s} s")

    def tree_rss_bytes(self) -> tuple[int, int]:
        """Return the RSS of the server and all its descendants: the sum and the largest."""
        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0, 0
        sizes = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                sizes.append(process.memory_info().rss)
        return sum(sizes), max(sizes, default=0)

    def tree_cpu_s(self) -> float:
        """Return the CPU seconds, user and system, used so far by the server's processes."""
        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def stop(self, timeout_s: float = 20) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def run_cli(args: list[str], env: dict[str, str]) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"rundpo-server {' '.join(args)} failed:\n{completed.stderr}")
    return completed.stdout


def source_lines() -> list[bytes]:
    lines = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                lines.append(line + b"\n")
    return lines


def write_preference_file(path: Path, size_bytes: int) -> None:
    """Write whole lines from examples/data, repeated, up to at most `size_bytes`."""
    lines = source_lines()
    block = b"".join(lines)
    written = 0
    with open(path, "wb") as handle:
        while written + len(block) <= size_bytes:
            handle.write(block)
            written += len(block)
        for line in lines:
            if written + len(line) > size_bytes:
                break
            handle.write(line)
            written += len(line)


def prepare_runs(
    api_url: str, api_keys: list[str], runs_per_account: int, work_dir: Path, database_url: str
) -> list[tuple[str, str]]:
    """Start runs for each key on a small file, move them to "Training DPO", return the pairs.

    Each pair is an API key and the name of one of its account's runs.
    """
    small = work_dir / "small.jsonl"
    small.write_bytes(b"".join(source_lines()[:50]))
    targets = []
    for api_key in api_keys:
        headers = {"X-API-Key": api_key}
        with open(small, "rb") as handle:
            response = httpx.post(
                f"{api_url}/upload_file", headers=headers, files={"jsonl_file": handle},
                timeout=60,
            )
        response.raise_for_status()
        file_id = response.json()["file_id"]
        for _ in range(runs_per_account):
            response = httpx.post(
                f"{api_url}/run_dpo",
                headers=headers,
                json={"file_id": file_id, "base_model": "Qwen/Qwen2-0.5B", "gpus": 1},
                timeout=60,
            )
            response.raise_for_status()
            targets.append((api_key, response.json()["run_name"]))

    metrics = {"loss": 0.4213, "rewards/accuracies": 0.71, "rewards/margins": 0.83, "epoch": 0.4}
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "UPDATE runs SET status = 'Training DPO', percent = 42.5, step = 120,"
                " total_steps = 300, started_at = now() - interval '10 minutes',"
                " phase_started_at = now() - interval '2 minutes',"
                " latest_metrics = CAST(:metrics AS JSON)"
            ),
            {"metrics": json.dumps(metrics)},
        )
    engine.dispose()
    return targets


def parse_wrk_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    factor = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[match.group(2)]
    return float(match.group(1)) * factor


def run_wrk(
    server: str, url: str, targets_path: Path, clients: int, duration_s: float,
    max_requests: int, script: Path,
) -> LoadResult:
    """Load `url` with wrk, one thread, `clients` keep-alive connections."""
    command = [
        "wrk", "-t1", f"-c{clients}", f"-d{max(1, round(duration_s))}s", "--latency",
        "--timeout", "10s", "-s", str(script), url,
    ]
    env = {
        **os.environ, "BENCH_MAX_REQUESTS": str(max_requests), "BENCH_TARGETS": str(targets_path)
    }
    output = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=duration_s + 60, check=True
    ).stdout
    completed = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    requests = int(completed.group(1))
    elapsed_s = parse_wrk_duration_ms(completed.group(2)) / 1000
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(count) for count in socket_errors.groups())
    return LoadResult(
        server=server,
        clients=clients,
        requests=requests,
        errors=errors,
        duration_s=round(elapsed_s, 2),
        requests_per_s=round(float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)), 1),
        p50_ms=round(parse_wrk_duration_ms(percentiles["50"]), 2),
        p99_ms=round(parse_wrk_duration_ms(percentiles["99"]), 2),
    )


async def _asyncio_client(
    port: int, requests: list[bytes], deadline: float, budget: list[int],
    latencies: list[float], errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            start = time.perf_counter()
            writer.write(random.choice(requests))
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            latencies.append(time.perf_counter() - start)
            if head[9:12] != b"200":
                errors[0] += 1
    finally:
        writer.close()


def run_asyncio_load(
    server: str, url: str, targets: list[tuple[str, str]], clients: int, duration_s: float,
    max_requests: int,
) -> LoadResult:
    """Load `url` from this process with `clients` keep-alive connections; wrk's fallback."""
    parsed = httpx.URL(url)
    path = parsed.raw_path.decode()
    requests = [
        (
            f"GET {path}?run_name={run_name} HTTP/1.1\r\nHost: {HOST}:{parsed.port}\r\n"
            f"X-API-Key: {api_key}\r\n\r\n"
        ).encode()
        for api_key, run_name in targets
    ]
    latencies: list[float] = []
    errors = [0]
    budget = [max_requests]

    async def load() -> float:
        start = time.perf_counter()
        deadline = start + duration_s
        await asyncio.gather(
            *(
                _asyncio_client(parsed.port, requests, deadline, budget, latencies, errors)
                for _ in range(clients)
            )
        )
        return time.perf_counter() - start

    elapsed_s = asyncio.run(load())
    latencies.sort()
    return LoadResult(
        server=server,
        clients=clients,
        requests=len(latencies),
        errors=errors[0],
        duration_s=round(elapsed_s, 2),
        requests_per_s=round(len(latencies) / elapsed_s, 1),
        p50_ms=round(latencies[len(latencies) // 2] * 1000, 2),
        p99_ms=round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    )


def measure_status(
    servers: dict[str, tuple[Server, str]], targets: list[tuple[str, str]],
    args: argparse.Namespace, work_dir: Path,
) -> list[LoadResult]:
    """Measure each server at each client count, `args.repeat` times, alternating servers.

    Besides wrk's numbers, each result has the CPU time the server's processes used per
    request, which depends much less than throughput on what else the machine runs.
    """
    use_wrk = shutil.which("wrk") is not None
    script = work_dir / "bounded.lua"
    script.write_text(WRK_SCRIPT)
    targets_path = work_dir / "targets.txt"
    targets_path.write_text("".join(f"{key} {run_name}\n" for key, run_name in targets))

    def load(name: str, clients: int, duration_s: float, max_requests: int) -> LoadResult:
        server, url = servers[name]
        cpu_before_s = server.tree_cpu_s()
        if use_wrk:
            result = run_wrk(name, url, targets_path, clients, duration_s, max_requests, script)
        else:
            result = run_asyncio_load(name, url, targets, clients, duration_s, max_requests)
        cpu_s = server.tree_cpu_s() - cpu_before_s
        result.server_cpu_us_per_request = round(cpu_s / max(result.requests, 1) * 1e6, 1)
        return result

    for server in servers:
        load(server, max(args.concurrency), duration_s=1, max_requests=5000)

    results = []
    for repeat in range(args.repeat):
        for clients in args.concurrency:
            for server in servers:
                result = load(server, clients, args.duration_s, args.max_requests)
                results.append(result)
                print(
                    f"  repeat {repeat + 1}: {server:>10} {clients:>3} clients: "
                    f"{result.requests_per_s:>8.1f} req/s, p50 {result.p50_ms} ms, "
                    f"p99 {result.p99_ms} ms, server CPU {result.server_cpu_us_per_request} us"
                    f" per request, {result.errors} errors",
                    flush=True,
                )
    return results


def summarize_status(results: list[LoadResult]) -> list[dict]:
    """Return the median, min and max of each server and client count over the repeats."""
    summary = []
    keys = sorted({(result.server, result.clients) for result in results})
    for server, clients in keys:
        group = [r for r in results if r.server == server and r.clients == clients]
        row: dict = {"server": server, "clients": clients, "repeats": len(group)}
        for metric in ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request"):
            values = [getattr(r, metric) for r in group]
            row[metric] = {
                "median": round(statistics.median(values), 2),
                "min": min(values),
                "max": max(values),
            }
        row["errors"] = sum(r.errors for r in group)
        summary.append(row)
    return summary


def parse_lines_with_orjson(path: Path) -> float:
    """Return the seconds it takes to read `path` and orjson-parse each non-empty line."""
    loads = orjson.loads
    start = time.perf_counter()
    with open(path, "rb") as handle:
        pending = b""
        while chunk := handle.read(READ_CHUNK_BYTES):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line:
                    loads(line)
        if pending:
            loads(pending)
    return time.perf_counter() - start


def validate_in_process(path: Path) -> tuple[float, int]:
    """Return the seconds `PreferenceFileValidator` takes on `path`, and its pair count."""
    start = time.perf_counter()
    validator = PreferenceFileValidator(max_line_bytes=4 * 1024**2)
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK_BYTES):
            validator.feed(chunk)
    report = validator.finish()
    if not report.ok:
        raise RuntimeError(f"the generated file {path} is invalid: {report.describe()}")
    return time.perf_counter() - start, report.pair_count


def post_file(port: int, api_key: str, path: Path, timeout_s: float) -> tuple[int, bytes]:
    """POST `path` to upload_file as multipart/form-data, sending the file with sendfile."""
    boundary = f"bench{secrets.token_hex(12)}"
    part_head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="jsonl_file"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    part_tail = f"\r\n--{boundary}--\r\n".encode()
    content_length = len(part_head) + path.stat().st_size + len(part_tail)
    request_head = (
        f"POST /api/v2/upload_file HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"X-API-Key: {api_key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(request_head + part_head)
            with open(path, "rb") as handle:
                sock.sendfile(handle)
            sock.sendall(part_tail)
        except (BrokenPipeError, ConnectionResetError):
            pass  # The server responded before reading the whole body, so read its response.
        response = b""
        while data := sock.recv(65536):
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head[9:12]), body


class RssSampler:
    """Sample a server's process-tree RSS every `interval_s` in a thread, keeping the peaks."""

    def __init__(self, server: Server, interval_s: float = 0.02) -> None:
        self.server = server
        self.interval_s = interval_s
        self.peak_total = 0
        self.peak_largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            total, largest = self.server.tree_rss_bytes()
            self.peak_total = max(self.peak_total, total)
            self.peak_largest = max(self.peak_largest, largest)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def measure_upload(server: Server, api_key: str, path: Path) -> UploadResult:
    size = path.stat().st_size
    rss_before, _ = server.tree_rss_bytes()
    with RssSampler(server) as sampler:
        start = time.perf_counter()
        status, body = post_file(server.port, api_key, path, timeout_s=600)
        upload_s = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"upload of {path.name} failed with {status}: {body[:500]!r}")
    pair_count = orjson.loads(body)["lineCount"]

    orjson_s = parse_lines_with_orjson(path)
    validator_s, validated_pairs = validate_in_process(path)
    if validated_pairs != pair_count:
        raise RuntimeError(f"server counted {pair_count} pairs, the validator {validated_pairs}")
    return UploadResult(
        size_bytes=size,
        pair_count=pair_count,
        upload_s=round(upload_s, 3),
        upload_mb_s=round(size / MB / upload_s, 1),
        validator_mb_s=round(size / MB / validator_s, 1),
        orjson_parse_mb_s=round(size / MB / orjson_s, 1),
        upload_share_of_orjson=round(orjson_s / upload_s, 2),
        validator_share_of_orjson=round(orjson_s / validator_s, 2),
        server_rss_before_mb=round(rss_before / MB, 1),
        server_rss_peak_mb=round(sampler.peak_total / MB, 1),
        largest_process_rss_peak_mb=round(sampler.peak_largest / MB, 1),
    )


def check_targets(status: list[dict], uploads: list[UploadResult]) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    by_key = {(row["server"], row["clients"]): row for row in status}
    for (server, clients), row in by_key.items():
        if server != "get_status" or ("bare", clients) not in by_key:
            continue
        bare = by_key[("bare", clients)]
        share = row["requests_per_s"]["median"] / bare["requests_per_s"]["median"]
        # The targets apply under load. With fewer clients each request waits for its own
        # database round trip, which the bare endpoint does not make.
        if clients >= TARGET_CLIENTS:
            checks[f"get_status at {clients} clients: at least half the bare req/s"] = (
                share >= MIN_STATUS_SHARE_OF_BARE
            )
            checks[f"get_status at {clients} clients: p99 under {MAX_STATUS_P99_MS:.0f} ms"] = (
                row["p99_ms"]["median"] < MAX_STATUS_P99_MS
            )
        checks[f"get_status at {clients} clients: no errors"] = row["errors"] == 0
    for upload in uploads:
        size = f"{upload.size_bytes / MB:.0f} MB"
        checks[f"upload {size}: validation at least half the orjson parse speed"] = (
            upload.validator_share_of_orjson >= MIN_UPLOAD_SHARE_OF_ORJSON
        )
        checks[f"upload {size}: server RSS under {MAX_UPLOAD_RSS_MB:.0f} MB"] = (
            upload.server_rss_peak_mb < MAX_UPLOAD_RSS_MB
        )
    return checks


def markdown(status: list[dict], uploads: list[UploadResult], checks: dict[str, bool]) -> str:
    lines = []
    if status:
        bare = {row["clients"]: row for row in status if row["server"] == "bare"}
        lines += [
            "| endpoint | clients | req/s median (min-max) | p50 ms median | p99 ms median"
            " (min-max) | share of bare req/s | server CPU us/request | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in status:
            rps, p50, p99 = row["requests_per_s"], row["p50_ms"], row["p99_ms"]
            share = ""
            if row["server"] != "bare" and row["clients"] in bare:
                share = f"{rps['median'] / bare[row['clients']]['requests_per_s']['median']:.2f}"
            lines.append(
                f"| {row['server']} | {row['clients']} | {rps['median']:.0f}"
                f" ({rps['min']:.0f}-{rps['max']:.0f}) | {p50['median']:.1f}"
                f" | {p99['median']:.1f} ({p99['min']:.1f}-{p99['max']:.1f}) | {share}"
                f" | {row['server_cpu_us_per_request']['median']:.0f} | {row['errors']} |"
            )
        lines.append("")
    if uploads:
        lines += [
            "| file MB | pairs | upload MB/s | validator MB/s (in process) | orjson parse MB/s"
            " | upload / orjson | validator / orjson | server RSS MB before | peak | largest"
            " process peak |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for upload in uploads:
            lines.append(
                f"| {upload.size_bytes / MB:.0f} | {upload.pair_count} | {upload.upload_mb_s}"
                f" | {upload.validator_mb_s} | {upload.orjson_parse_mb_s}"
                f" | {upload.upload_share_of_orjson} | {upload.validator_share_of_orjson}"
                f" | {upload.server_rss_before_mb} | {upload.server_rss_peak_mb}"
                f" | {upload.largest_process_rss_peak_mb} |"
            )
        lines.append("")
    for name, passed in checks.items():
        lines.append(f"- {'PASS' if passed else 'FAIL'}: {name}")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict:
    """Describe the machine and the server settings that the numbers depend on."""
    return {
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvicorn_workers": args.workers,
        "uvicorn_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "uvicorn_http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "log_level": args.log_level,
        "load_generator": "wrk -t1" if shutil.which("wrk") else "asyncio client in process",
        "duration_s": args.duration_s,
        "max_requests": args.max_requests,
        "repeat": args.repeat,
        "rate_limits": "off",
        "accounts": args.accounts,
        "runs_per_account": args.runs_per_account,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark get_status and upload_file.")
    parser.add_argument("--quick", action="store_true", help="small files and short runs")
    parser.add_argument(
        "--sizes", type=lambda text: [parse_size(part) for part in text.split(",")],
        help="upload file sizes, e.g. 10MB,100MB,1GB (the default; --quick: 1MB,10MB)",
    )
    parser.add_argument(
        "--duration-s", type=float, help="seconds per load measurement (default 10; --quick: 3)"
    )
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000,
        help="requests after which a load measurement stops early",
    )
    parser.add_argument(
        "--repeat", type=int, help="repeats of each load measurement (default 3; --quick: 1)"
    )
    parser.add_argument(
        "--concurrency", type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16, 64], help="client counts for get_status, e.g. 1,16,64",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(),
        help="uvicorn worker processes of both servers (default: the CPU count)",
    )
    parser.add_argument("--log-level", default="warning", help="log level of both servers")
    parser.add_argument(
        "--accounts", type=int, default=8, help="accounts whose runs get_status polls"
    )
    parser.add_argument(
        "--runs-per-account", type=int, default=8, help="runs of each of those accounts"
    )
    parser.add_argument(
        "--only", choices=["status", "upload"], help="run only one of the two measurements"
    )
    parser.add_argument(
        "--postgres-url", default=DEFAULT_POSTGRES_URL,
        help="SQLAlchemy URL of a PostgreSQL database whose user may create databases",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--markdown", type=Path, help="write the Markdown tables to this file")
    args = parser.parse_args()
    args.sizes = args.sizes or ([1 * MB, 10 * MB] if args.quick else [10 * MB, 100 * MB, 10**9])
    args.duration_s = args.duration_s or (3.0 if args.quick else 10.0)
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


def main() -> int:
    args = parse_args()
    results: dict = {"environment": environment(args)}
    status: list[dict] = []
    uploads: list[UploadResult] = []
    with tempfile.TemporaryDirectory(prefix="rundpo-bench-") as temp, scratch_database(
        args.postgres_url
    ) as database_url:
        work_dir = Path(temp)
        data_dir = work_dir / "data"
        data_dir.mkdir()
        env = {
            "RUNDPO_DATA_DIR": str(data_dir),
            "RUNDPO_DATABASE_URL": database_url,
            "RUNDPO_BROKER_URL": f"sqla+sqlite:///{data_dir / 'broker.db'}",
            "RUNDPO_SIGNING_SECRET": "bench-signing-secret",
            "RUNDPO_RATE_LIMIT_PER_MINUTE": "0",
            "RUNDPO_UPLOAD_RATE_LIMIT_PER_MINUTE": "0",
        }
        run_cli(["migrate"], env)
        api_keys = [
            json.loads(
                run_cli(
                    ["accounts", "create", "--name", f"bench-{index}", "--credits", "1000000",
                     "--json"],
                    env,
                )
            )["api_key"]
            for index in range(args.accounts)
        ]
        api_key = api_keys[0]

        server_args = ["--workers", str(args.workers), "--host", HOST]
        api = Server(
            "rundpo-server api",
            ["-m", "app.cli", "--log-level", args.log_level, "api", *server_args],
            env,
            work_dir / "api.log",
        )
        bare = None
        try:
            api_url = f"{api.base_url}/api/v2"
            targets = prepare_runs(
                api_url, api_keys, args.runs_per_account, work_dir, database_url
            )
            status_url = f"{api_url}/get_status"
            body = httpx.get(
                status_url, params={"run_name": targets[0][1]}, headers={"X-API-Key": api_key},
                timeout=10,
            )
            body.raise_for_status()
            results["status_body"] = body.json()

            if args.only != "upload":
                body_path = work_dir / "status.json"
                body_path.write_bytes(body.content)
                bare = Server(
                    "bare FastAPI app",
                    ["-m", "bench.bare_app", "--log-level", args.log_level, *server_args],
                    {"BENCH_STATUS_BODY": str(body_path)},
                    work_dir / "bare.log",
                )
                print(
                    f"get_status on {len(targets)} runs of {len(api_keys)} accounts,"
                    f" {args.workers} uvicorn workers",
                    flush=True,
                )
                servers = {
                    "get_status": (api, status_url),
                    "bare": (bare, f"{bare.base_url}/api/v2/get_status"),
                }
                raw = measure_status(servers, targets, args, work_dir)
                results["get_status_runs"] = [asdict(result) for result in raw]
                status = summarize_status(raw)
                bare.stop()

            if args.only != "status":
                for size in args.sizes:
                    path = work_dir / f"pairs-{size // MB}MB.jsonl"
                    write_preference_file(path, size)
                    upload = measure_upload(api, api_key, path)
                    path.unlink()
                    uploads.append(upload)
                    print(f"  upload {asdict(upload)}", flush=True)
        finally:
            api.stop()
            if bare is not None:
                bare.stop()

    checks = check_targets(status, uploads)
    results.update(
        {"get_status": status, "upload": [asdict(upload) for upload in uploads], "checks": checks}
    )
    table = markdown(status, uploads, checks)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
