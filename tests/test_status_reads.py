"""get_status reads on PostgreSQL: concurrent requests share queries and never see old data."""

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import text, update

from app.accounts import authenticate, create_account, revoke_key
from app.db import session_scope
from app.errors import ApiError
from app.models import Run
from app.settings import get_settings
from app.status_reads import CoalescingReader, close_reader, coalescing_reader, read_status
from app.statuses import RunStatus


def add_run(account_id: int, name: str) -> None:
    with session_scope() as session:
        session.add(
            Run(
                name=name,
                account_id=account_id,
                base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                gpus=1,
                params={},
            )
        )


def new_account(name: str, run_names: list[str]) -> str:
    """Create an account with runs of the given names and return its API key."""
    with session_scope() as session:
        _, key = create_account(session, name, 10)
        session.flush()
        account_id = authenticate(session, key).account_id
    for run_name in run_names:
        add_run(account_id, run_name)
    return key


def run_and_close(scenario):
    """Run `scenario()` in a new event loop, then close that loop's status reader."""

    async def run() -> Any:
        try:
            return await scenario()
        finally:
            await close_reader()

    return asyncio.run(run())


async def status_code_of(api_key: str, run_name: Any) -> int | str:
    """Return the run's status, or the HTTP status code of the error read_status raised."""
    try:
        row = await read_status(get_settings(), api_key, run_name)
    except ApiError as error:
        return error.status_code
    return row.status


def test_concurrent_reads_share_one_query(postgres_service):
    alice = new_account("alice", ["alice_run_1", "alice_run_2"])
    bob = new_account("bob", ["bob_run_1"])
    with session_scope() as session:
        session.execute(
            update(Run).where(Run.name == "alice_run_2").values(status=RunStatus.TRAINING_DPO.value)
        )

    requests = [
        (alice, "alice_run_1", RunStatus.PENDING.value),
        (alice, "alice_run_2", RunStatus.TRAINING_DPO.value),
        (bob, "bob_run_1", RunStatus.PENDING.value),
        (bob, "alice_run_1", 404),  # someone else's run
        (alice, "no_such_run", 404),
        (alice, None, 400),
        (alice, 5, 400),  # a number in a JSON body
        (alice, "alice\x00run", 404),  # PostgreSQL rejects NUL in text
        ("rd-" + "x" * 40, "alice_run_1", 401),
        ("rd-" + "x" * 40, None, 401),
    ] * 6

    async def scenario() -> tuple[list, int]:
        answers = await asyncio.gather(
            *(status_code_of(key, run_name) for key, run_name, _ in requests)
        )
        return answers, coalescing_reader().queries

    answers, queries = run_and_close(scenario)

    assert answers == [expected for _, _, expected in requests]
    # 60 requests over 9 distinct pairs arrived on one turn of the loop: one query.
    assert queries == 1


def test_read_during_query_waits_for_next(postgres_service, monkeypatch):
    """A key revoked while a query is in flight is rejected for the requests after it."""
    key = new_account("carol", ["carol_run"])
    real_fetch = CoalescingReader._fetch
    calls: list[list[str]] = []

    async def scenario() -> tuple[int | str, int | str]:
        executed, release = asyncio.Event(), asyncio.Event()

        async def fetch_then_hold(reader, key_hashes, run_names):
            calls.append(key_hashes)
            rows = await real_fetch(reader, key_hashes, run_names)
            if len(calls) == 1:
                executed.set()
                await release.wait()
            return rows

        monkeypatch.setattr(CoalescingReader, "_fetch", fetch_then_hold)
        first = asyncio.create_task(status_code_of(key, "carol_run"))
        await executed.wait()

        with session_scope() as session:
            revoke_key(session, key[:11])
        second = asyncio.create_task(status_code_of(key, "carol_run"))
        await asyncio.sleep(0.05)
        assert not second.done()

        release.set()
        return await first, await second

    first, second = run_and_close(scenario)

    assert first == RunStatus.PENDING.value
    assert second == 401
    assert len(calls) == 2


