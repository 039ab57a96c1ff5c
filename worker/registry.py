"""The worker's row in the `workers` table, its heartbeat, and the sweep of lost runs."""

import logging
import socket
import threading

from sqlalchemy import delete

from app.db import session_scope
from app.models import Worker, utcnow
from app.runs import fail_lost_runs
from app.settings import get_settings
from worker.gpus import detect_gpu_count, worker_id

logger = logging.getLogger(__name__)

_stop = threading.Event()
_thread: threading.Thread | None = None


def beat_once() -> None:
    settings = get_settings()
    with session_scope() as session:
        worker = session.get(Worker, worker_id())
        if worker is None:
            worker = Worker(
                id=worker_id(), hostname=socket.gethostname(), gpus=detect_gpu_count(settings)
            )
            session.add(worker)
        worker.heartbeat_at = utcnow()
    with session_scope() as session:
        failed = fail_lost_runs(session, settings)
    if failed:
        logger.warning("failed %d runs whose worker was lost", failed)


def _beat_forever(interval_s: float) -> None:
    while not _stop.wait(interval_s):
        try:
            beat_once()
        except Exception:
            logger.exception("worker heartbeat failed; retrying in %.0f s", interval_s)


def start_registry() -> None:
    global _thread
    beat_once()
    _stop.clear()
    _thread = threading.Thread(
        target=_beat_forever, args=(get_settings().worker_heartbeat_s,), daemon=True
    )
    _thread.start()
    logger.info("worker %s registered", worker_id())


def stop_registry() -> None:
    _stop.set()
    try:
        with session_scope() as session:
            session.execute(delete(Worker).where(Worker.id == worker_id()))
    except Exception:
        logger.exception("could not remove worker %s from the registry", worker_id())
