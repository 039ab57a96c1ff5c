"""The training child process end to end on a tiny model with the real SmolLM2 tokenizer.

One single-process run and one two-process run of the same job are shared by several tests.
Their data are 7 real pairs from `examples/data/instruction_preference.strings.jsonl` and
one pair with a prompt of about 4,000 words and one-word answers.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from app.params import RunParams
from app.statuses import RunStatus
from tests.tiny_model import build_tiny_model, tiny_model_dir  # noqa: F401 (fixture)
from worker.training import data as training_data
from worker.training.__main__ import main as training_main
from worker.training.errors import DataError, classify_failure
from worker.training.job import HubData, PairsData, TrainingJob
from worker.training.launch import training_command

REPO = Path(__file__).resolve().parent.parent
STRINGS_FILE = REPO / "examples" / "data" / "instruction_preference.strings.jsonl"

CHILD_STATUSES = [
    RunStatus.LAUNCHING_SFT.value,
    RunStatus.TRAINING_SFT.value,
    RunStatus.PREPARING_DPO.value,
    RunStatus.LAUNCHING_DPO.value,
    RunStatus.TRAINING_DPO.value,
    RunStatus.SAVING_MODEL.value,
]

# Global batch 2 in both phases: per-device batch 2 on one process, 1 on each of two.
TEST_PARAMS = {
    "sft_ratio": 0.5,
    "sft_num_train_epochs": 1,
    "sft_learning_rate": 1e-3,
    "sft_packing": False,
    "sft_per_device_train_batch_size": 2,
    "sft_gradient_accumulation_steps": 1,
    "sft_gradient_checkpointing": False,
    "sft_lora_r": 8,
    "sft_lora_alpha": 16,
    "dpo_learning_rate": 1e-3,
    "dpo_num_train_epochs": 1,
    "dpo_per_device_train_batch_size": 2,
    "dpo_gradient_accumulation_steps": 1,
    "dpo_gradient_checkpointing": True,
    "dpo_lora_r": 4,
    "dpo_lora_alpha": 8,
    "dpo_max_length": 128,
}
PAIR_COUNT = 8
LONG_PROMPT_WORDS = 4000
# fp32 on the CPU: float rounding differs with the order of additions (merging, gloo
# all-reduce), far below these bounds.
LOGITS_TOLERANCE = 1e-4
ADAPTER_TOLERANCE = 1e-5


def real_pairs(count: int) -> list[dict]:
    """Return `count` canonical pairs from the real data, skipping pairs with chosen == rejected."""
    pairs = []
    with STRINGS_FILE.open(encoding="utf-8") as stream:
        for line in stream:
            row = json.loads(line)
            if row["chosen"] == row["rejected"]:
                continue
            pairs.append(
                {
                    "prompt": [{"role": "user", "content": row["prompt"]}],
                    "chosen": [{"role": "assistant", "content": row["chosen"]}],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}],
                }
            )
            if len(pairs) == count:
                break
    return pairs


def long_prompt_pair() -> dict:
    words = " ".join(f"word{index % 97}" for index in range(LONG_PROMPT_WORDS))
    return {
        "prompt": [{"role": "user", "content": f"{words} Answer yes or no: is this long?"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }


def write_job(directory: Path, model_dir: Path, pairs: list[dict], **params) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pairs_path = directory / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    job = TrainingJob(
        run_name=directory.name,
        base_model="tiny-llama",
        model_dir=model_dir,
        data=PairsData(path=pairs_path),
        params=RunParams.model_validate({**TEST_PARAMS, **params}),
        output_dir=directory / "output",
        progress_path=directory / "progress.jsonl",
        use_cpu=True,
        log_path=directory / "training.log",
    )
    job_path = directory / "job.json"
    job_path.write_text(job.to_json())
    return job_path


def read_events(job_path: Path) -> list[dict]:
    progress_path = TrainingJob.from_json(job_path.read_text()).progress_path
    return [json.loads(line) for line in progress_path.read_text().splitlines()]


@dataclass
class FinishedRun:
    job: TrainingJob
    events: list[dict]
    returncode: int
    output: str


def run_child(job_path: Path, num_processes: int) -> FinishedRun:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        training_command(job_path, num_processes),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return FinishedRun(
        job=TrainingJob.from_json(job_path.read_text()),
        events=read_events(job_path),
        returncode=completed.returncode,
        output=completed.stdout + completed.stderr,
    )


@pytest.fixture(scope="module")
def run_pairs() -> list[dict]:
    return real_pairs(PAIR_COUNT - 1) + [long_prompt_pair()]


@pytest.fixture(scope="module")
def single_run(
    tmp_path_factory, tiny_model_dir: Path, run_pairs: list[dict]  # noqa: F811
) -> FinishedRun:
    job_path = write_job(tmp_path_factory.mktemp("single"), tiny_model_dir, run_pairs)
    return run_child(job_path, num_processes=1)


@pytest.fixture(scope="module")
def two_process_run(
    tmp_path_factory, tiny_model_dir: Path, run_pairs: list[dict]  # noqa: F811
) -> FinishedRun:
    job_path = write_job(
        tmp_path_factory.mktemp("two-processes"),
        tiny_model_dir,
        run_pairs,
        sft_per_device_train_batch_size=1,
        dpo_per_device_train_batch_size=1,
    )
    return run_child(job_path, num_processes=2)


def test_run_reports_statuses_in_order(single_run: FinishedRun):
    assert single_run.returncode == 0, single_run.output
    statuses = [event["status"] for event in single_run.events if event["type"] == "status"]
    assert statuses == CHILD_STATUSES


def test_run_percent_never_decreases(single_run: FinishedRun):
    for phase in ("sft", "dpo"):
        metrics = [e for e in single_run.events if e["type"] == "metrics" and e["phase"] == phase]
        assert metrics, f"no metrics events for {phase}"
        percents = [event["percent"] for event in metrics]
        assert percents == sorted(percents)
        assert percents[-1] == 100.0
        assert all(math.isfinite(event["loss"]) for event in metrics)
        assert all(event["tokens_per_second"] > 0 for event in metrics)
    dpo_metrics = [e for e in single_run.events if e["type"] == "metrics" and e["phase"] == "dpo"]
    assert "rewards/accuracies" in dpo_metrics[-1]
    assert "rewards/margins" in dpo_metrics[-1]


def test_run_ends_with_done(single_run: FinishedRun):
    done = single_run.events[-1]
    assert done["type"] == "done"
    assert done["tokens_trained"] > 0
    assert done["tokens_trained"] == (
        done["metrics"]["sft"]["tokens_trained"] + done["metrics"]["dpo"]["tokens_trained"]
    )
    assert set(done["metrics"]) == {"sft", "dpo"}
    assert not [event for event in single_run.events if event["type"] == "error"]


def test_run_publishes_adapter_dir(single_run: FinishedRun):
    adapter_dir = single_run.job.adapter_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.json",
        "training_log.jsonl",
        "README.md",
    ):
        assert (adapter_dir / name).is_file(), name

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == TEST_PARAMS["sft_lora_r"] + TEST_PARAMS["dpo_lora_r"]
    assert config["base_model_name_or_path"] == "tiny-llama"

    log_lines = (adapter_dir / "training_log.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in log_lines]
    assert log == single_run.events

    card = (adapter_dir / "README.md").read_text()
    assert "tiny-llama" in card
    assert f"{PAIR_COUNT} preference pairs" in card
    assert "PeftModel.from_pretrained(base," in card
    for name in TEST_PARAMS:
        assert f"`{name}`" in card, name


def test_run_writes_log_with_run_name(single_run: FinishedRun):
    lines = single_run.job.log_path.read_text().splitlines()
    assert lines
    assert all(f"run={single_run.job.run_name}" in line for line in lines if " INFO " in line)


def test_long_prompt_truncated_and_counted(single_run: FinishedRun):
    warnings = [
        event["text"]
        for event in single_run.events
        if event["type"] == "message" and event["level"] == "warning"
    ]
    assert any(text.startswith(f"1 of {PAIR_COUNT} DPO prompts") for text in warnings), warnings


def test_fit_prompt_keeps_recent_tokens(tiny_model_dir: Path):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = long_prompt_pair()
    system = {"role": "system", "content": "You answer briefly."}
    old_turns = [
        {"role": "user", "content": "An older question."},
        {"role": "assistant", "content": "An older answer."},
    ]
    prompt = [system, *old_turns, *pair["prompt"]]
    max_length = 128

    completions = [pair["chosen"], pair["rejected"]]
    fitted = training_data.fit_prompt(tokenizer, prompt, completions, max_length)

    assert fitted is not None
    assert fitted[-1]["content"].endswith("Answer yes or no: is this long?")
    assert [message["role"] for message in fitted] == ["user"]
    full = training_data.count_tokens(tokenizer, fitted + pair["chosen"])
    assert full <= max_length


def test_fit_prompt_leaves_short_prompt(tiny_model_dir: Path):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = real_pairs(1)[0]
    fitted = training_data.fit_prompt(tokenizer, pair["prompt"], [pair["chosen"]], 128)
    assert fitted is pair["prompt"]


def test_adapter_reproduces_sft_plus_dpo(
    single_run: FinishedRun, tiny_model_dir: Path  # noqa: F811
):
    assert single_run.returncode == 0, single_run.output
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pair = real_pairs(1)[0]
    text = tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False)
    inputs = tokenizer(text, return_tensors="pt")

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    with torch.no_grad():
        base_logits = load_base()(**inputs).logits
        sft_model = PeftModel.from_pretrained(load_base(), single_run.job.sft_adapter_dir)
        merged_sft = sft_model.merge_and_unload()
        expected = PeftModel.from_pretrained(merged_sft, single_run.job.dpo_adapter_dir).eval()
        expected_logits = expected(**inputs).logits
        published = PeftModel.from_pretrained(load_base(), single_run.job.adapter_dir).eval()
        published_logits = published(**inputs).logits

    assert (published_logits - base_logits).abs().max() > 100 * LOGITS_TOLERANCE
    assert (published_logits - expected_logits).abs().max() < LOGITS_TOLERANCE


def test_two_processes_train_to_done(two_process_run: FinishedRun):
    assert two_process_run.returncode == 0, two_process_run.output
    assert two_process_run.events[-1]["type"] == "done"
    statuses = [event["status"] for event in two_process_run.events if event["type"] == "status"]
    assert statuses == CHILD_STATUSES


def test_two_processes_report_once(two_process_run: FinishedRun):
    steps = [
        (event["phase"], event["step"])
        for event in two_process_run.events
        if event["type"] == "metrics"
    ]
    assert len(steps) == len(set(steps))
    messages = [event["text"] for event in two_process_run.events if event["type"] == "message"]
    assert len(messages) == len(set(messages))


def test_two_processes_match_one(single_run: FinishedRun, two_process_run: FinishedRun):
    assert two_process_run.returncode == 0, two_process_run.output
    single_steps = [e["step"] for e in single_run.events if e["type"] == "metrics"]
    two_steps = [e["step"] for e in two_process_run.events if e["type"] == "metrics"]
    assert two_steps == single_steps

    single = load_file(single_run.job.adapter_dir / "adapter_model.safetensors")
    two = load_file(two_process_run.job.adapter_dir / "adapter_model.safetensors")
    assert single.keys() == two.keys()
    largest_difference = max((single[key] - two[key]).abs().max().item() for key in single)
    assert largest_difference < ADAPTER_TOLERANCE


def test_nan_loss_reports_divergence(tmp_path: Path, tiny_model_dir: Path):  # noqa: F811
    broken_dir = tmp_path / "broken-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(broken_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken_dir)
    job_path = write_job(tmp_path / "run", broken_dir, real_pairs(4))

    returncode = training_main(["worker.training", str(job_path)])

    events = read_events(job_path)
    assert returncode == 1
    error = events[-1]
    assert error["type"] == "error"
    assert error["kind"] == "diverged"
    assert "training diverged at step 1 of SFT" in error["reason"]
    assert "Lower the learning rate" in error["reason"]
    sft_metrics = [event for event in events if event["type"] == "metrics"]
    assert [event["step"] for event in sft_metrics] == [1]
    assert RunStatus.PREPARING_DPO.value not in [event.get("status") for event in events]


def test_missing_model_dir_reports_model_error(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    job_path = write_job(tmp_path / "run", missing, real_pairs(2))

    returncode = training_main(["worker.training", str(job_path)])

    events = read_events(job_path)
    assert returncode == 1
    assert [event["type"] for event in events] == ["error"]
    assert events[0]["kind"] == "model"
    assert "tiny-llama" in events[0]["reason"]
    assert str(missing) in events[0]["reason"]


def test_invalid_pair_reports_data_error(tmp_path: Path, tiny_model_dir: Path):  # noqa: F811
    pairs = real_pairs(2)
    pairs[1]["chosen"] = [{"role": "user", "content": "not an answer"}]
    job_path = write_job(tmp_path / "run", tiny_model_dir, pairs)

    returncode = training_main(["worker.training", str(job_path)])

    error = read_events(job_path)[-1]
    assert returncode == 1
    assert error["kind"] == "data"
    assert "pairs.jsonl line 2" in error["reason"]


def test_packed_sequences_do_not_attend_across(tiny_model_dir: Path):  # noqa: F811
    """SFT packing on the CPU: SDPA with position ids and no attention mask, as TRL feeds it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    first = tokenizer("The capital of France is Paris.")["input_ids"]
    second = tokenizer("Two plus two equals four, said the tiny model.")["input_ids"]
    collator = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id, padding_free=True
    )
    packed = collator([{"input_ids": first + second, "seq_lengths": [len(first), len(second)]}])
    assert "attention_mask" not in packed

    with torch.no_grad():
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits[0]
        first_logits = model(input_ids=torch.tensor([first]), use_cache=False).logits[0]
        second_logits = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]

    assert (packed_logits[: len(first)] - first_logits).abs().max() < LOGITS_TOLERANCE
    assert (packed_logits[len(first) :] - second_logits).abs().max() < LOGITS_TOLERANCE


