"""The Celery application of the training workers."""

import logging

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from app.queue import TRAIN_QUEUE, celery_config
from app.settings import get_settings

logger = logging.getLogger(__name__)

celery = Celery("rundpo-worker", include=["worker.tasks"])
celery.conf.update(celery_config(get_settings()))
celery.conf.update(
    worker_hijack_root_logger=False,
    task_track_started=True,
)


@worker_ready.connect
def _register(**_) -> None:
    from worker.registry import start_registry

    start_registry()


@worker_shutdown.connect
def _unregister(**_) -> None:
    from worker.registry import stop_registry

    stop_registry()


def run_worker(concurrency: int | None, loglevel: str) -> int:
    """Start a worker in this process: a thread per concurrent run, one per GPU by default."""
    from worker.gpus import detect_gpu_count

    gpus = detect_gpu_count(get_settings())
    slots = concurrency or max(1, gpus)
    logger.info("starting worker with %d GPUs and %d run slots", gpus, slots)
    celery.worker_main(
        [
            "worker",
            f"--loglevel={loglevel.upper()}",
            "--pool=threads",
            f"--concurrency={slots}",
            f"--queues={TRAIN_QUEUE}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0
