"""Runs: creating one with its credit hold, reading its status, cancelling it, moving it on.

Every status change of a run goes through `set_status`, which checks the transition and
records a status event.
"""

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import credits
from app.accounts import Caller
from app.catalog import catalog_model
from app.errors import ApiError, not_found
from app.events import EventLevel, EventType, add_event
from app.models import PreferenceFile, Run, Worker, utcnow
from app.names import new_run_name
from app.params import RunRequest
from app.settings import Settings
from app.statuses import PIPELINE, TERMINAL, RunStatus, check_transition

logger = logging.getLogger(__name__)

CANCELLED_REASON = "Cancelled by the user; the credit hold was refunded."


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every time stored here is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=utcnow().tzinfo)
    return moment


def live_worker_gpus(session: Session, settings: Settings) -> int | None:
    """Return the most GPUs any live worker offers, or None when no worker is live."""
    cutoff = utcnow() - timedelta(seconds=settings.worker_lost_after_s)
    return session.scalar(select(func.max(Worker.gpus)).where(Worker.heartbeat_at >= cutoff))


def _check_gpus(session: Session, settings: Settings, gpus: int) -> None:
    if gpus > settings.max_gpus_per_run:
        raise ApiError(
            400,
            f"Invalid request: gpus={gpus} is more than this server allows per run "
            f"({settings.max_gpus_per_run}). Ask for at most {settings.max_gpus_per_run}.",
        )
    largest = live_worker_gpus(session, settings)
    if largest is None:
        return
    # A CPU-only worker (0 GPUs) that may train on the CPU takes any run.
    if largest == 0 and settings.allow_cpu_training:
        return
    if gpus > largest:
        raise ApiError(
            400,
            f"Invalid request: gpus={gpus} but the largest live worker has {largest} GPUs. "
            f"Ask for at most {largest}.",
        )


def create_run(session: Session, settings: Settings, caller: Caller, request: RunRequest) -> Run:
    """Store a Pending run and hold its estimated cost; the caller commits and enqueues."""
    params = request.params
    entry = catalog_model(settings, params.base_model)
    _check_gpus(session, settings, params.gpus)

    if request.file_id is not None:
        upload = session.get(PreferenceFile, request.file_id)
        if upload is None or upload.account_id != caller.account_id:
            raise not_found(
                f"File {request.file_id!r} not found. List your files with list_files, or "
                "upload one with upload_file."
            )
        token_count = upload.token_estimate
    else:
        token_count = settings.hf_dataset_hold_tokens

    cost = credits.estimate_cost_micro(
        token_count,
        params.sft_ratio,
        params.sft_num_train_epochs,
        params.dpo_num_train_epochs,
        entry.price_per_million_tokens,
    )

    name = _unused_run_name(session)
    run = Run(
        name=name,
        account_id=caller.account_id,
        file_id=request.file_id,
        hf_sft_dataset_name=request.hf_sft_dataset_name,
        hf_dpo_dataset_name=request.hf_dpo_dataset_name,
        base_model=params.base_model,
        gpus=params.gpus,
        params=params.model_dump(),
        status=RunStatus.PENDING.value,
        percent=0.0,
        price_per_million_tokens=entry.price_per_million_tokens,
    )
    session.add(run)
    session.flush()

    credits.hold(session, run, cost)
    add_event(session, run, EventType.STATUS, {"status": RunStatus.PENDING.value, "percent": 0.0})
    logger.info(
        "run %s account %s created: model %s, hold %s micro-credits",
        run.name,
        caller.account_id,
        run.base_model,
        cost,
    )
    return run


def _unused_run_name(session: Session) -> str:
    # NOTE: two requests that draw the same free name at the same moment make the second one
    # fail on the unique constraint. The random suffix after three collisions makes it rare.
    for attempt in range(10):
        name = new_run_name(attempt)
        if session.scalar(select(Run.id).where(Run.name == name)) is None:
            return name
    raise ApiError(500, "Could not pick a unique run name; try again.")


def missing_run_name() -> ApiError:
    return ApiError(400, "Invalid request: run_name is missing. Pass the name run_dpo returned.")


def run_not_found(run_name: str) -> ApiError:
    return not_found(f"Run {run_name!r} not found. Check the run_name that run_dpo returned.")


def get_run(session: Session, caller: Caller, run_name: str | None, *, lock: bool = False) -> Run:
    """Return the caller's run, or 404 for an unknown name or someone else's run."""
    if not run_name:
        raise missing_run_name()
    query = select(Run).where(Run.name == run_name, Run.account_id == caller.account_id)
    if lock:
        query = query.with_for_update()
    run = session.scalar(query)
    if run is None:
        raise run_not_found(run_name)
    return run


