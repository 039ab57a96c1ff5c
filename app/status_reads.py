"""get_status reads: the API key check and the run's status in one query, shared by requests.

Polling clients call get_status far more often than any other route. Each call checks its API
key and reads its run after the request arrived, so a revoked key gets 401 at once and a
status is never older than the request that asked for it.

On PostgreSQL the reads of one API process are coalesced. When no read is in flight, a
request's query starts on the next turn of the event loop. While one is in flight, the
requests that arrive wait for it to finish and then go together in one query. So each request
reads from a query that started after it arrived, and under load one round trip serves many
requests. The reader of each event loop keeps one connection of its own, so a query costs no
pool checkout. On SQLite each request runs its own query in a worker thread.
"""

import asyncio
import logging
import weakref
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Text, bindparam, func, make_url, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY

from app.accounts import last_used_is_stale, touch_key
from app.db import fetch_first, get_async_engine, run_on_connection
from app.deps import enforce_request_limit
from app.errors import ApiError, invalid_key
from app.models import ApiKey, Run
from app.runs import STATUS_COLUMNS, missing_run_name, run_not_found
from app.security import hash_api_key, hashes_match
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)

# The most (key, run) pairs in one coalesced query; more wait for the next one.
MAX_PAIRS_PER_QUERY = 500
# Every get_status request of a process waits on the query in flight, so one that hangs (a
# stuck connection) fails its requests after this long instead of stalling them all.
QUERY_TIMEOUT_S = 10.0

KEY_COLUMNS = (
    ApiKey.id.label("key_id"),
    ApiKey.key_hash.label("key_hash"),
    ApiKey.revoked_at.label("key_revoked_at"),
    ApiKey.last_used_at.label("key_last_used_at"),
)

# One request: the key and the caller's run. A key with no such run still returns a row, with
# the run's columns NULL.
STATUS_QUERY = (
    select(*KEY_COLUMNS, *STATUS_COLUMNS)
    .select_from(ApiKey)
    .outerjoin(Run, (Run.account_id == ApiKey.account_id) & (Run.name == bindparam("run_name")))
    .where(ApiKey.key_hash == bindparam("key_hash"))
)

# Many requests: the same columns for each (key hash, run name) pair of two arrays, each row
# with the pair it belongs to.
_requested = (
    func.unnest(
        bindparam("key_hashes", type_=ARRAY(Text)), bindparam("run_names", type_=ARRAY(Text))
    )
    .table_valued("key_hash", "run_name")
    .render_derived(name="requested")
)
COALESCED_STATUS_QUERY = (
    select(
        _requested.c.key_hash.label("requested_key_hash"),
        _requested.c.run_name.label("requested_run_name"),
        *KEY_COLUMNS,
        *STATUS_COLUMNS,
    )
    .select_from(_requested)
    .join(ApiKey, ApiKey.key_hash == _requested.c.key_hash)
    .outerjoin(Run, (Run.account_id == ApiKey.account_id) & (Run.name == _requested.c.run_name))
)

COALESCED_STATUS_SQL = str(COALESCED_STATUS_QUERY.compile(dialect=postgresql.psycopg.dialect()))

Pair = tuple[str, str]


class StatusReadFailed(Exception):
    """A coalesced status query failed; each request that shared it gets its own instance."""


