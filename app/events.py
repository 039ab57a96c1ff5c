"""A run's events: status changes, training metrics and messages for the user."""

from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Run, RunEvent


class EventType(str, Enum):
    STATUS = "status"
    METRICS = "metrics"
    MESSAGE = "message"


class EventLevel(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def add_event(
    session: Session,
    run: Run,
    event_type: EventType,
    data: dict[str, Any],
    level: EventLevel = EventLevel.INFO,
) -> RunEvent:
    event = RunEvent(run_id=run.id, type=event_type.value, level=level.value, data=data)
    session.add(event)
    return event


def list_events(
    session: Session, run: Run, after: int | None = None, limit: int = 100
) -> tuple[list[RunEvent], bool]:
    """Return up to `limit` of `run`'s events with an id above `after`, oldest first.

    The second value is True when more events follow the last one returned.
    """
    query = select(RunEvent).where(RunEvent.run_id == run.id)
    if after is not None:
        query = query.where(RunEvent.id > after)
    rows = list(session.scalars(query.order_by(RunEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def events_of_type(session: Session, run: Run, event_type: EventType) -> list[RunEvent]:
    """Return all of `run`'s events of one type, oldest first."""
    return list(
        session.scalars(
            select(RunEvent)
            .where(RunEvent.run_id == run.id, RunEvent.type == event_type.value)
            .order_by(RunEvent.id)
        )
    )