def set_status(
    session: Session,
    run: Run,
    status: RunStatus,
    *,
    percent: float | None = None,
    failure_reason: str | None = None,
) -> None:
    """Move `run` to `status`; raises `InvalidTransition` for a backward or terminal move."""
    check_transition(run.run_status, status)
    changed = run.status != status.value
    run.status = status.value
    if percent is not None:
        run.percent = percent if changed else max(run.percent, percent)
    elif changed and status != RunStatus.FAILED:
        # Percent is the progress of the current training phase: 0 until DPO training ends,
        # then 100. A failed run keeps the percent it reached.
        run.percent = 100.0 if PIPELINE.index(status) > PIPELINE.index(RunStatus.TRAINING_DPO) else 0.0
    if failure_reason is not None:
        run.failure_reason = failure_reason
    if status in TERMINAL:
        run.finished_at = utcnow()
    if changed:
        data: dict[str, Any] = {"status": status.value, "percent": run.percent}
        level = EventLevel.INFO
        if failure_reason:
            data["failure_reason"] = failure_reason
            level = EventLevel.ERROR
        add_event(session, run, EventType.STATUS, data, level)
        logger.info("run %s account %s: %s", run.name, run.account_id, status.value)


def fail_lost_runs(session: Session, settings: Settings) -> int:
    """Fail every started run whose worker stopped sending heartbeats, and refund its hold."""
    cutoff = utcnow() - timedelta(seconds=settings.worker_lost_after_s)
    lost = session.scalars(
        select(Run)
        .where(
            Run.status.notin_([status.value for status in TERMINAL] + [RunStatus.PENDING.value]),
            Run.heartbeat_at < cutoff,
        )
        .with_for_update(skip_locked=True)
    ).all()
    for run in lost:
        reason = (
            f"The worker running this run was lost (no heartbeat for more than "
            f"{settings.worker_lost_after_s} s, last from {run.worker_id}). The credit hold was "
            "refunded; start the run again."
        )
        fail_run(session, run, reason)
        logger.warning("run %s account %s: worker %s lost", run.name, run.account_id, run.worker_id)
    session.commit()
    return len(lost)


def fail_run(session: Session, run: Run, reason: str) -> bool:
    """Fail a run that is not finished and refund its hold; False if it already ended."""
    if run.run_status in TERMINAL:
        return False
    set_status(session, run, RunStatus.FAILED, failure_reason=reason)
    credits.refund(session, run, reason)
    return True


def cancel_run(session: Session, caller: Caller, run_name: str | None) -> Run:
    """Cancel a run: a Pending run fails at once; a running one is stopped by its worker."""
    run = get_run(session, caller, run_name, lock=True)
    if run.run_status in TERMINAL:
        raise ApiError(
            400, f"Invalid request: run {run.name!r} already ended as {run.status}; nothing to cancel."
        )
    run.cancel_requested = True
    if run.run_status == RunStatus.PENDING and run.worker_id is None:
        fail_run(session, run, CANCELLED_REASON)
    logger.info("run %s account %s: cancel requested", run.name, run.account_id)
    return run


# The columns that `status_payload` and `download_url` read, so that get_status loads no more.
STATUS_COLUMNS = (
    Run.name,
    Run.status,
    Run.percent,
    Run.failure_reason,
    Run.base_model,
    Run.file_id,
    Run.created_at,
    Run.started_at,
    Run.finished_at,
    Run.phase_started_at,
    Run.step,
    Run.total_steps,
    Run.latest_metrics,
    Run.cost_micro,
    Run.hold_micro,
    Run.adapter_key,
)


def status_payload(run: Any, download_url: str | None) -> dict[str, Any]:
    """Build the body of get_status: the fields the official client reads, then extras.

    `run` is a Run, or a row from `status_reads.read_status` with the `STATUS_COLUMNS` as
    attributes.
    """
    status = RunStatus(run.status)
    payload: dict[str, Any] = {
        "run_name": run.name,
        "status": run.status,
        "percent": round(run.percent, 2),
    }
    if status == RunStatus.COMPLETE and download_url:
        payload["download_url"] = download_url
    if status == RunStatus.FAILED:
        payload["failure_reason"] = run.failure_reason or "The run failed."
    payload.update(
        {
            "base_model": run.base_model,
            "file_id": run.file_id,
            "created_at": as_utc(run.created_at).isoformat(),
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at),
            "step": run.step,
            "total_steps": run.total_steps,
            "metrics": run.latest_metrics or {},
            "eta_s": _eta_s(run, status),
            "cost": credits.to_credits(run.cost_micro if run.cost_micro is not None else run.hold_micro),
        }
    )
    return payload


def _iso(moment: datetime | None) -> str | None:
    moment = as_utc(moment)
    return moment.isoformat() if moment else None


def _eta_s(run: Any, status: RunStatus) -> float | None:
    """Estimate the seconds left in the current training phase from its pace so far."""
    started = as_utc(run.phase_started_at)
    if status not in (RunStatus.TRAINING_SFT, RunStatus.TRAINING_DPO) or started is None:
        return None
    if not run.step or not run.total_steps or run.step < 3:
        return None
    elapsed = (utcnow() - started).total_seconds()
    return round(elapsed / run.step * (run.total_steps - run.step), 1)
