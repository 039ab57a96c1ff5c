"""Runs, the ledger and the queue, without HTTP."""

import subprocess
import sys

import pytest
import redis
from sqlalchemy import func, select

from app import credits, queue, runs
from app.accounts import authenticate, create_account
from app.db import session_scope
from app.models import LedgerEntry, PreferenceFile, Run, Worker, utcnow
from app.params import parse_run_request
from app.settings import get_settings
from app.statuses import InvalidTransition, RunStatus, check_transition
from tests.conftest import REDIS_URL, clear_caches


def make_file(session, account_id: int, tokens: int = 10_000) -> str:
    upload = PreferenceFile(
        id="F" * 32,
        account_id=account_id,
        name="pairs.jsonl",
        pair_count=10,
        size_bytes=1000,
        token_estimate=tokens,
        sha256="0" * 64,
        storage_key="uploads/x.jsonl",
    )
    session.add(upload)
    return upload.id


def caller_for(session, key):
    return authenticate(session, key)


def test_statuses_move_forward_only():
    check_transition(RunStatus.PENDING, RunStatus.PROVISIONING_GPUS)
    check_transition(RunStatus.TRAINING_SFT, RunStatus.TRAINING_SFT)
    check_transition(RunStatus.TRAINING_DPO, RunStatus.FAILED)
    with pytest.raises(InvalidTransition):
        check_transition(RunStatus.TRAINING_DPO, RunStatus.TRAINING_SFT)
    with pytest.raises(InvalidTransition):
        check_transition(RunStatus.COMPLETE, RunStatus.FAILED)
    with pytest.raises(InvalidTransition):
        check_transition(RunStatus.FAILED, RunStatus.FAILED)


def test_cost_formula():
    # 1,000,000 tokens × (0.05 × 3 + 1) × 2 credits per million = 2.3 credits
    assert credits.estimate_cost_micro(1_000_000, 0.05, 3, 1, 2.0) == 2_300_000


def test_ledger_rows_for_hold_settle_refund(service):
    key = service.create_account(credits=10)
    with session_scope() as session:
        caller = caller_for(session, key)
        file_id = make_file(session, caller.account_id)
        session.flush()
        request = parse_run_request({"file_id": file_id, "base_model": "Qwen/Qwen2-0.5B"})
        settled_run = runs.create_run(session, get_settings(), caller, request)
        refunded_run = runs.create_run(session, get_settings(), caller, request)
        hold = settled_run.hold_micro
        assert hold == credits.estimate_cost_micro(10_000, 0.05, 3, 1, 2.0)
        assert credits.balance_micro(session, caller.account_id) == 10_000_000 - 2 * hold

        cost = credits.settle(session, settled_run, tokens_trained=5_000, price_per_million_tokens=2.0)
        credits.settle(session, settled_run, tokens_trained=5_000, price_per_million_tokens=2.0)
        assert cost == 10_000
        runs.fail_run(session, refunded_run, "test")
        credits.refund(session, refunded_run, "again")

        kinds = session.execute(
            select(LedgerEntry.kind, LedgerEntry.amount_micro, LedgerEntry.run_id).order_by(
                LedgerEntry.id
            )
        ).all()
        assert [kind for kind, _, _ in kinds] == ["grant", "hold", "hold", "settlement", "refund"]
        assert kinds[3] == ("settlement", hold - cost, settled_run.id)
        assert kinds[4] == ("refund", hold, refunded_run.id)
        assert credits.balance_micro(session, caller.account_id) == 10_000_000 - cost
        account_balance = session.scalar(
            select(func.sum(LedgerEntry.amount_micro)).where(
                LedgerEntry.account_id == caller.account_id
            )
        )
        assert account_balance == credits.balance_micro(session, caller.account_id)


def test_gpus_checked_against_live_workers(sqlite_service):
    key = sqlite_service.create_account(credits=10)
    with session_scope() as session:
        caller = caller_for(session, key)
        file_id = make_file(session, caller.account_id)
        session.add(Worker(id="host:1", hostname="host", gpus=2, heartbeat_at=utcnow()))
        session.flush()
        request = parse_run_request({"file_id": file_id, "gpus": 4})
        with pytest.raises(Exception) as error:
            runs.create_run(session, get_settings(), caller, request)
        assert error.value.status_code == 400
        assert "gpus=4" in error.value.message
        assert "2 GPUs" in error.value.message
        runs.create_run(session, get_settings(), caller, parse_run_request({"file_id": file_id, "gpus": 2}))


