"""Database engine and sessions for the API and the worker."""

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, Select, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.settings import get_settings

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# psycopg 3 serves asyncio as well, so a PostgreSQL URL of this scheme gets an asyncio engine.
ASYNC_URL_PREFIX = "postgresql+psycopg://"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().database_url)


@lru_cache
def get_async_engine() -> AsyncEngine | None:
    """Return an asyncio engine on the configured database, or None for SQLite.

    SQLite has no asyncio driver among the dependencies, so `run_on_connection` falls back
    to a worker thread there. The engine serves short reads and saves round trips for them.
    Its connections autocommit, so psycopg sends no BEGIN and ROLLBACK around a query. The
    pool does not ping a connection before each use, because the callers retry on a fresh
    connection instead.
    """
    url = get_settings().database_url
    if not url.startswith(ASYNC_URL_PREFIX):
        return None
    return create_async_engine(
        url, isolation_level="AUTOCOMMIT", pool_size=20, max_overflow=20
    )


async def run_on_connection(
    function: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Call `function(connection, ...)` with a Core connection and return its result.

    On PostgreSQL the call runs on the event loop through the asyncio engine, so it needs no
    worker thread, and elsewhere it runs in one. The connection autocommits, so each statement
    of `function` commits on its own. When the connection turns out to be dead (the database restarted), SQLAlchemy discards
    the pool's connections and the call runs once more, so `function` must be safe to repeat.
    """
    engine = get_async_engine()
    if engine is None:
        return await run_in_threadpool(_run_with_sync_connection, function, *args, **kwargs)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(function, *args, **kwargs)
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
        logger.warning("database connection lost (%s); retrying on a new connection", error.orig)
    async with engine.connect() as connection:
        return await connection.run_sync(function, *args, **kwargs)


async def fetch_first(query: Select, parameters: Mapping[str, Any]) -> Any | None:
    """Run a SELECT and return its first row, with its columns as attributes, or None.

    On PostgreSQL the query is compiled once and its SQL sent through psycopg directly:
    SQLAlchemy's statement execution costs more CPU than the query itself, for the same
    Python values, because psycopg already converts these column types. Elsewhere the query
    runs through SQLAlchemy in a worker thread. A query that meets a dead connection runs
    once more, as in `run_on_connection`.
    """
    engine = get_async_engine()
    if engine is None:
        return await run_in_threadpool(_run_with_sync_connection, _first_row, query, parameters)
    sql = _compiled_sql(query, engine)
    for attempt in range(2):
        async with engine.connect() as connection:
            driver_connection = (await connection.get_raw_connection()).driver_connection
            try:
                async with driver_connection.cursor(row_factory=namedtuple_row) as cursor:
                    await cursor.execute(sql, parameters)
                    return await cursor.fetchone()
            except psycopg.OperationalError as error:
                if attempt or not driver_connection.broken:
                    raise
                await connection.invalidate()
                logger.warning("database connection lost (%s); retrying on a new one", error)
    raise AssertionError("unreachable")


def _first_row(connection: Connection, query: Select, parameters: Mapping[str, Any]) -> Any:
    return connection.execute(query, dict(parameters)).first()


_sql_by_query: dict[Select, str] = {}


def _compiled_sql(query: Select, engine: AsyncEngine) -> str:
    sql = _sql_by_query.get(query)
    if sql is None:
        sql = str(query.compile(dialect=engine.dialect))
        _sql_by_query[query] = sql
    return sql


def _run_with_sync_connection(function: Callable[..., T], *args, **kwargs) -> T:
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        return function(connection, *args, **kwargs)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """Open a session that commits on success and rolls back on an exception."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
