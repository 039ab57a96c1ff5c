"""Celery tasks of the training worker."""

from app.queue import TRAIN_TASK
from worker.celery_app import celery
from worker.supervisor import RunSupervisor


@celery.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train_run(run_name: str) -> str:
    """Train one run to Complete or Failed. Safe to deliver twice: a run past Pending is skipped."""
    return RunSupervisor(run_name).execute()
