"""The run events API (`get_events`) and the extras of `get_status`, on a live server."""

from datetime import datetime, timedelta

import httpx
import pytest

from app import credits, files, runs
from app.accounts import authenticate
from app.db import session_scope
from app.events import EventLevel, EventType, add_event, list_events
from app.models import PreferenceFile, Run, utcnow
from app.params import parse_run_request
from app.settings import get_settings
from app.statuses import RunStatus

pytestmark = pytest.mark.timeout(120)


def headers(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def create_pending_run(key: str, tokens: int = 10_000) -> str:
    """Store a file record and a Pending run for the key's account; return the run's name."""
    with session_scope() as session:
        caller = authenticate(session, key)
        upload = PreferenceFile(
            id=files.new_file_id(),
            account_id=caller.account_id,
            name="pairs.jsonl",
            pair_count=10,
            size_bytes=1000,
            token_estimate=tokens,
            sha256="0" * 64,
            storage_key="uploads/pairs.jsonl",
        )
        session.add(upload)
        session.flush()
        request = parse_run_request(
            {"file_id": upload.id, "base_model": "Qwen/Qwen2-0.5B", "gpus": 1}
        )
        run = runs.create_run(session, get_settings(), caller, request)
        return run.name


def advance(run_name: str, *statuses: RunStatus, failure_reason: str | None = None) -> None:
    with session_scope() as session:
        run = session.query(Run).filter_by(name=run_name).one()
        for status in statuses:
            runs.set_status(session, run, status, percent=0.0, failure_reason=failure_reason)


def add_metrics(run_name: str, steps: range, phase: str = "sft") -> None:
    with session_scope() as session:
        run = session.query(Run).filter_by(name=run_name).one()
        for step in steps:
            add_event(
                session,
                run,
                EventType.METRICS,
                {"phase": phase, "step": step, "total_steps": 10, "loss": 2.0 / step},
            )


def get_events(api_url: str, key: str, suffix: str = "", **params) -> httpx.Response:
    return httpx.get(f"{api_url}/get_events{suffix}", headers=headers(key), params=params)


def test_events_in_order(live_api, service):
    key = service.create_account()
    run_name = create_pending_run(key)
    advance(run_name, RunStatus.PROVISIONING_GPUS, RunStatus.LAUNCHING_SFT, RunStatus.TRAINING_SFT)
    add_metrics(run_name, range(1, 3))
    with session_scope() as session:
        run = session.query(Run).filter_by(name=run_name).one()
        add_event(session, run, EventType.MESSAGE, {"text": "1 prompt was cut"}, EventLevel.WARNING)

    response = get_events(live_api.api_url, key, run_name=run_name)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["run_name"] == run_name
    assert body["has_more"] is False
    events = body["events"]
    assert [event["type"] for event in events] == [
        "status", "status", "status", "status", "metrics", "metrics", "message"
    ]
    assert [event["data"].get("status") for event in events[:4]] == [
        "Pending", "Provisioning GPUs", "Launching SFT", "Training SFT"
    ]
    ids = [event["id"] for event in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert body["next_after"] == ids[-1]
    assert events[4]["data"]["step"] == 1
    assert events[5]["data"]["loss"] == 1.0
    assert events[6]["level"] == "warning"
    assert events[6]["data"] == {"text": "1 prompt was cut"}
    for event in events:
        assert set(event) == {"id", "time", "level", "type", "data"}
        moment = datetime.fromisoformat(event["time"])
        assert moment.utcoffset() == timedelta(0)
        assert abs(utcnow() - moment) < timedelta(minutes=5)


def test_failed_status_event_is_error(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    run_name = create_pending_run(key)
    advance(run_name, RunStatus.FAILED, failure_reason="CUDA out of memory")

    events = get_events(sqlite_live_api.api_url, key, run_name=run_name).json()["events"]

    assert events[-1]["type"] == "status"
    assert events[-1]["level"] == "error"
    assert events[-1]["data"]["status"] == "Failed"
    assert events[-1]["data"]["failure_reason"] == "CUDA out of memory"


def test_events_cursor_pagination(live_api, service):
    key = service.create_account()
    run_name = create_pending_run(key)
    add_metrics(run_name, range(1, 11))
    api = live_api.api_url

    first = get_events(api, key, run_name=run_name, limit=4).json()
    assert len(first["events"]) == 4
    assert first["has_more"] is True
    assert first["next_after"] == first["events"][-1]["id"]

    seen = list(first["events"])
    cursor = first["next_after"]
    pages = 1
    while True:
        page = get_events(api, key, run_name=run_name, limit=4, after=cursor).json()
        pages += 1
        seen.extend(page["events"])
        if not page["has_more"]:
            break
        cursor = page["next_after"]
    assert pages == 3
    assert len(seen) == 11  # the Pending status event and 10 metrics events
    assert [event["id"] for event in seen] == sorted(event["id"] for event in seen)
    assert len({event["id"] for event in seen}) == 11

    # Past the last event: no events, and the cursor comes back unchanged.
    last_id = seen[-1]["id"]
    tail = get_events(api, key, run_name=run_name, after=last_id).json()
    assert tail["events"] == []
    assert tail["has_more"] is False
    assert tail["next_after"] == last_id

    # An exact page ends without has_more.
    exact = get_events(api, key, run_name=run_name, limit=11).json()
    assert len(exact["events"]) == 11
    assert exact["has_more"] is False


def test_events_default_and_max_limit(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    run_name = create_pending_run(key)
    add_metrics(run_name, range(1, 121))
    api = sqlite_live_api.api_url

    default = get_events(api, key, run_name=run_name).json()
    assert len(default["events"]) == 100
    assert default["has_more"] is True

    largest = get_events(api, key, run_name=run_name, limit=1000).json()
    assert len(largest["events"]) == 121
    assert largest["has_more"] is False

    for bad in ({"limit": 1001}, {"limit": 0}, {"after": -1}, {"limit": "many"}):
        response = get_events(api, key, run_name=run_name, **bad)
        assert response.status_code == 400, bad
        assert "Invalid request" in response.json()["error"]


def test_events_other_account_404(live_api, service):
    owner = service.create_account()
    stranger = service.create_account()
    run_name = create_pending_run(owner)

    response = get_events(live_api.api_url, stranger, run_name=run_name)
    status = httpx.get(
        f"{live_api.api_url}/get_status", headers=headers(stranger), params={"run_name": run_name}
    )

    assert response.status_code == 404
    assert status.status_code == 404
    assert response.json()["error"] == status.json()["error"]
    assert run_name in response.json()["error"]


def test_events_unknown_or_missing_run(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    api = sqlite_live_api.api_url

    assert get_events(api, key, run_name="no_such_run").status_code == 404
    missing = get_events(api, key)
    assert missing.status_code == 400
    assert "run_name is missing" in missing.json()["error"]
    unauthenticated = httpx.get(f"{api}/get_events", params={"run_name": "x"})
    assert unauthenticated.status_code == 401


def test_events_php_alias(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    run_name = create_pending_run(key)

    plain = get_events(sqlite_live_api.api_url, key, run_name=run_name)
    php = get_events(sqlite_live_api.api_url, key, ".php", run_name=run_name)

    assert php.status_code == 200
    assert php.json() == plain.json()


def test_list_events_service(sqlite_service):
    key = sqlite_service.create_account()
    run_name = create_pending_run(key)
    add_metrics(run_name, range(1, 4))
    with session_scope() as session:
        run = session.query(Run).filter_by(name=run_name).one()
        page, has_more = list_events(session, run, None, 2)
        assert [event.type for event in page] == ["status", "metrics"]
        assert has_more is True
        rest, has_more = list_events(session, run, page[-1].id, 10)
        assert [event.data["step"] for event in rest] == [2, 3]
        assert has_more is False


def test_status_extras_pending(live_api, service):
    key = service.create_account(credits=100)
    run_name = create_pending_run(key, tokens=1_000_000)

    body = httpx.get(
        f"{live_api.api_url}/get_status", headers=headers(key), params={"run_name": run_name}
    ).json()

    # The hold of a Pending run is its estimated cost: 1,000,000 tokens × (0.05 × 3 + 1)
    # × 2 credits per million tokens.
    assert body["cost"] == pytest.approx(2.3)
    assert body["metrics"] == {}
    assert body["step"] is None
    assert body["total_steps"] is None
    assert body["started_at"] is None
    assert body["finished_at"] is None
    assert body["eta_s"] is None
    assert body["base_model"] == "Qwen/Qwen2-0.5B"
    assert datetime.fromisoformat(body["created_at"]).utcoffset() == timedelta(0)


def test_status_extras_while_training(live_api, service):
    key = service.create_account(credits=100)
    run_name = create_pending_run(key)
    advance(run_name, RunStatus.PROVISIONING_GPUS, RunStatus.LAUNCHING_SFT, RunStatus.TRAINING_SFT)
    metrics = {"phase": "sft", "step": 4, "total_steps": 10, "percent": 40.0, "loss": 1.25}
    with session_scope() as session:
        run = session.query(Run).filter_by(name=run_name).one()
        run.started_at = utcnow() - timedelta(seconds=60)
        run.phase_started_at = utcnow() - timedelta(seconds=40)
        run.step, run.total_steps = 4, 10
        run.percent = 40.0
        run.latest_metrics = metrics

    body = httpx.get(
        f"{live_api.api_url}/get_status", headers=headers(key), params={"run_name": run_name}
    ).json()

    assert body["status"] == "Training SFT"
    assert body["percent"] == 40.0
    assert body["step"] == 4
    assert body["total_steps"] == 10
    assert body["metrics"] == metrics
    started = datetime.fromisoformat(body["started_at"])
    assert started.utcoffset() == timedelta(0)
    assert timedelta(seconds=50) < utcnow() - started < timedelta(seconds=120)
    # 40 s for 4 steps, so about 60 s for the 6 steps left.
    assert 55 <= body["eta_s"] <= 80


def test_status_extras_after_settlement_and_refund(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account(credits=100)
    settled = create_pending_run(key, tokens=1_000_000)
    refunded = create_pending_run(key, tokens=1_000_000)
    with session_scope() as session:
        run = session.query(Run).filter_by(name=settled).one()
        runs.set_status(session, run, RunStatus.SAVING_MODEL)
        credits.settle(session, run, 500_000, run.price_per_million_tokens)
        runs.set_status(session, run, RunStatus.COMPLETE)
    advance(refunded, RunStatus.FAILED, failure_reason="the worker was lost")
    with session_scope() as session:
        run = session.query(Run).filter_by(name=refunded).one()
        credits.refund(session, run, "the worker was lost")

    def status_of(run_name: str) -> dict:
        return httpx.get(
            f"{sqlite_live_api.api_url}/get_status",
            headers=headers(key),
            params={"run_name": run_name},
        ).json()

    done = status_of(settled)
    assert done["status"] == "Complete"
    assert done["cost"] == pytest.approx(1.0)  # 500,000 tokens at 2 credits per million
    assert done["eta_s"] is None
    assert datetime.fromisoformat(done["finished_at"]).utcoffset() == timedelta(0)
    failed = status_of(refunded)
    assert failed["cost"] == 0
    assert failed["failure_reason"] == "the worker was lost"
