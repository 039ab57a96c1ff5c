"""Failures a run can end with, each with the `kind` its error event carries."""

from worker.model_store import ModelUnavailable


class JobError(Exception):
    """A failure whose message is written for the user who started the run."""

    kind = "internal"


class DataError(JobError):
    """Training data that is missing, unreadable or invalid. The message names the data set."""

    kind = "data"


class TrainingDiverged(JobError):
    """A loss or gradient norm that became NaN or infinite."""

    kind = "diverged"

    def __init__(self, phase: str, step: int, value: float) -> None:
        super().__init__(
            f"training diverged at step {step} of {phase.upper()}: the loss or gradient norm"
            f" became {value}. Lower the learning rate"
        )
        self.phase = phase
        self.step = step


OUT_OF_MEMORY_REASON = (
    "Out of memory: the batch did not fit in {where} memory. Lower the batch size or"
    " dpo_max_length, or enable gradient checkpointing"
)


def classify_failure(error: BaseException, on_gpu: bool) -> tuple[str, str]:
    """Return the `(kind, reason)` of an error event for an exception that ended the run."""
    import torch

    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return "oom", OUT_OF_MEMORY_REASON.format(where="GPU" if on_gpu else "host")
    if isinstance(error, JobError):
        return error.kind, str(error)
    if isinstance(error, ModelUnavailable):
        return "model", str(error)
    return "internal", f"internal error: {type(error).__name__}: {error}"
