"""The run's statuses, in the order a run passes through them, and the allowed transitions.

Nothing else in the code base writes a status string: the worker and the API both move a
run through `check_transition`.
"""

from enum import Enum


class RunStatus(str, Enum):
    PENDING = "Pending"
    PROVISIONING_GPUS = "Provisioning GPUs"
    LAUNCHING_SFT = "Launching SFT"
    TRAINING_SFT = "Training SFT"
    PREPARING_DPO = "Preparing for DPO"
    LAUNCHING_DPO = "Launching DPO"
    TRAINING_DPO = "Training DPO"
    SAVING_MODEL = "Saving model"
    FREEING_GPUS = "Freeing GPUs"
    COMPLETE = "Complete"
    FAILED = "Failed"


PIPELINE: tuple[RunStatus, ...] = (
    RunStatus.PENDING,
    RunStatus.PROVISIONING_GPUS,
    RunStatus.LAUNCHING_SFT,
    RunStatus.TRAINING_SFT,
    RunStatus.PREPARING_DPO,
    RunStatus.LAUNCHING_DPO,
    RunStatus.TRAINING_DPO,
    RunStatus.SAVING_MODEL,
    RunStatus.FREEING_GPUS,
    RunStatus.COMPLETE,
)

TERMINAL = frozenset({RunStatus.COMPLETE, RunStatus.FAILED})

# Statuses whose percent reports training progress; elsewhere percent is 0 before training
# and 100 after it.
TRAINING = frozenset({RunStatus.TRAINING_SFT, RunStatus.TRAINING_DPO})


class InvalidTransition(Exception):
    """A status change that would move a run backwards or out of a terminal status."""


def check_transition(current: RunStatus, new: RunStatus) -> None:
    """Raise `InvalidTransition` unless a run may move from `current` to `new`.

    A run moves forward through `PIPELINE`, possibly skipping statuses, and may fail from
    any status that is not terminal. Staying in the same status is allowed.
    """
    if current == new and current not in TERMINAL:
        return
    if current in TERMINAL:
        raise InvalidTransition(f"run is already {current.value}; it cannot become {new.value}")
    if new == RunStatus.FAILED:
        return
    if PIPELINE.index(new) <= PIPELINE.index(current):
        raise InvalidTransition(f"a run cannot go back from {current.value} to {new.value}")
