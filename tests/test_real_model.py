"""A few DPO steps on the real SmolLM2-135M-Instruct and real English preference pairs.

The DPO adapter must raise the mean DPO reward margin on held-out pairs: against the SFT
model (the reference DPO trains against), the trained policy gives chosen answers more
log-probability and rejected answers less. Takes a few minutes on two CPU cores.
"""

import json
import random
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.params import RunParams
from app.settings import default_model_catalog
from app.validation import parse_pair
from tests.conftest import DATA_DIR
from worker.evaluation import dpo_reward, score_pairs
from worker.model_store import resolve_model
from worker.training.job import PairsData, TrainingJob

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TRAIN_PAIRS = 32
HELD_OUT_PAIRS = 48
BETA = 0.1


def split_pairs(seed: int = 3) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (DATA_DIR / "instruction_preference.strings.jsonl").open()]
    rows = [row for row in rows if row["chosen"] != row["rejected"]]
    random.Random(seed).shuffle(rows)
    pairs = [parse_pair(row).to_trl() for row in rows]
    return pairs[:TRAIN_PAIRS], pairs[TRAIN_PAIRS : TRAIN_PAIRS + HELD_OUT_PAIRS]


@pytest.mark.slow
def test_dpo_raises_reward_margin(tmp_path):
    model_dir = resolve_model(MODEL, default_model_catalog()[MODEL], tmp_path / "models")
    train, held_out = split_pairs()
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(pair) + "\n" for pair in train))

    # 4 SFT pairs for one epoch, then 8 DPO steps of 4 pairs.
    params = RunParams(
        base_model=MODEL,
        gpus=1,
        sft_ratio=0.125,
        sft_num_train_epochs=1,
        sft_per_device_train_batch_size=2,
        sft_gradient_accumulation_steps=1,
        sft_gradient_checkpointing=False,
        dpo_learning_rate=1e-4,
        dpo_per_device_train_batch_size=4,
        dpo_gradient_accumulation_steps=1,
        dpo_gradient_checkpointing=False,
        dpo_bf16=False,
        dpo_max_length=256,
        dpo_beta=BETA,
    )
    job = TrainingJob(
        run_name="real_model_test",
        base_model=MODEL,
        model_dir=model_dir,
        data=PairsData(path=pairs_path),
        params=params,
        output_dir=tmp_path / "output",
        progress_path=tmp_path / "progress.jsonl",
        use_cpu=True,
    )
    job_path = tmp_path / "job.json"
    job_path.write_text(job.to_json())
    result = subprocess.run(
        [sys.executable, "-m", "worker.training", str(job_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    events = [json.loads(line) for line in job.progress_path.read_text().splitlines()]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert events[-1]["type"] == "done"

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(job.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, job.sft_adapter_dir).merge_and_unload()
    reference_scores = score_pairs(reference, tokenizer, held_out, max_length=256)

    policy = PeftModel.from_pretrained(reference, job.dpo_adapter_dir)
    policy_scores = score_pairs(policy, tokenizer, held_out, max_length=256)

    reward = dpo_reward(policy_scores, reference_scores, BETA)
    print(f"held-out DPO reward margin {reward.mean_margin:+.5f}, accuracy {reward.accuracy:.1%}")
    assert reward.mean_margin > 0
    assert reward.accuracy > 0.5
    assert policy_scores.mean_margin > reference_scores.mean_margin


def test_split_keeps_held_out_apart():
    train, held_out = split_pairs()
    assert len(train) == TRAIN_PAIRS
    assert len(held_out) == HELD_OUT_PAIRS
    train_prompts = {json.dumps(pair["prompt"]) + json.dumps(pair["chosen"]) for pair in train}
    assert not any(json.dumps(pair["prompt"]) + json.dumps(pair["chosen"]) in train_prompts for pair in held_out)
