from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query

from app import queue, runs, status_reads
from app.deps import (
    CallerDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    check_key_present,
    enforce_request_limit,
)
from app.downloads import download_url
from app.params import parse_run_request
from app.routing import endpoint

router = APIRouter()

JsonObject = Annotated[dict[str, Any] | None, Body()]


@endpoint(router, "run_dpo", ["POST"])
def run_dpo(
    caller: CallerDep, session: SessionDep, settings: SettingsDep, body: JsonObject = None
) -> dict[str, Any]:
    """Start a run: SFT then DPO on an uploaded file or on two Hugging Face data sets."""
    run_request = parse_run_request(body)
    run = runs.create_run(session, settings, caller, run_request)
    session.commit()
    queue.enqueue(session, run)
    return {"run_name": run.name, "file_id": run.file_id, "status": "pending"}


@endpoint(router, "get_status", ["GET", "POST"])
async def get_status(
    settings: SettingsDep,
    storage: StorageDep,
    x_api_key: Annotated[str | None, Header()] = None,
    run_name: Annotated[str | None, Query()] = None,
    body: JsonObject = None,
) -> dict[str, Any]:
    """Return a run's status and percent; on Complete also its download_url.

    The API key is checked in the same query that reads the run, and concurrent requests
    share queries (see `app.status_reads`): polling clients call this route more than any other.
    """
    if run_name is None and body:
        run_name = body.get("run_name") or body.get("run_id")
    run = await status_reads.read_status(check_key_present(x_api_key), run_name)
    await enforce_request_limit(settings, run.key_id)
    return runs.status_payload(run, download_url(settings, storage, run))


@endpoint(router, "cancel_run", ["POST"])
def cancel_run(
    caller: CallerDep,
    session: SessionDep,
    run_name: Annotated[str | None, Query()] = None,
    body: JsonObject = None,
) -> dict[str, Any]:
    """Cancel a run by `run_id` (the official client) or `run_name`."""
    if run_name is None and body:
        run_name = body.get("run_id") or body.get("run_name")
    runs.cancel_run(session, caller, run_name)
    session.commit()
    return {"success": True}
