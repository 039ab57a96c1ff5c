"""Entry point: `python -m worker.training JOB_JSON`, also under `accelerate launch`.

Exit status: 0 after a `done` event, 1 after an `error` event, 2 when the job file itself is
unreadable (no progress file is known then, so the reason goes to stderr only).
"""

import logging
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from worker.training.errors import classify_failure
from worker.training.job import TrainingJob
from worker.training.progress import ProgressReporter
from worker.training.run import run_job

logger = logging.getLogger("worker.training")


class RunContextFilter(logging.Filter):
    """Add the run name and process rank to every log record."""

    def __init__(self, run_name: str, rank: int) -> None:
        super().__init__()
        self.run_name = run_name
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_name = self.run_name
        record.rank = self.rank
        return True


def configure_logging(job: TrainingJob, rank: int) -> None:
    """Log to stderr, and from the main process also to `job.log_path`, run name on each line."""
    formatter = logging.Formatter(
        "%(asctime)s %(levelname)s run=%(run_name)s rank=%(rank)d %(name)s: %(message)s"
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if job.log_path is not None and rank == 0:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(job.log_path, encoding="utf-8"))
    context = RunContextFilter(job.run_name, rank)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(context)
    # A no-op when the root logger already has handlers (for example under pytest).
    logging.basicConfig(level=logging.INFO, handlers=handlers)
    # transformers and TRL write to their own stderr handler by default. Propagating to the
    # root handlers instead puts the run name on their lines too.
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_warning()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m worker.training JOB_JSON", file=sys.stderr)
        return 2
    try:
        job = TrainingJob.from_json(Path(argv[1]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: the job file {argv[1]} is unreadable: {exc}", file=sys.stderr)
        return 2

    state = PartialState(cpu=job.use_cpu)
    configure_logging(job, state.process_index)
    reporter = ProgressReporter(job.progress_path, state.is_main_process)
    logger.info(
        "starting %s on %s, %d process(es), pid %d",
        job.base_model,
        state.device,
        state.num_processes,
        os.getpid(),
    )

    try:
        run_job(job, reporter)
    except (Exception, MemoryError) as exc:
        kind, reason = classify_failure(exc, on_gpu=state.device.type == "cuda")
        logger.error("run failed (%s): %s", kind, reason, exc_info=kind == "internal")
        # NOTE: only the main process writes the error event. When another rank fails
        # alone, the launcher stops every rank, and the parent gets exit status 1 with no
        # error event.
        reporter.error(kind, reason)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
