"""Reachability checks of the database and the broker for `/healthz`."""

from kombu import Connection
from sqlalchemy import text

from app.db import get_engine
from app.settings import Settings


def check_database() -> str | None:
    """Return None when a query on the database succeeds, else the error."""
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_broker(settings: Settings) -> str | None:
    """Return None when the Celery broker accepts a connection, else the error."""
    try:
        with Connection(settings.broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