def test_job_json_round_trip(tmp_path: Path):
    job = TrainingJob(
        run_name="run-1",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_dir=tmp_path / "model",
        data=HubData(sft_dataset="org/sft", dpo_dataset="org/dpo"),
        params=RunParams(dpo_beta=0.2),
        output_dir=tmp_path / "out",
        progress_path=tmp_path / "progress.jsonl",
        seed=7,
        use_cpu=True,
    )
    assert TrainingJob.from_json(job.to_json()) == job


def test_job_missing_keys_rejected():
    with pytest.raises(ValueError, match="missing model_dir, progress_path"):
        TrainingJob.from_json(
            json.dumps(
                {
                    "run_name": "r",
                    "base_model": "m",
                    "data": {"kind": "pairs", "path": "/p"},
                    "params": {},
                    "output_dir": "/o",
                }
            )
        )


def test_hub_datasets_load_from_local_dirs(tmp_path: Path):
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    shutil.copy(STRINGS_FILE, dpo_dir / "train.jsonl")
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
    ]
    (sft_dir / "train.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")

    pairs = training_data.load_hub_pairs(str(dpo_dir))
    sft_rows = training_data.load_hub_conversations(str(sft_dir))

    assert len(pairs) == sum(1 for line in STRINGS_FILE.open() if line.strip())
    assert pairs[0]["prompt"][0]["role"] == "user"
    assert [row["completion"][0]["content"] for row in sft_rows] == ["Hello!", "Blue."]
    assert len(sft_rows[1]["prompt"]) == 3