def test_failed_query_fails_its_requests_only(postgres_service, monkeypatch):
    key = new_account("dave", ["dave_run"])
    real_fetch = CoalescingReader._fetch

    async def scenario() -> tuple[list, int | str]:
        failing, release = asyncio.Event(), asyncio.Event()

        async def fail_first(reader, key_hashes, run_names):
            if not failing.is_set():
                failing.set()
                await release.wait()
                raise RuntimeError("connection refused")
            return await real_fetch(reader, key_hashes, run_names)

        monkeypatch.setattr(CoalescingReader, "_fetch", fail_first)
        failed = [asyncio.create_task(status_code_of(key, "dave_run")) for _ in range(3)]
        await failing.wait()
        later = asyncio.create_task(status_code_of(key, "dave_run"))
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*failed), await later

    failed, later = run_and_close(scenario)

    assert failed == [503] * 3
    assert later == RunStatus.PENDING.value


def test_hung_query_times_out(postgres_service, monkeypatch):
    key = new_account("heidi", ["heidi_run"])
    real_fetch = CoalescingReader._fetch
    calls: list[list[str]] = []

    async def hang_first(reader, key_hashes, run_names):
        calls.append(key_hashes)
        if len(calls) == 1:
            await asyncio.sleep(60)
        return await real_fetch(reader, key_hashes, run_names)

    monkeypatch.setattr(CoalescingReader, "_fetch", hang_first)

    async def scenario() -> tuple[int | str, float, int | str]:
        coalescing_reader().timeout_s = 0.2
        started = time.monotonic()
        hung = await status_code_of(key, "heidi_run")
        waited_s = time.monotonic() - started
        return hung, waited_s, await status_code_of(key, "heidi_run")

    hung, waited_s, later = run_and_close(scenario)

    assert hung == 503
    assert waited_s < 5
    assert later == RunStatus.PENDING.value


def test_cancelled_read_leaves_others(postgres_service, monkeypatch):
    """One request cancelled while its query is in flight; the others sharing it get rows."""
    key = new_account("erin", ["erin_run"])
    real_fetch = CoalescingReader._fetch

    async def scenario() -> tuple[bool, list]:
        executed, release = asyncio.Event(), asyncio.Event()

        async def fetch_then_hold(reader, key_hashes, run_names):
            rows = await real_fetch(reader, key_hashes, run_names)
            executed.set()
            await release.wait()
            return rows

        monkeypatch.setattr(CoalescingReader, "_fetch", fetch_then_hold)
        leaving = asyncio.create_task(status_code_of(key, "erin_run"))
        staying = [asyncio.create_task(status_code_of(key, "erin_run")) for _ in range(3)]
        await executed.wait()
        leaving.cancel()
        release.set()
        answers = await asyncio.gather(*staying)
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return leaving.cancelled(), answers

    cancelled, answers = run_and_close(scenario)

    assert cancelled
    assert answers == [RunStatus.PENDING.value] * 3


def test_large_batches_are_split(postgres_service):
    key = new_account("frank", [f"frank_run_{index}" for index in range(7)])
    reader = CoalescingReader(postgres_service.database_url, max_pairs=3)

    async def scenario() -> list:
        from app.security import hash_api_key

        rows = await asyncio.gather(
            *(reader.read(hash_api_key(key), f"frank_run_{index}") for index in range(7))
        )
        await reader.close()
        return [row.name for row in rows]

    names = asyncio.run(scenario())

    assert names == [f"frank_run_{index}" for index in range(7)]
    assert reader.queries == 3


def test_lost_connection_is_replaced(postgres_service):
    key = new_account("grace", ["grace_run"])

    async def scenario() -> tuple[int | str, int | str, int, int]:
        first = await status_code_of(key, "grace_run")
        reader = coalescing_reader()
        lost_pid = reader._connection.info.backend_pid
        with session_scope() as session:
            session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": lost_pid})
        second = await status_code_of(key, "grace_run")
        return first, second, lost_pid, reader._connection.info.backend_pid

    first, second, lost_pid, new_pid = run_and_close(scenario)

    assert first == RunStatus.PENDING.value
    assert second == RunStatus.PENDING.value
    assert new_pid != lost_pid
