"""Hand runs to the Celery workers without importing the worker (or torch).

A run is committed first and enqueued after the commit. When the broker is unreachable the
run keeps `enqueued_at` empty and `enqueue_pending_runs`, called periodically by the API
process, sends it once the broker is back.
"""

import logging
from functools import lru_cache

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Run, utcnow
from app.settings import Settings, get_settings
from app.statuses import RunStatus

logger = logging.getLogger(__name__)

TRAIN_TASK = "worker.tasks.train_run"
TRAIN_QUEUE = "training"


# Redis hands out an unacknowledged task again after this many seconds. A run still training
# then gets a second delivery, which the worker ignores because the run is past Pending.
REDIS_VISIBILITY_TIMEOUT_S = 600


def celery_config(settings: Settings) -> dict:
    """Celery settings shared by the API (which only sends) and the worker."""
    config = {
        "broker_url": settings.broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": TRAIN_QUEUE,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    # kombu's SQLAlchemy transport hands its transport options to create_engine, which
    # rejects unknown keyword arguments, so only Redis gets any.
    if settings.broker_url.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    return config


@lru_cache
def sender() -> Celery:
    app = Celery("rundpo-api")
    app.conf.update(celery_config(get_settings()))
    return app


def enqueue(session: Session, run: Run) -> bool:
    """Send the training task of a committed run; return False when the broker is unreachable."""
    try:
        sender().send_task(TRAIN_TASK, args=[run.name], queue=TRAIN_QUEUE, retry=False)
    except Exception as exc:  # kombu raises several unrelated types for an unreachable broker
        logger.warning(
            "run %s account %s: broker unreachable, the run stays queued: %s",
            run.name,
            run.account_id,
            exc,
        )
        return False
    session.execute(update(Run).where(Run.id == run.id).values(enqueued_at=utcnow()))
    session.commit()
    return True


def enqueue_pending_runs(session: Session, limit: int = 100) -> int:
    """Send every Pending run that has not reached the broker yet; returns how many were sent."""
    runs = session.scalars(
        select(Run)
        .where(Run.status == RunStatus.PENDING.value, Run.enqueued_at.is_(None))
        .order_by(Run.id)
        .limit(limit)
    ).all()
    sent = 0
    for run in runs:
        if not enqueue(session, run):
            break
        sent += 1
    return sent
