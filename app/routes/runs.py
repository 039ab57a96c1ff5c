from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Query, Request, Response

from app import queue, runs, status_reads
from app.deps import (
    CallerDep,
    SessionDep,
    SettingsDep,
    check_key_present,
    get_storage,
)
from app.downloads import download_url
from app.params import parse_run_request
from app.routing import endpoint
from app.settings import get_settings

router = APIRouter()

JsonObject = Annotated[dict[str, Any] | None, Body()]

# get_status reads its header and query parameter from the request itself, because FastAPI's
# per-parameter validation cost more CPU than the rest of the route. They are documented here.
GET_STATUS_PARAMETERS = {
    "parameters": [
        {
            "name": "x-api-key",
            "in": "header",
            "required": True,
            "schema": {"type": "string"},
            "description": "The account's API key.",
        },
        {
            "name": "run_name",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "The name run_dpo returned; a POST may send it in the body instead.",
        },
    ]
}


# The first route of the first router, so that matching the most frequent request is quick.
@endpoint(router, "get_status", ["GET", "POST"], openapi_extra=GET_STATUS_PARAMETERS)
async def get_status(request: Request, body: JsonObject = None) -> Response:
    """Return a run's status and percent; on Complete also its download_url.

    The API key is checked in the same query that reads the run, and concurrent requests
    share queries (see `app.status_reads`): polling clients call this route more than any other.
    """
    run_name = request.query_params.get("run_name")
    if run_name is None and body:
        run_name = body.get("run_name") or body.get("run_id")
    api_key = check_key_present(request.headers.get("x-api-key"))

    settings = get_settings()
    run = await status_reads.read_status(settings, api_key, run_name)

    payload = runs.status_payload(run, download_url(settings, get_storage(), run))
    # orjson directly: FastAPI's validation and encoding of a returned dict cost more.
    return Response(orjson.dumps(payload), media_type="application/json")


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