def test_hub_dataset_missing_names_it(tmp_path: Path):
    missing = str(tmp_path / "no-such-dataset")
    with pytest.raises(DataError, match="no-such-dataset"):
        training_data.load_hub_pairs(missing)


def test_hub_datasets_train_to_done(tmp_path: Path, tiny_model_dir: Path):  # noqa: F811
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    lines = STRINGS_FILE.read_text().splitlines()[:4]
    (dpo_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    rows = [
        {"prompt": "Say hi.", "completion": "Hi!"},
        {"prompt": "Say bye.", "completion": "Bye!"},
    ]
    (sft_dir / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    job_path = write_job(tmp_path / "run", tiny_model_dir, [])
    job = TrainingJob.from_json(job_path.read_text())
    job_path.write_text(
        dataclasses.replace(
            job, data=HubData(sft_dataset=str(sft_dir), dpo_dataset=str(dpo_dir))
        ).to_json()
    )

    returncode = training_main(["worker.training", str(job_path)])

    events = read_events(job_path)
    assert returncode == 0, events[-1]
    assert events[-1]["type"] == "done"
    card = (job.adapter_dir / "README.md").read_text()
    assert f"SFT data set {sft_dir} (2 rows)" in card
    assert f"DPO data set {dpo_dir} (4 pairs)" in card


@pytest.mark.parametrize(
    ("error", "on_gpu", "where"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), True, "GPU"),
        (MemoryError(), False, "host"),
    ],
)
def test_out_of_memory_reason(error: BaseException, on_gpu: bool, where: str):
    kind, reason = classify_failure(error, on_gpu=on_gpu)
    assert kind == "oom"
    assert reason.startswith(f"Out of memory: the batch did not fit in {where} memory")
    assert "lower the batch size or dpo_max_length" in reason.lower()
    assert "gradient checkpointing" in reason
