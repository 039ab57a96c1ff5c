from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from app import queue, runs
from app.deps import AsyncCallerDep, CallerDep, SessionDep, SettingsDep, StorageDep
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
    caller: AsyncCallerDep,
    settings: SettingsDep,
    storage: StorageDep,
    run_name: Annotated[str | None, Query()] = None,
    body: JsonObject = None,
) -> dict[str, Any]:
    """Return a run's status and percent; on Complete also its download_url."""
    if run_name is None and body:
        run_name = body.get("run_name") or body.get("run_id")
    run = await runs.get_status_row(caller, run_name)
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
