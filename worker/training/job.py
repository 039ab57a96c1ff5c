"""The job file that the worker writes and the training child process reads."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.params import RunParams


@dataclass(frozen=True)
class PairsData:
    """A JSONL file of canonical TRL conversational pairs, one pair per line."""

    path: Path
    kind: Literal["pairs"] = "pairs"


@dataclass(frozen=True)
class HubData:
    """Two Hugging Face data sets: conversations for SFT and preference pairs for DPO.

    Each name is anything `datasets.load_dataset` accepts: a hub id (read from the local cache
    when the host is offline) or a local path. SFT uses the whole SFT data set, so
    `sft_ratio` applies to pairs files only.
    """

    sft_dataset: str
    dpo_dataset: str
    kind: Literal["hf"] = "hf"


DataSource = PairsData | HubData

REQUIRED_KEYS = (
    "run_name",
    "base_model",
    "model_dir",
    "data",
    "params",
    "output_dir",
    "progress_path",
)


@dataclass(frozen=True)
class TrainingJob:
    """Everything one training run needs, serialised as the JSON file given to the child.

    `model_dir` is the local Hugging Face directory of `base_model`, as returned by
    `worker.model_store.resolve_model`. The published adapter is written to
    `output_dir/adapter`, and the adapters of the two phases it combines to
    `output_dir/sft_adapter` and `output_dir/dpo_adapter`. Progress events are appended to
    `progress_path`, one JSON object per line.
    """

    run_name: str
    base_model: str
    model_dir: Path
    data: DataSource
    params: RunParams
    output_dir: Path
    progress_path: Path
    seed: int = 42
    use_cpu: bool = False
    log_path: Path | None = None

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / "adapter"

    @property
    def sft_adapter_dir(self) -> Path:
        return self.output_dir / "sft_adapter"

    @property
    def dpo_adapter_dir(self) -> Path:
        return self.output_dir / "dpo_adapter"

    @classmethod
    def from_json(cls, text: str) -> "TrainingJob":
        """Parse a job file, raising ValueError that names the missing or invalid keys."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("the job must be a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in raw]
        if missing:
            raise ValueError(f"the job is missing {', '.join(missing)}")
        log_path = raw.get("log_path")
        return cls(
            run_name=str(raw["run_name"]),
            base_model=str(raw["base_model"]),
            model_dir=Path(raw["model_dir"]),
            data=_parse_data(raw["data"]),
            params=RunParams.model_validate(raw["params"]),
            output_dir=Path(raw["output_dir"]),
            progress_path=Path(raw["progress_path"]),
            seed=int(raw.get("seed", 42)),
            use_cpu=bool(raw.get("use_cpu", False)),
            log_path=Path(log_path) if log_path else None,
        )

    def to_json(self) -> str:
        data: dict[str, str]
        if isinstance(self.data, PairsData):
            data = {"kind": "pairs", "path": str(self.data.path)}
        else:
            data = {
                "kind": "hf",
                "sft_dataset": self.data.sft_dataset,
                "dpo_dataset": self.data.dpo_dataset,
            }
        body = {
            "run_name": self.run_name,
            "base_model": self.base_model,
            "model_dir": str(self.model_dir),
            "data": data,
            "params": self.params.model_dump(mode="json"),
            "output_dir": str(self.output_dir),
            "progress_path": str(self.progress_path),
            "seed": self.seed,
            "use_cpu": self.use_cpu,
        }
        if self.log_path is not None:
            body["log_path"] = str(self.log_path)
        return json.dumps(body, indent=2)


def _parse_data(raw: Any) -> DataSource:
    if not isinstance(raw, dict):
        raise ValueError("data must be an object with a kind")
    kind = raw.get("kind")
    if kind == "pairs":
        return PairsData(path=Path(raw["path"]))
    if kind == "hf":
        return HubData(sft_dataset=str(raw["sft_dataset"]), dpo_dataset=str(raw["dpo_dataset"]))
    raise ValueError(f"data.kind is {kind!r}, expected 'pairs' or 'hf'")
