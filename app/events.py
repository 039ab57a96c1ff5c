"""A run's events: status changes, training metrics and messages for the user."""

from enum import Enum
from typing import Any

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
