"""One training run, in the order it happens: tokenizer, data, SFT, DPO, the published adapter."""

import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from transformers import PreTrainedTokenizerBase, PrinterCallback, Trainer, TrainerCallback
from trl import DPOConfig, SFTConfig

from app.statuses import RunStatus
from worker.training import data as training_data
from worker.training.adapter import combine_adapters, save_adapter, write_training_log
from worker.training.data import TrainingData
from worker.training.errors import DataError
from worker.training.fast_dpo import DPOSpeedups, FastDPOTrainer
from worker.training.fast_sft import FastSFTTrainer
from worker.training.job import PairsData, TrainingJob
from worker.training.model import bf16_supported, load_model, load_tokenizer
from worker.training.progress import ProgressCallback, ProgressReporter

logger = logging.getLogger(__name__)


def run_job(job: TrainingJob, reporter: ProgressReporter) -> None:
    """Train SFT then DPO and publish one adapter, raising a `JobError` or OOM on failure."""
    params = job.params
    state = PartialState()
    work_dir = job.output_dir / "work"

    tokenizer = load_tokenizer(job.model_dir, job.base_model, reporter)

    data = load_training_data(job, tokenizer, reporter)

    reporter.status(RunStatus.LAUNCHING_SFT)
    model = load_model(job.model_dir, job.base_model)
    sft_progress = ProgressCallback(reporter, "sft")
    sft_trainer = build_sft_trainer(
        job, model, data.sft_rows, tokenizer, work_dir / "sft", [sft_progress]
    )

    reporter.status(RunStatus.TRAINING_SFT)
    train(sft_trainer, sft_progress, reporter)
    if state.is_main_process:
        sft_trainer.model.save_pretrained(job.sft_adapter_dir)

    reporter.status(RunStatus.PREPARING_DPO)
    model = sft_trainer.model.merge_and_unload()
    del sft_trainer

    reporter.status(RunStatus.LAUNCHING_DPO)
    use_bf16 = params.dpo_bf16 and bf16_supported(job.use_cpu)
    if params.dpo_bf16 and not use_bf16:
        reporter.message(
            "dpo_bf16 is set but this device has no bf16 support, so DPO trains in fp32."
        )
    dpo_progress = ProgressCallback(reporter, "dpo")
    dpo_trainer = build_dpo_trainer(
        job, model, data.dpo_rows, tokenizer, work_dir / "dpo", [dpo_progress], use_bf16
    )

    reporter.status(RunStatus.TRAINING_DPO)
    train(dpo_trainer, dpo_progress, reporter)
    if state.is_main_process:
        dpo_trainer.model.save_pretrained(job.dpo_adapter_dir)
    del dpo_trainer, model

    reporter.status(RunStatus.SAVING_MODEL)
    metrics = {"sft": phase_metrics(sft_progress), "dpo": phase_metrics(dpo_progress)}
    tokens_trained = sft_progress.tokens_trained + dpo_progress.tokens_trained
    if state.is_main_process:
        adapter = combine_adapters(job.model_dir, job.sft_adapter_dir, job.dpo_adapter_dir)
        data_summary = {
            "source": data.source,
            "SFT rows": len(data.sft_rows),
            "DPO pairs": len(data.dpo_rows),
        }
        save_adapter(adapter, tokenizer, job, data_summary, metrics)
        reporter.done(tokens_trained, metrics)
        write_training_log(job.adapter_dir, reporter.events)
        shutil.rmtree(work_dir, ignore_errors=True)
        logger.info("saved the adapter to %s", job.adapter_dir)
    state.wait_for_everyone()


def load_training_data(
    job: TrainingJob, tokenizer: PreTrainedTokenizerBase, reporter: ProgressReporter
) -> TrainingData:
    """Load and validate both phases' rows, then fit long prompts into `dpo_max_length`."""
    params = job.params
    if isinstance(job.data, PairsData):
        pairs = training_data.load_pairs_file(job.data.path)
        sft_rows = training_data.sample_sft_rows(pairs, params.sft_ratio, job.seed)
        source = (
            f"{job.data.path.name}: {len(pairs)} preference pairs,"
            f" SFT on {len(sft_rows)} of them"
        )
    else:
        sft_rows = training_data.load_hub_conversations(job.data.sft_dataset)
        pairs = training_data.load_hub_pairs(job.data.dpo_dataset)
        source = (
            f"SFT data set {job.data.sft_dataset} ({len(sft_rows)} rows),"
            f" DPO data set {job.data.dpo_dataset} ({len(pairs)} pairs)"
        )

    max_length = params.dpo_max_length
    sft_rows = fit_and_report(tokenizer, sft_rows, ("completion",), max_length, "SFT", reporter)
    pairs = fit_and_report(tokenizer, pairs, ("chosen", "rejected"), max_length, "DPO", reporter)
    logger.info("training data: %s", source)
    return TrainingData(source=source, sft_rows=sft_rows, dpo_rows=pairs)


def fit_and_report(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    completion_keys: tuple[str, ...],
    max_length: int,
    phase: str,
    reporter: ProgressReporter,
) -> list[dict]:
    fitted, truncated, dropped = training_data.fit_rows(
        tokenizer, rows, completion_keys, max_length
    )
    if truncated:
        reporter.message(
            f"{truncated} of {len(rows)} {phase} prompts left no room for the response within"
            f" dpo_max_length={max_length} tokens; their oldest messages and tokens were removed.",
            level="warning",
        )
    if dropped:
        reporter.message(
            f"{dropped} of {len(rows)} {phase} rows were skipped: with the chat template, even an"
            f" empty prompt leaves no room for the response within dpo_max_length={max_length}.",
            level="warning",
        )
    if not fitted:
        raise DataError(
            f"no {phase} row fits in dpo_max_length={max_length} tokens; raise dpo_max_length"
        )
    return fitted


