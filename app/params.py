"""The body of `run_dpo`: every training parameter with its default, type and range."""

import difflib
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import ApiError

LearningRate = Annotated[float, Field(gt=0, lt=1)]
Epochs = Annotated[float, Field(gt=0, le=100)]
Count = Annotated[int, Field(ge=1, le=4096)]
LoraRank = Annotated[int, Field(ge=1, le=1024)]


class RunParams(BaseModel):
    """Training parameters of a run, the same names and defaults as the hosted service.

    Added here: `sft_num_train_epochs` (the reference lists it, the official client does not
    send it), `sft_ratio` (sent by the official client) and `dpo_beta`.
    """

    model_config = ConfigDict(extra="forbid", strict=False)

    base_model: str = "Qwen/Qwen2-0.5B"
    gpus: Annotated[int, Field(ge=1)] = 2

    sft_learning_rate: LearningRate = 0.0002
    sft_num_train_epochs: Epochs = 3
    sft_ratio: Annotated[float, Field(gt=0, le=1)] = 0.05
    sft_packing: bool = True
    sft_per_device_train_batch_size: Count = 2
    sft_gradient_accumulation_steps: Count = 8
    sft_gradient_checkpointing: bool = True
    sft_lora_r: LoraRank = 32
    sft_lora_alpha: Annotated[int, Field(ge=1, le=4096)] = 16

    dpo_learning_rate: LearningRate = 0.000005
    dpo_num_train_epochs: Epochs = 1
    dpo_per_device_train_batch_size: Count = 8
    dpo_gradient_accumulation_steps: Count = 2
    dpo_gradient_checkpointing: bool = True
    dpo_lora_r: LoraRank = 16
    dpo_lora_alpha: Annotated[int, Field(ge=1, le=4096)] = 8
    dpo_bf16: bool = True
    dpo_max_length: Annotated[int, Field(ge=16, le=131072)] | None = 256
    dpo_beta: Annotated[float, Field(gt=0, le=10)] = 0.1

    @field_validator("dpo_max_length", mode="after")
    @classmethod
    def _default_max_length(cls, value: int | None) -> int:
        # The official client leaves the field out or sends null; both mean the default.
        return 256 if value is None else value

    @field_validator("*", mode="before")
    @classmethod
    def _reject_non_finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class RunRequest(BaseModel):
    """The body that `run_dpo` accepts: the data to train on and the parameters."""

    file_id: str | None = None
    hf_sft_dataset_name: str | None = None
    hf_dpo_dataset_name: str | None = None
    params: RunParams


DATA_FIELDS = ("file_id", "hf_sft_dataset_name", "hf_dpo_dataset_name")


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        known = [*RunParams.model_fields, *DATA_FIELDS]
        close = difflib.get_close_matches(location, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see the parameter reference"
        return f"unknown parameter {location!r}; {hint}"
    return f"{location}={value!r}: {error['msg']}"


def parse_run_request(body: Any) -> RunRequest:
    """Validate a `run_dpo` body or raise a 400 that names each bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid request: the body must be a JSON object of run parameters.")

    data = {key: body.get(key) for key in DATA_FIELDS}
    for key, value in data.items():
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ApiError(400, f"Invalid request: {key} must be a non-empty string.")

    has_file = data["file_id"] is not None
    has_hf = data["hf_sft_dataset_name"] is not None or data["hf_dpo_dataset_name"] is not None
    if has_file and has_hf:
        raise ApiError(
            400,
            "Invalid request: give either file_id or hf_sft_dataset_name and "
            "hf_dpo_dataset_name, not both.",
        )
    if not has_file and not (data["hf_sft_dataset_name"] and data["hf_dpo_dataset_name"]):
        raise ApiError(
            400,
            "Invalid request: file_id is missing. Upload a file with upload_file and pass its "
            "file_id, or pass both hf_sft_dataset_name and hf_dpo_dataset_name.",
        )

    params_body = {key: value for key, value in body.items() if key not in DATA_FIELDS}
    try:
        params = RunParams.model_validate(params_body)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ApiError(400, f"Invalid request: {problems}.") from None
    return RunRequest(**data, params=params)
