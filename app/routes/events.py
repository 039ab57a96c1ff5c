from typing import Annotated, Any

from fastapi import APIRouter, Query

from app import events, runs
from app.deps import CallerDep, SessionDep
from app.routing import endpoint

router = APIRouter()

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@endpoint(router, "get_events", ["GET"])
def get_events(
    caller: CallerDep,
    session: SessionDep,
    run_name: Annotated[str | None, Query()] = None,
    after: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """Return a run's events oldest first: status changes, training metrics and messages.

    Pass the returned `next_after` as `after` to read the events that follow.
    """
    run = runs.get_run(session, caller, run_name)
    page, has_more = events.list_events(session, run, after, limit)
    return {
        "run_name": run.name,
        "events": [
            {
                "id": event.id,
                "time": runs.as_utc(event.created_at).isoformat(),
                "level": event.level,
                "type": event.type,
                "data": event.data,
            }
            for event in page
        ],
        "next_after": page[-1].id if page else after,
        "has_more": has_more,
    }