def build_sft_trainer(
    job: TrainingJob,
    model: torch.nn.Module,
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> FastSFTTrainer:
    """Return an SFT trainer on a fresh LoRA adapter, on completion tokens only."""
    params = job.params
    return FastSFTTrainer(
        model=model,
        args=sft_config(job, output_dir),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(params.sft_lora_r, params.sft_lora_alpha),
        callbacks=callbacks,
    )


def build_dpo_trainer(
    job: TrainingJob,
    model: torch.nn.Module,
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    use_bf16: bool,
    speedups: DPOSpeedups = DPOSpeedups(),
) -> FastDPOTrainer:
    """Return a DPO trainer on a fresh LoRA adapter; disabling it gives the reference model."""
    params = job.params
    return FastDPOTrainer(
        model=model,
        ref_model=None,
        args=dpo_config(job, output_dir, use_bf16),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(params.dpo_lora_r, params.dpo_lora_alpha),
        callbacks=callbacks,
        speedups=speedups,
    )


def lora_config(rank: int, alpha: int) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def common_args(job: TrainingJob, output_dir: Path) -> dict[str, Any]:
    """Return the trainer arguments both phases share.

    Every step is logged, with NaN and infinite losses passed through unfiltered, because
    progress events and divergence detection read the trainer's logs.
    """
    return {
        "output_dir": str(output_dir),
        "seed": job.seed,
        "use_cpu": job.use_cpu,
        "logging_steps": 1,
        "logging_nan_inf_filter": False,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }


def sft_config(job: TrainingJob, output_dir: Path) -> SFTConfig:
    """SFT on prompt-completion rows, so the loss covers completion (assistant) tokens only.

    Packing uses TRL's default "bfd" strategy, which is padding-free: the collator sends
    position ids that restart at each sequence and no attention mask. transformers 5.25
    turns those position ids into a block-diagonal mask for SDPA, so packed sequences do not
    attend to each other (checked in the tests on the CPU).
    """
    params = job.params
    return SFTConfig(
        **common_args(job, output_dir),
        num_train_epochs=params.sft_num_train_epochs,
        learning_rate=params.sft_learning_rate,
        per_device_train_batch_size=params.sft_per_device_train_batch_size,
        gradient_accumulation_steps=params.sft_gradient_accumulation_steps,
        activation_checkpointing=params.sft_gradient_checkpointing,
        packing=params.sft_packing,
        max_length=params.dpo_max_length,
        completion_only_loss=True,
        bf16=bf16_supported(job.use_cpu),
    )


def dpo_config(job: TrainingJob, output_dir: Path, use_bf16: bool) -> DPOConfig:
    """DPO with batches of pairs of similar length, in a seeded order (`LengthBucketSampler`)."""
    params = job.params
    return DPOConfig(
        **common_args(job, output_dir),
        num_train_epochs=params.dpo_num_train_epochs,
        learning_rate=params.dpo_learning_rate,
        per_device_train_batch_size=params.dpo_per_device_train_batch_size,
        gradient_accumulation_steps=params.dpo_gradient_accumulation_steps,
        activation_checkpointing=params.dpo_gradient_checkpointing,
        max_length=params.dpo_max_length,
        beta=params.dpo_beta,
        bf16=use_bf16,
        train_sampling_strategy="group_by_length",
    )


def train(trainer: Trainer, progress: ProgressCallback, reporter: ProgressReporter) -> None:
    """Run one phase, raising TrainingDiverged when its loss became NaN or infinite.

    Reports the phase's duration, throughput in non-pad tokens per second and peak memory.
    """
    # Progress goes to the progress file and the log, not to stdout.
    trainer.remove_callback(PrinterCallback)
    started = time.monotonic()
    trainer.train()
    if progress.diverged is not None:
        raise progress.diverged

    elapsed_s = time.monotonic() - started
    steps = max(trainer.state.global_step, 1)
    reporter.message(
        f"{progress.phase.upper()}: {trainer.state.global_step} steps in {elapsed_s:.1f} s"
        f" ({elapsed_s / steps:.2f} s/step), {progress.tokens_trained} tokens,"
        f" {progress.tokens_trained / max(elapsed_s, 1e-9):.0f} tokens/s,"
        f" peak memory of the main process: {peak_memory()}"
    )


def peak_memory() -> str:
    """Describe this process's peak memory: maximum RSS, and GPU memory when CUDA is used."""
    # Linux reports ru_maxrss in KiB.
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    text = f"RSS {rss_gib:.2f} GiB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", GPU {torch.cuda.max_memory_allocated() / 1024**3:.2f} GiB"
    return text


def phase_metrics(progress: ProgressCallback) -> dict[str, Any]:
    """Return a phase's last logged step metrics and the trainer's end-of-training summary."""
    metrics = {
        key: value
        for key, value in progress.last_metrics.items()
        if key not in ("phase", "percent", "total_steps")
    }
    metrics.update({key: value for key, value in progress.summary.items() if value is not None})
    metrics["tokens_trained"] = progress.tokens_trained
    return metrics