class CoalescingReader:
    """Collects the status reads of one event loop and runs them in shared queries."""

    def __init__(
        self,
        database_url: str,
        max_pairs: int = MAX_PAIRS_PER_QUERY,
        timeout_s: float = QUERY_TIMEOUT_S,
    ) -> None:
        # libpq takes the SQLAlchemy URL without its "+psycopg" driver name.
        self.conninfo = make_url(database_url).set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self.max_pairs = max_pairs
        self.timeout_s = timeout_s
        self.queries = 0
        self._connection: psycopg.AsyncConnection | None = None
        self._closed = False
        self._waiting: dict[Pair, list[asyncio.Future]] = {}
        self._runner: asyncio.Task | None = None

    async def read(self, key_hash: str, run_name: str) -> Any | None:
        """Return the row for this key and run name, or None for an unknown key."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.setdefault((key_hash, run_name), []).append(future)
        if self._runner is None:
            self._runner = loop.create_task(self._run_queries())
        return await future

    async def _run_queries(self) -> None:
        try:
            while self._waiting:
                batch = self._take_batch()
                self.queries += 1
                try:
                    await self._serve(batch)
                finally:
                    # Cancels what is still pending when `_serve` stopped early.
                    _cancel(batch)
        finally:
            self._runner = None
            # Requests that arrived after a cancellation are cancelled too.
            while self._waiting:
                _cancel(self._take_batch())

    async def _serve(self, batch: dict[Pair, list[asyncio.Future]]) -> None:
        """Run one query for `batch` and give each request its row or the query's error."""
        try:
            async with asyncio.timeout(self.timeout_s):
                rows = await self._fetch(
                    [key_hash for key_hash, _ in batch], [run_name for _, run_name in batch]
                )
        except Exception as error:
            if isinstance(error, TimeoutError):
                # The connection may be stuck mid-query; the next query opens a new one.
                await self.close_connection()
            requests = sum(len(futures) for futures in batch.values())
            logger.warning("get_status query for %d requests failed: %r", requests, error)
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(StatusReadFailed(f"status query failed: {error!r}"))
            return

        by_pair = {(row.requested_key_hash, row.requested_run_name): row for row in rows}
        for pair, futures in batch.items():
            row = by_pair.get(pair)
            for future in futures:
                if not future.done():
                    future.set_result(row)

    async def _fetch(self, key_hashes: list[str], run_names: list[str]) -> list[Any]:
        """Run the coalesced query, once more on a new connection if the connection broke."""
        parameters = {"key_hashes": key_hashes, "run_names": run_names}
        for attempt in range(2):
            connection = await self._open_connection()
            try:
                async with connection.cursor(row_factory=namedtuple_row) as cursor:
                    await cursor.execute(COALESCED_STATUS_SQL, parameters)
                    return await cursor.fetchall()
            except psycopg.OperationalError as error:
                if not connection.broken:
                    raise
                await self.close_connection()
                if attempt:
                    raise
                logger.warning("status read connection lost (%s); retrying on a new one", error)
        raise AssertionError("unreachable")

    async def _open_connection(self) -> psycopg.AsyncConnection:
        if self._closed:
            raise StatusReadFailed("the status reader is closed: the server is shutting down")
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, connect_timeout=max(2, int(self.timeout_s))
            )
        return self._connection

    async def close_connection(self) -> None:
        """Close the reader's connection; the next query opens a new one."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def close(self) -> None:
        """Close the connection for good: queries after this fail instead of reconnecting."""
        self._closed = True
        await self.close_connection()

    def _take_batch(self) -> dict[Pair, list[asyncio.Future]]:
        if len(self._waiting) <= self.max_pairs:
            batch, self._waiting = self._waiting, {}
            return batch
        pairs = list(self._waiting)[: self.max_pairs]
        return {pair: self._waiting.pop(pair) for pair in pairs}


def _cancel(batch: dict[Pair, list[asyncio.Future]]) -> None:
    for futures in batch.values():
        for future in futures:
            if not future.done():
                future.cancel()


# One reader per event loop: a future belongs to the loop that created it.
_readers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CoalescingReader]" = (
    weakref.WeakKeyDictionary()
)


def coalescing_reader() -> CoalescingReader:
    loop = asyncio.get_running_loop()
    reader = _readers.get(loop)
    if reader is None:
        reader = _readers[loop] = CoalescingReader(get_settings().database_url)
    return reader


async def close_reader() -> None:
    """Close and forget the reader of this event loop, if it has one."""
    reader = _readers.pop(asyncio.get_running_loop(), None)
    if reader is not None:
        await reader.close()


# Keys whose `last_used_at` update is in flight, so that the requests of one query that share
# a key send one update, not one each.
_keys_being_touched: set[int] = set()


async def read_status(settings: Settings, api_key: str, run_name: Any) -> Any:
    """Authenticate `api_key`, count the request against its limit, return the caller's run.

    The run is returned as a row with the `STATUS_COLUMNS` as attributes. Errors come in the
    order of the other routes. First 401 for an invalid or revoked key and 429 over the rate
    limit. Then 400 for a missing or non-string run name, and 404 for a run that does not
    exist or belongs to another account. A database that does not answer gives 503.
    """
    key_hash = hash_api_key(api_key)
    # A value that cannot be a run name is looked up as "", which matches no run, so that it
    # neither reaches the shared query nor skips the key check.
    valid_name = isinstance(run_name, str) and "\x00" not in run_name
    queried_name = run_name if valid_name else ""
    if get_async_engine() is None:
        row = await fetch_first(STATUS_QUERY, {"key_hash": key_hash, "run_name": queried_name})
    else:
        try:
            row = await coalescing_reader().read(key_hash, queried_name)
        except StatusReadFailed as error:
            raise ApiError(
                503,
                "Service unavailable: the database did not answer the status query. Retry in a "
                "few seconds.",
                headers={"Retry-After": "5"},
            ) from error

    if row is None or row.key_revoked_at is not None or not hashes_match(row.key_hash, api_key):
        raise invalid_key()
    if last_used_is_stale(row.key_last_used_at) and row.key_id not in _keys_being_touched:
        _keys_being_touched.add(row.key_id)
        try:
            await run_on_connection(touch_key, row.key_id)
        finally:
            _keys_being_touched.discard(row.key_id)
    await enforce_request_limit(settings, row.key_id)

    if run_name is None or run_name == "":
        raise missing_run_name()
    if not isinstance(run_name, str):
        raise ApiError(
            400,
            f"Invalid request: run_name must be a string, not {run_name!r}. Pass the name "
            "run_dpo returned.",
        )
    if row.name is None:
        raise run_not_found(run_name)
    return row