def test_unreachable_broker_keeps_run_then_enqueues(sqlite_service, monkeypatch):
    key = sqlite_service.create_account(credits=10)
    monkeypatch.setenv("RUNDPO_BROKER_URL", "redis://127.0.0.1:1/0")
    clear_caches()
    with session_scope() as session:
        caller = caller_for(session, key)
        file_id = make_file(session, caller.account_id)
        session.flush()
        run = runs.create_run(session, get_settings(), caller, parse_run_request({"file_id": file_id}))
        session.commit()
        assert queue.enqueue(session, run) is False
        assert session.scalar(select(Run.enqueued_at)) is None

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    monkeypatch.setenv("RUNDPO_BROKER_URL", REDIS_URL)
    clear_caches()
    with session_scope() as session:
        assert queue.enqueue_pending_runs(session) == 1
        assert session.scalar(select(Run.enqueued_at)) is not None
        assert queue.enqueue_pending_runs(session) == 0
    message = client.lindex(queue.TRAIN_QUEUE, 0)
    assert message is not None
    assert run.name.encode() in message


def test_lost_worker_run_is_failed_and_refunded(sqlite_service):
    key = sqlite_service.create_account(credits=10)
    with session_scope() as session:
        caller = caller_for(session, key)
        file_id = make_file(session, caller.account_id)
        session.flush()
        run = runs.create_run(session, get_settings(), caller, parse_run_request({"file_id": file_id}))
        runs.set_status(session, run, RunStatus.PROVISIONING_GPUS)
        runs.set_status(session, run, RunStatus.TRAINING_SFT, percent=10)
        run.worker_id = "gone:1"
        from datetime import timedelta

        run.heartbeat_at = utcnow() - timedelta(seconds=get_settings().worker_lost_after_s + 5)
    with session_scope() as session:
        assert runs.fail_lost_runs(session, get_settings()) == 1
    with session_scope() as session:
        run = session.scalar(select(Run))
        assert run.status == "Failed"
        assert "worker" in run.failure_reason
        assert "lost" in run.failure_reason
        assert credits.balance_micro(session, run.account_id) == 10_000_000


def test_cli_accounts_and_keys(sqlite_service):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            env={**__import__("os").environ, **sqlite_service.env},
            capture_output=True,
            text=True,
        )

    result = cli("accounts", "create", "--name", "carol", "--credits", "5", "--json")
    assert result.returncode == 0, result.stderr
    import json

    created = json.loads(result.stdout)
    assert created["account"] == "carol"
    assert created["credits"] == 5
    assert created["api_key"].startswith("rd-")
    assert len(created["api_key"]) >= 35

    assert cli("accounts", "create", "--name", "carol").returncode == 1
    assert cli("accounts", "add-credits", "carol", "2.5").returncode == 0
    second_key = cli("keys", "create", "carol").stdout.strip()
    assert second_key.startswith("rd-")
    with session_scope() as session:
        caller = authenticate(session, second_key)
        assert caller.account_name == "carol"
        assert credits.balance_micro(session, caller.account_id) == 7_500_000

    listing = cli("keys", "list", "carol").stdout
    assert second_key[:11] in listing
    assert second_key not in listing
    result = cli("keys", "revoke", second_key[:11])
    assert result.returncode == 0, result.stderr
    with session_scope() as session:
        assert authenticate(session, second_key) is None
        assert authenticate(session, created["api_key"]) is not None
    assert cli("keys", "revoke", "rd-nope").returncode == 1


def test_keys_stored_as_hashes(sqlite_service):
    with session_scope() as session:
        account, key = create_account(session, "dave", 1)
        from app.models import ApiKey

        stored = session.scalar(select(ApiKey).where(ApiKey.account_id == account.id))
        assert key not in (stored.key_hash, stored.prefix)
        assert stored.prefix == key[:11]
