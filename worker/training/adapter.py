"""The published adapter: SFT and DPO LoRA adapters combined into one for the base model."""

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from worker.training.job import TrainingJob


def combine_adapters(model_dir: Path, sft_dir: Path, dpo_dir: Path) -> PeftModel:
    """Return the base model with one adapter equal to the SFT adapter followed by DPO's.

    DPO trained on the base weights with the SFT adapter merged in, so the sum of both
    low-rank updates is exact. `cat` stacks them into one adapter of rank
    `sft_lora_r + dpo_lora_r` with each adapter's scaling folded into its A matrix. The
    result is named `default` because peft saves any other adapter name into a subfolder.
    """
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, sft_dir, adapter_name="sft")
    model.load_adapter(dpo_dir, adapter_name="dpo")
    model.add_weighted_adapter(
        ["sft", "dpo"], [1.0, 1.0], adapter_name="default", combination_type="cat"
    )
    model.set_adapter("default")
    model.delete_adapter("sft")
    model.delete_adapter("dpo")
    return model


def save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    job: TrainingJob,
    data_summary: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write the adapter, tokenizer, metrics and model card to `job.adapter_dir`."""
    out = job.adapter_dir
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = job.base_model
    # The embeddings are not adapted; "auto" would look the base model up on the hub.
    model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(model_card(job, data_summary, metrics))
    return out


def write_training_log(adapter_dir: Path, events: list[dict[str, Any]]) -> None:
    """Write every progress event of the run to `training_log.jsonl`, one per line."""
    with (adapter_dir / "training_log.jsonl").open("w", encoding="utf-8") as stream:
        for event in events:
            stream.write(json.dumps(event) + "\n")


def model_card(job: TrainingJob, data_summary: dict[str, Any], metrics: dict[str, Any]) -> str:
    params = job.params
    rank = params.sft_lora_r + params.dpo_lora_r
    # `params.base_model` keeps its default when a job leaves it out, so the job's own base
    # model is shown instead.
    used = {**params.model_dump(mode="json"), "base_model": job.base_model}
    parameter_rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in used.items())
    metric_rows = "\n".join(
        f"| {phase} | `{name}` | {value} |"
        for phase, values in metrics.items()
        for name, value in values.items()
    )
    data_rows = "\n".join(f"- {name}: {value}" for name, value in data_summary.items())
    return f"""---
base_model: {job.base_model}
library_name: peft
tags: [lora, sft, dpo, trl]
---

# {job.run_name}

A LoRA adapter of rank {rank} for `{job.base_model}`, trained with TRL: supervised
fine-tuning (SFT) with a LoRA adapter of rank {params.sft_lora_r}, then direct preference
optimization (DPO) with a second LoRA adapter of rank {params.dpo_lora_r} on the SFT model.
The two adapters are concatenated into this one (peft `add_weighted_adapter`,
`combination_type="cat"`), so it applies directly to the original base model.

## Data

{data_rows}

## Parameters

| parameter | value |
|---|---|
{parameter_rows}
| `seed` | `{job.seed}` |

## Final metrics

| phase | metric | value |
|---|---|---|
{metric_rows}

## Usage

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{job.base_model}")
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")
```
"""
