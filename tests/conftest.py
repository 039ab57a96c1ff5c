"""Shared fixtures: a configured service on SQLite or PostgreSQL, and a live API on loopback."""

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "examples" / "data"
CASES_DIR = Path(__file__).resolve().parent / "cases"

PG_ADMIN_URL = os.environ.get(
    "RUNDPO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("RUNDPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clear_caches() -> None:
    """Forget settings, engines and clients built from an earlier environment."""
    from app import db, deps, queue, settings

    settings.get_settings.cache_clear()
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    db.get_engine.cache_clear()
    db.get_async_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    deps.get_storage.cache_clear()
    deps.get_rate_limiter.cache_clear()
    queue.sender.cache_clear()


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin: sa.Engine) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"rundpo_test_{secrets.token_hex(6)}"
    with postgres_admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    clear_caches()
    with postgres_admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class Service:
    """A configured, migrated service: its environment and helpers to set up accounts."""

    data_dir: Path
    env: dict[str, str]
    database_url: str
    keys: list[str] = field(default_factory=list)

    def create_account(self, credits: float = 100.0, name: str | None = None) -> str:
        from app.accounts import create_account
        from app.db import session_scope

        with session_scope() as session:
            _, key = create_account(session, name or f"user-{secrets.token_hex(4)}", credits)
        return key


def _configure(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    clear_caches()


def make_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str, **extra_env: str
) -> Service:
    from app.migrate import upgrade

    data_dir = tmp_path / "data"
    env = {
        "RUNDPO_DATA_DIR": str(data_dir),
        "RUNDPO_DATABASE_URL": database_url,
        "RUNDPO_BROKER_URL": f"sqla+sqlite:///{data_dir / 'broker.db'}",
        "RUNDPO_SIGNING_SECRET": "test-signing-secret",
        "RUNDPO_RATE_LIMIT_PER_MINUTE": "0",
        "RUNDPO_UPLOAD_RATE_LIMIT_PER_MINUTE": "0",
        **extra_env,
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    _configure(monkeypatch, env)
    upgrade(env["RUNDPO_DATABASE_URL"])
    return Service(data_dir=data_dir, env=env, database_url=database_url)


@pytest.fixture
def sqlite_service(monkeypatch, tmp_path) -> Iterator[Service]:
    yield make_service(monkeypatch, tmp_path, f"sqlite:///{tmp_path / 'data' / 'rundpo.db'}")
    clear_caches()


@pytest.fixture
def postgres_service(monkeypatch, tmp_path, postgres_url) -> Iterator[Service]:
    yield make_service(monkeypatch, tmp_path, postgres_url)
    clear_caches()


@pytest.fixture(params=["sqlite", "postgres"])
def service(request, monkeypatch, tmp_path) -> Iterator[Service]:
    """The service on each database in turn."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'data' / 'rundpo.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    yield make_service(monkeypatch, tmp_path, url)
    clear_caches()


@dataclass
class LiveServer:
    base_url: str
    api_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_process(
    args: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO
) -> subprocess.Popen:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            env=full_env,
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen, timeout_s: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_api(service: Service, **extra_env: str) -> LiveServer:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**service.env, "RUNDPO_PUBLIC_URL": base_url, **extra_env}
    log_path = service.data_dir / f"api-{port}.log"
    process = start_process(["api", "--host", "127.0.0.1", "--port", str(port)], env, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited early:\n{log_path.read_text()}")
        try:
            httpx.get(f"{base_url}/healthz", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        stop_process(process)
        raise RuntimeError(f"the API did not answer within 30 s:\n{log_path.read_text()}")
    return LiveServer(base_url, f"{base_url}/api/v2", process, log_path)


@pytest.fixture
def live_api(service: Service) -> Iterator[LiveServer]:
    server = start_api(service)
    yield server
    stop_process(server.process)


@pytest.fixture
def sqlite_live_api(sqlite_service: Service) -> Iterator[LiveServer]:
    server = start_api(sqlite_service)
    yield server
    stop_process(server.process)
