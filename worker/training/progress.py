"""Progress events: one JSON object per line, appended to the job's progress file.

Event types: `status` (a `RunStatus` value), `metrics` (one per optimizer step), `message`
(`info` or `warning`), then `done` or `error`. Only the main process writes, so a run under
`accelerate launch` produces each event once.
"""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.statuses import RunStatus
from worker.training.errors import TrainingDiverged

logger = logging.getLogger(__name__)

# Keys copied from the trainer's logs into a metrics event when present.
LOGGED_METRICS = ("loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins")


class ProgressReporter:
    """Append progress events to `path` and keep them for the published training log."""

    def __init__(self, path: Path, is_main_process: bool) -> None:
        self.path = path
        self.is_main_process = is_main_process
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        if not self.is_main_process:
            return
        event = {"time": round(time.time(), 3), **event}
        self.events.append(event)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(event, allow_nan=False) + "\n")
            stream.flush()

    def status(self, status: RunStatus) -> None:
        logger.info("status: %s", status.value)
        self.emit({"type": "status", "status": status.value})

    def message(self, text: str, level: str = "info") -> None:
        logger.log(logging.WARNING if level == "warning" else logging.INFO, "%s", text)
        self.emit({"type": "message", "level": level, "text": text})

    def done(self, tokens_trained: int, metrics: dict[str, Any]) -> None:
        self.emit({"type": "done", "tokens_trained": tokens_trained, "metrics": metrics})

    def error(self, kind: str, reason: str) -> None:
        self.emit({"type": "error", "kind": kind, "reason": reason})


def _finite_or_none(value: Any) -> float | None:
    """Return `value` as a float, or None for NaN and infinity, which JSON cannot carry."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class ProgressCallback(TrainerCallback):
    """Report one metrics event per logged step and stop training when the loss diverges.

    Needs `logging_steps=1` and `logging_nan_inf_filter=False`: otherwise the trainer
    averages steps together and replaces a NaN loss with the mean of earlier losses.
    `tokens_per_second` counts non-pad tokens (TRL's `num_tokens`) over wall-clock time.
    """

    def __init__(self, reporter: ProgressReporter, phase: str) -> None:
        self.reporter = reporter
        self.phase = phase
        self.percent = 0.0
        self.tokens_trained = 0
        self.last_metrics: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.diverged: TrainingDiverged | None = None
        self._last_time = time.monotonic()
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._last_time = time.monotonic()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        logs = logs or {}
        if "train_runtime" in logs:
            self.summary = dict(logs)
            return
        if "loss" not in logs:
            return

        self._check_divergence(state.global_step, logs, control)
        self.tokens_trained = int(logs.get("num_tokens", self.tokens_trained))
        now = time.monotonic()
        elapsed_s = max(now - self._last_time, 1e-9)
        tokens_per_second = (self.tokens_trained - self._last_tokens) / elapsed_s
        self._last_time, self._last_tokens = now, self.tokens_trained

        total_steps = max(state.max_steps, 1)
        self.percent = max(self.percent, min(100.0, 100.0 * state.global_step / total_steps))
        event = {
            "type": "metrics",
            "phase": self.phase,
            "step": state.global_step,
            "total_steps": state.max_steps,
            "percent": round(self.percent, 2),
            "tokens_per_second": round(tokens_per_second, 1),
        }
        for key in LOGGED_METRICS:
            if key in logs:
                event[key] = _finite_or_none(logs[key])
        self.last_metrics = {key: value for key, value in event.items() if key != "type"}
        self.reporter.emit(event)

    def _check_divergence(self, step: int, logs: dict[str, float], control: TrainerControl):
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(float(value)):
                self.diverged = TrainingDiverged(self.phase, step, float(value))
                control.should_training_stop = True
                return
