"""Supervising one run on a worker: claim it, give it GPUs, train it in a child process,
publish its adapter, and settle or refund its credits.

The training itself runs in a child process group (`python -m worker.training`, or
`accelerate launch` for several GPUs), so a crash, an out-of-memory kill or a cancel ends
that process group and never the worker. The child appends progress events as JSON lines
to a file that the supervisor polls and copies to the run's row and events.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import credits
from app.db import session_scope
from app.events import EventLevel, EventType, add_event
from app.models import PreferenceFile, Run, utcnow
from app.runs import CANCELLED_REASON, fail_run, set_status
from app.settings import Settings, get_settings
from app.statuses import TERMINAL, TRAINING, InvalidTransition, RunStatus
from app.storage import Storage, adapter_key, make_storage
from worker.gpus import GpuLease, acquire_gpus, detect_gpu_count, worker_id
from worker.training.environment import training_environment
from worker.training.launch import training_command

logger = logging.getLogger(__name__)

POLL_S = 1.0
KILL_GRACE_S = 5.0
LOG_TAIL_LINES = 20


class RunFailure(Exception):
    """A reason to fail the run, worded for the user who reads `failure_reason`."""


class RunCancelled(Exception):
    pass


@dataclass
class ChildOutcome:
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    returncode: int | None = None
    log_tail: list[str] = field(default_factory=list)


def _kill_group(process: subprocess.Popen) -> None:
    """Stop the child's whole process group: SIGTERM, then SIGKILL after a grace period."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _die_with_parent() -> None:
    """Run in the child before exec: own process group, killed if the worker dies."""
    os.setsid()
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class RunSupervisor:
    def __init__(
        self, run_name: str, settings: Settings | None = None, storage: Storage | None = None
    ) -> None:
        self.run_name = run_name
        self.settings = settings or get_settings()
        self.storage = storage or make_storage(self.settings)
        self.work_dir = Path(self.settings.data_dir) / "runs" / run_name
        self.account_id: int | None = None
        self._last_heartbeat = 0.0

    def _log(self, level: int, message: str, *args: Any) -> None:
        logger.log(level, "run %s account %s: " + message, self.run_name, self.account_id, *args)

    # Each step below opens its own short transaction, so the run's row is never locked
    # while training goes on.

    def execute(self) -> str:
        """Train the run to Complete or Failed; return its final status, or "skipped"."""
        if not self._claim():
            return "skipped"
        lease: GpuLease | None = None
        try:
            lease = self._provision()
            job_path = self._prepare(lease)
            outcome = self._train(job_path, lease)
            self._publish(outcome, lease)
            lease = None
            return RunStatus.COMPLETE.value
        except RunCancelled:
            self._finish_failed(CANCELLED_REASON)
        except RunFailure as exc:
            self._finish_failed(str(exc))
        except Exception as exc:
            self._log(logging.ERROR, "unexpected error: %s", exc, exc_info=True)
            self._finish_failed(
                f"Internal error in the worker ({type(exc).__name__}: {exc}). The credit hold "
                "was refunded; the worker log has the details."
            )
        finally:
            if lease is not None:
                lease.release()
            self._clean_work_dir()
        return RunStatus.FAILED.value

    def _claim(self) -> bool:
        with session_scope() as session:
            run = session.scalar(
                select(Run).where(Run.name == self.run_name).with_for_update()
            )
            if run is None:
                logger.warning("run %s: not in the database; dropping its task", self.run_name)
                return False
            self.account_id = run.account_id
            if run.run_status != RunStatus.PENDING or run.worker_id is not None:
                self._log(logging.INFO, "is %s, not Pending; not training it again", run.status)
                return False
            run.worker_id = worker_id()
            run.started_at = utcnow()
            run.heartbeat_at = utcnow()
            if run.cancel_requested:
                fail_run(session, run, CANCELLED_REASON)
                return False
            set_status(session, run, RunStatus.PROVISIONING_GPUS)
        self._log(logging.INFO, "claimed by worker %s", worker_id())
        return True

    def _heartbeat(self, session: Session, run: Run, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_heartbeat >= self.settings.worker_heartbeat_s:
            run.heartbeat_at = utcnow()
            self._last_heartbeat = now

    def _check_cancel(self) -> None:
        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name))
            self._heartbeat(session, run)
            if run.cancel_requested:
                raise RunCancelled()
            if run.run_status in TERMINAL:
                # Failed elsewhere, for example by a sweep that thought this worker was lost.
                raise RunFailure(run.failure_reason or f"the run ended as {run.status}")

    def _provision(self) -> GpuLease | None:
        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name))
            wanted = run.gpus
        total = detect_gpu_count(self.settings)
        if total == 0:
            if not self.settings.allow_cpu_training:
                raise RunFailure(
                    "This worker has no GPU and CPU training is disabled. Start a worker on a "
                    "GPU host, or set RUNDPO_ALLOW_CPU_TRAINING=true on this one (slow)."
                )
            self._log(logging.INFO, "training on the CPU (no GPU on this worker)")
            return None
        if wanted > total:
            raise RunFailure(
                f"The run asks for gpus={wanted} but the worker that took it has {total}. "
                f"Start it again with gpus at most {total}."
            )

        def keep_waiting() -> bool:
            self._check_cancel()
            return True

        lease = acquire_gpus(self.settings, total, wanted, keep_waiting)
        self._log(logging.INFO, "holds GPUs %s", lease.cuda_visible_devices)
        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name))
            run.assigned_gpus = lease.cuda_visible_devices
        return lease

    def _prepare(self, lease: GpuLease | None) -> Path:
        """Write the job file: the base model's directory, the pairs, every parameter."""
        from app.params import RunParams
        from worker.model_store import ModelUnavailable, resolve_model
        from worker.training.job import HubData, PairsData, TrainingJob

        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name))
            params = dict(run.params)
            base_model = run.base_model
            upload = session.get(PreferenceFile, run.file_id) if run.file_id else None
            hf_names = (run.hf_sft_dataset_name, run.hf_dpo_dataset_name)

        entry = self.settings.model_catalog.get(base_model)
        if entry is None:
            raise RunFailure(
                f"Base model {base_model!r} is no longer in this worker's model catalog. "
                "Check RUNDPO_MODEL_CATALOG on the workers."
            )
        try:
            model_dir = resolve_model(base_model, entry, Path(self.settings.models_dir))
        except ModelUnavailable as exc:
            raise RunFailure(f"Model unavailable: {exc}") from None
        # NOTE: a cancel that arrives while a model is imported for the first time (tens of
        # seconds) takes effect here, once the import has finished.
        self._check_cancel()

        if upload is not None:
            data = PairsData(path=self._write_pairs(upload))
        else:
            data = HubData(sft_dataset=hf_names[0], dpo_dataset=hf_names[1])

        job = TrainingJob(
            run_name=self.run_name,
            base_model=base_model,
            model_dir=Path(model_dir),
            data=data,
            params=RunParams.model_validate(params),
            output_dir=self.work_dir / "output",
            progress_path=self.work_dir / "progress.jsonl",
            seed=42,
            use_cpu=lease is None,
        )
        job_path = self.work_dir / "job.json"
        job_path.write_text(job.to_json())
        return job_path

    def _write_pairs(self, upload: PreferenceFile) -> Path:
        """Copy the stored upload into canonical preference pairs for the trainer."""
        from app.validation import iter_pairs

        pairs_path = self.work_dir / "pairs.jsonl"
        try:
            with self.storage.open_reader(upload.storage_key) as source, open(
                pairs_path, "w", encoding="utf-8"
            ) as target:
                count = 0
                for pair in iter_pairs(source):
                    target.write(json.dumps(pair.to_trl(), ensure_ascii=False) + "\n")
                    count += 1
        except FileNotFoundError:
            raise RunFailure(
                f"The stored data of file {upload.id!r} is missing. Upload the file again and "
                "start a new run with the new file_id."
            ) from None
        except Exception as exc:
            raise RunFailure(
                f"The stored data of file {upload.id!r} is corrupt ({exc}). Upload the file "
                "again and start a new run with the new file_id."
            ) from None
        if count != upload.pair_count:
            raise RunFailure(
                f"The stored data of file {upload.id!r} is corrupt: it holds {count} pairs but "
                f"{upload.pair_count} were uploaded. Upload the file again."
            )
        return pairs_path

    def _train(self, job_path: Path, lease: GpuLease | None) -> dict[str, Any]:
        env = training_environment(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = lease.cuda_visible_devices if lease is not None else ""
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log_path = self.work_dir / "run.log"
        progress_path = self.work_dir / "progress.jsonl"
        progress_path.touch()

        with open(log_path, "ab") as log_file:
            processes = len(lease.indices) if lease is not None else 1
            process = subprocess.Popen(
                training_command(job_path, processes),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )
        self._log(logging.INFO, "training process %d started", process.pid)

        outcome = ChildOutcome()
        offset = 0
        try:
            while True:
                exited = process.poll() is not None
                offset = self._consume_progress(progress_path, offset, outcome)
                if exited:
                    break
                time.sleep(POLL_S)
        except BaseException:
            _kill_group(process)
            raise
        _kill_group(process)

        outcome.returncode = process.returncode
        outcome.log_tail = _tail(log_path, LOG_TAIL_LINES)
        if outcome.error is not None:
            raise RunFailure(outcome.error.get("reason") or "Training failed.")
        if outcome.done is None or process.returncode != 0:
            raise RunFailure(_exit_reason(process.returncode, outcome.log_tail))
        return outcome.done

    def _consume_progress(self, path: Path, offset: int, outcome: ChildOutcome) -> int:
        """Apply the complete progress lines after `offset`; return the new offset."""
        with open(path, "rb") as source:
            source.seek(offset)
            chunk = source.read()
        end = chunk.rfind(b"\n") + 1
        events = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]

        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name).with_for_update())
            self._heartbeat(session, run)
            for event in events:
                self._apply(session, run, event, outcome)
            cancelled = run.cancel_requested
            ended_elsewhere = run.run_status in TERMINAL
        if cancelled:
            raise RunCancelled()
        if ended_elsewhere:
            raise RunFailure(run.failure_reason or f"the run ended as {run.status}")
        return offset + end

    def _apply(self, session: Session, run: Run, event: dict, outcome: ChildOutcome) -> None:
        kind = event.get("type")
        if kind == "status":
            status = RunStatus(event["status"])
            try:
                set_status(session, run, status)
            except InvalidTransition as exc:
                self._log(logging.WARNING, "ignored a status event: %s", exc)
                return
            if status in TRAINING:
                run.phase_started_at = utcnow()
                run.step, run.total_steps = 0, None
        elif kind == "metrics":
            if run.run_status in TRAINING:
                run.percent = max(run.percent, float(event.get("percent") or 0.0))
            run.step = event.get("step")
            run.total_steps = event.get("total_steps")
            run.latest_metrics = {
                key: value for key, value in event.items() if key not in ("type",)
            }
            add_event(session, run, EventType.METRICS, run.latest_metrics)
        elif kind == "message":
            level = EventLevel(event.get("level", "info"))
            add_event(session, run, EventType.MESSAGE, {"text": event.get("text", "")}, level)
        elif kind == "done":
            outcome.done = event
        elif kind == "error":
            outcome.error = event

    def _publish(self, done: dict[str, Any], lease: GpuLease | None) -> None:
        """Zip the adapter under one top folder, store it, free the GPUs, settle, complete."""
        adapter_dir = self.work_dir / "output" / "adapter"
        if not (adapter_dir / "adapter_config.json").is_file():
            raise RunFailure("Training finished but wrote no adapter; the worker log has details.")
        zip_path = self.work_dir / f"{self.run_name}.zip"
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(adapter_dir.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{self.run_name}/{path.relative_to(adapter_dir)}")
        key = adapter_key(self.run_name)
        self.storage.put_file(key, zip_path)

        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name).with_for_update())
            run.adapter_key = key
            set_status(session, run, RunStatus.FREEING_GPUS)
        if lease is not None:
            lease.release()

        tokens_trained = int(done.get("tokens_trained") or 0)
        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name).with_for_update())
            if run.run_status in TERMINAL:
                raise RunFailure(run.failure_reason or f"the run ended as {run.status}")
            run.latest_metrics = {**(run.latest_metrics or {}), "final": done.get("metrics", {})}
            credits.settle(session, run, tokens_trained, run.price_per_million_tokens)
            set_status(session, run, RunStatus.COMPLETE)
        self._log(logging.INFO, "complete: %d tokens trained", tokens_trained)

    def _finish_failed(self, reason: str) -> None:
        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == self.run_name).with_for_update())
            if fail_run(session, run, reason):
                self._log(logging.WARNING, "failed: %s", reason)

    def _clean_work_dir(self) -> None:
        """Remove everything the run wrote on this host but its log."""
        if not self.work_dir.exists():
            return
        for path in self.work_dir.iterdir():
            if path.name == "run.log":
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _exit_reason(returncode: int | None, log_tail: list[str]) -> str:
    if returncode is not None and returncode < 0 and -returncode == signal.SIGKILL:
        return (
            "Out of memory: the training process was killed (SIGKILL), most likely by the "
            "host's out-of-memory killer. Lower the batch size or dpo_max_length, or enable "
            "gradient checkpointing."
        )
    last = log_tail[-1] if log_tail else "no output"
    return f"The training process exited with code {returncode}: {last}"
