"""Benchmark the worker's SFT and DPO phases against plain TRL on the same model and data.

Each phase of each side runs in its own subprocess, which the parent samples for RSS with
psutil. "ours" builds its trainers with the functions the training child uses
(`worker.training.run.build_sft_trainer` and `build_dpo_trainer`) and runs with the malloc
settings of `worker.training.environment`. "plain" is a TRL script with TRL's defaults: an
SFTTrainer or DPOTrainer given a LoRA config, the reference model being the base model with
the adapter disabled. Both sides share the model, the pairs, the LoRA ranks, the batch sizes,
the maximum length, the learning rates, beta, the number of optimizer steps and the seed.

The DPO phase of both sides starts from the base model rather than a merged SFT model, so the
two phases can run separately. After DPO, each side is evaluated on the same held-out pairs
(TRL's `evaluate`), and the eval loss and reward accuracy of the two sides are compared.

Run `python bench/train.py --help` for the options; bench/README.md shows typical commands.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO / "examples" / "data" / "instruction_preference.strings.jsonl"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
RSS_SAMPLE_INTERVAL_S = 0.02
CHILD_TIMEOUT_S = 3600

# What each variant changes. "plain" is TRL alone. The others go through the worker's builders
# with the listed DPO optimisations switched on or off, to measure them one at a time.
VARIANTS = {
    "plain": {"worker": False, "chunked_lm_head": False, "group_by_length": False, "malloc": False},
    "plain-malloc": {
        "worker": False, "chunked_lm_head": False, "group_by_length": False, "malloc": True
    },
    "ours": {"worker": True, "chunked_lm_head": True, "group_by_length": True, "malloc": True},
    "ours-no-malloc": {
        "worker": True, "chunked_lm_head": True, "group_by_length": True, "malloc": False
    },
    "head-only": {
        "worker": True, "chunked_lm_head": True, "group_by_length": False, "malloc": False
    },
    "grouping-only": {
        "worker": True, "chunked_lm_head": False, "group_by_length": True, "malloc": False
    },
    "malloc-only": {
        "worker": True, "chunked_lm_head": False, "group_by_length": False, "malloc": True
    },
}

# Agreement of the final DPO evaluation of "ours" with "plain" on the same seed. The sides
# differ in batch order (length grouping) and float rounding (chunked sums), not in the loss.
EVAL_LOSS_TOLERANCE = 0.01
EVAL_ACCURACY_TOLERANCE = 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each side and phase.")
    parser.add_argument("--steps", type=int, default=2, help="Optimizer steps per phase.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL preference pairs.")
    parser.add_argument("--pairs", type=int, default=64, help="Training pairs taken from --data.")
    parser.add_argument(
        "--eval-pairs", type=int, default=32, help="Held-out pairs after the training pairs."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny random model: a smoke test.")
    parser.add_argument("--json", type=Path, help="Write the results as JSON to this file.")
    parser.add_argument("--markdown", type=Path, help="Write the Markdown table to this file.")
    parser.add_argument(
        "--phases", default="sft,dpo", help="Comma-separated phases to run: sft, dpo."
    )
    parser.add_argument(
        "--variants",
        default="plain,ours",
        help=f"Comma-separated sides to run, first is the baseline: {', '.join(VARIANTS)}.",
    )
    parser.add_argument("--model-dir", type=Path, help="Local model directory (default: import).")
    parser.add_argument("--max-length", type=int, default=256, help="Maximum tokens per sequence.")
    parser.add_argument("--sft-batch-size", type=int, default=2, help="SFT per-device batch.")
    parser.add_argument("--sft-accumulation", type=int, default=8, help="SFT accumulation steps.")
    parser.add_argument("--dpo-batch-size", type=int, default=8, help="DPO per-device batch.")
    parser.add_argument("--dpo-accumulation", type=int, default=2, help="DPO accumulation steps.")
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="Turn gradient checkpointing off."
    )
    parser.add_argument(
        "--sft-learning-rate", type=float, default=2e-4, help="SFT learning rate."
    )
    parser.add_argument(
        "--dpo-learning-rate", type=float, default=5e-6, help="DPO learning rate."
    )
    parser.add_argument("--seed", type=int, default=42, help="Training seed of both sides.")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="Peak FLOP/s of the accelerator in TFLOP/s, for model FLOPs utilisation (GPU only).",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_model_dir(args: argparse.Namespace, work_dir: Path) -> Path:
    if args.quick:
        from tests.tiny_model import build_tiny_model

        return build_tiny_model(work_dir / "tiny-model")
    if args.model_dir is not None:
        return args.model_dir
    from app.settings import get_settings
    from worker.model_store import resolve_model

    settings = get_settings()
    return resolve_model(DEFAULT_MODEL, settings.model_catalog[DEFAULT_MODEL], settings.models_dir)


def load_rows(path: Path, count: int, skip: int = 0) -> list[dict]:
    """Return `count` canonical pairs of `path` after the first `skip`, skipping chosen == rejected."""
    from worker.training.data import load_pairs_file

    pairs = [pair for pair in load_pairs_file(path) if pair["chosen"] != pair["rejected"]]
    rows = pairs[skip : skip + count]
    if len(rows) < count:
        raise SystemExit(f"error: {path} has {len(pairs)} usable pairs, fewer than {skip + count}")
    return rows


def make_job(spec: dict[str, Any], output_dir: Path):
    from app.params import RunParams
    from worker.training.job import PairsData, TrainingJob

    params = RunParams(
        sft_learning_rate=spec["sft_learning_rate"],
        sft_per_device_train_batch_size=spec["sft_batch_size"],
        sft_gradient_accumulation_steps=spec["sft_accumulation"],
        sft_gradient_checkpointing=spec["checkpointing"],
        dpo_learning_rate=spec["dpo_learning_rate"],
        dpo_per_device_train_batch_size=spec["dpo_batch_size"],
        dpo_gradient_accumulation_steps=spec["dpo_accumulation"],
        dpo_gradient_checkpointing=spec["checkpointing"],
        dpo_max_length=spec["max_length"],
    )
    return TrainingJob(
        run_name="bench",
        base_model=spec["model_dir"],
        model_dir=Path(spec["model_dir"]),
        data=PairsData(path=Path(spec["data"])),
        params=params,
        output_dir=output_dir,
        progress_path=output_dir / "progress.jsonl",
        seed=spec["seed"],
        use_cpu=not spec["cuda"],
    )


def build_ours(spec, job, model, rows, tokenizer, output_dir):
    from worker.training.fast_dpo import DPOSpeedups
    from worker.training.model import bf16_supported
    from worker.training.run import build_dpo_trainer, build_sft_trainer

    variant = VARIANTS[spec["variant"]]
    if spec["phase"] == "sft":
        return build_sft_trainer(job, model, rows, tokenizer, output_dir, [])
    use_bf16 = job.params.dpo_bf16 and bf16_supported(job.use_cpu)
    speedups = DPOSpeedups(chunked_lm_head=variant["chunked_lm_head"])
    trainer = build_dpo_trainer(job, model, rows, tokenizer, output_dir, [], use_bf16, speedups)
    if not variant["group_by_length"]:
        trainer.args.train_sampling_strategy = "random"
    return trainer


def build_plain(spec, job, model, rows, tokenizer, output_dir):
    """TRL's defaults except what both sides must share (and per-step logging)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    params = job.params
    shared = {
        "output_dir": str(output_dir),
        "seed": spec["seed"],
        "max_length": spec["max_length"],
        "activation_checkpointing": spec["checkpointing"],
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
    }
    if not spec["cuda"]:
        shared.update(use_cpu=True, bf16=False)
    if spec["phase"] == "sft":
        rank, alpha = params.sft_lora_r, params.sft_lora_alpha
        config = SFTConfig(
            **shared,
            learning_rate=params.sft_learning_rate,
            per_device_train_batch_size=params.sft_per_device_train_batch_size,
            gradient_accumulation_steps=params.sft_gradient_accumulation_steps,
        )
        trainer_class = SFTTrainer
    else:
        rank, alpha = params.dpo_lora_r, params.dpo_lora_alpha
        config = DPOConfig(
            **shared,
            learning_rate=params.dpo_learning_rate,
            per_device_train_batch_size=params.dpo_per_device_train_batch_size,
            gradient_accumulation_steps=params.dpo_gradient_accumulation_steps,
            beta=params.dpo_beta,
        )
        trainer_class = DPOTrainer
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return trainer_class(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )


def run_child(spec_path: Path) -> None:
    """Train one phase of one side, then write timings and metrics next to the spec."""
    import resource

    import torch
    from transformers import PrinterCallback

    from worker.training.data import fit_rows
    from worker.training.model import load_model, load_tokenizer
    from worker.training.progress import ProgressReporter

    spec = json.loads(spec_path.read_text())
    output_dir = spec_path.parent / "output"
    job = make_job(spec, output_dir)
    reporter = ProgressReporter(output_dir / "progress.jsonl", is_main_process=True)
    tokenizer = load_tokenizer(job.model_dir, job.base_model, reporter)
    keys = ("completion",) if spec["phase"] == "sft" else ("chosen", "rejected")
    pairs = load_rows(Path(spec["data"]), spec["pairs"])
    eval_rows = []
    if spec["phase"] == "sft":
        pairs = [{"prompt": pair["prompt"], "completion": pair["chosen"]} for pair in pairs]
    elif spec["eval_pairs"]:
        eval_pairs = load_rows(Path(spec["data"]), spec["eval_pairs"], skip=spec["pairs"])
        eval_rows, _, _ = fit_rows(tokenizer, eval_pairs, keys, spec["max_length"])
    rows, _, _ = fit_rows(tokenizer, pairs, keys, spec["max_length"])

    torch.manual_seed(spec["seed"])
    model = load_model(job.model_dir, job.base_model)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    build = build_ours if VARIANTS[spec["variant"]]["worker"] else build_plain
    trainer = build(spec, job, model, rows, tokenizer, output_dir / spec["phase"])
    trainer.remove_callback(PrinterCallback)
    trainer.args.max_steps = spec["steps"]

    if spec["cuda"]:
        torch.cuda.reset_peak_memory_stats()
    started_wall = time.time()
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    finished_wall = time.time()

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result: dict[str, Any] = {
        "train_s": train_s,
        "train_started": started_wall,
        "train_finished": finished_wall,
        "steps": trainer.state.global_step,
        "tokens": int(step_logs[-1]["num_tokens"]),
        "final_loss": step_logs[-1]["loss"],
        "parameters": parameter_count,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if spec["phase"] == "dpo":
        result["final_reward_accuracy"] = step_logs[-1]["rewards/accuracies"]
        if eval_rows:
            from datasets import Dataset

            metrics = trainer.evaluate(eval_dataset=Dataset.from_list(eval_rows))
            result["eval_loss"] = metrics["eval_loss"]
            result["eval_reward_accuracy"] = metrics["eval_rewards/accuracies"]
            result["eval_reward_margin"] = metrics["eval_rewards/margins"]
    if spec["cuda"]:
        result["gpu_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    (spec_path.parent / "result.json").write_text(json.dumps(result, indent=2))


def sample_rss(process, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    """Append (time, RSS of the process and its children) until `stop` is set or it exits."""
    import psutil

    while not stop.is_set():
        try:
            family = [process, *process.children(recursive=True)]
            rss = sum(member.memory_info().rss for member in family)
        except psutil.Error:
            return
        samples.append((time.time(), rss))
        time.sleep(RSS_SAMPLE_INTERVAL_S)


def run_phase(spec: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run one phase of one side in a subprocess and return its result with peak RSS."""
    import psutil

    from worker.training.environment import training_environment

    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if VARIANTS[spec["variant"]]["malloc"]:
        env = training_environment(env)
    else:
        allocator_keys = ("MALLOC_", "LD_PRELOAD")
        env = {key: value for key, value in env.items() if not key.startswith(allocator_keys)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    with (work_dir / "child.log").open("w") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(
            target=sample_rss, args=(psutil.Process(child.pid), samples, stop), daemon=True
        )
        sampler.start()
        try:
            returncode = child.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            stop.set()
            sampler.join()
    if returncode != 0:
        tail = (work_dir / "child.log").read_text()[-3000:]
        raise SystemExit(f"error: {spec['variant']} {spec['phase']} failed ({returncode}):\n{tail}")

    result = json.loads((work_dir / "result.json").read_text())
    in_training = [
        rss for at, rss in samples if result["train_started"] <= at <= result["train_finished"]
    ]
    result["peak_rss_bytes"] = max(in_training, default=0)
    result["process_peak_rss_bytes"] = max((rss for _, rss in samples), default=0)
    result["tokens_per_s"] = result["tokens"] / result["train_s"]
    result["s_per_step"] = result["train_s"] / max(result["steps"], 1)
    if spec["peak_tflops"] and spec["cuda"]:
        achieved = 6 * result["parameters"] * result["tokens"] / result["train_s"]
        result["mfu"] = achieved / (spec["peak_tflops"] * 1e12)
    return result


METRICS = {
    "tokens_per_s": ("tokens/s", 0),
    "s_per_step": ("s/optimizer step", 2),
    "peak_rss_gib": ("peak RSS in training (GiB)", 2),
    "process_peak_rss_gib": ("peak RSS of the process (GiB)", 2),
    "gpu_max_memory_allocated_gib": ("GPU max_memory_allocated (GiB)", 2),
    "mfu": ("model FLOPs utilisation", 3),
}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Return the median, min and max of each metric over repeated runs."""
    summary = {}
    for name in METRICS:
        values = []
        for run in runs:
            if name.endswith("_gib"):
                raw = run.get(name.removesuffix("_gib") + "_bytes")
                value = None if raw is None else raw / 1024**3
            else:
                value = run.get(name)
            if value is not None:
                values.append(value)
        if values:
            summary[name] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
    return summary


def check_agreement(baseline: list[dict], other: list[dict]) -> dict[str, Any]:
    """Compare the DPO evaluation of two sides, repeat by repeat (same seed each time)."""
    loss_differences = [abs(a["eval_loss"] - b["eval_loss"]) for a, b in zip(baseline, other)]
    accuracy_differences = [
        abs(a["eval_reward_accuracy"] - b["eval_reward_accuracy"])
        for a, b in zip(baseline, other)
    ]
    return {
        "eval_loss_tolerance": EVAL_LOSS_TOLERANCE,
        "eval_reward_accuracy_tolerance": EVAL_ACCURACY_TOLERANCE,
        "max_eval_loss_difference": max(loss_differences),
        "max_eval_reward_accuracy_difference": max(accuracy_differences),
        "passed": max(loss_differences) <= EVAL_LOSS_TOLERANCE
        and max(accuracy_differences) <= EVAL_ACCURACY_TOLERANCE,
    }


def format_cell(stats: dict[str, float] | None, digits: int) -> str:
    if stats is None:
        return "n/a"
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def markdown(report: dict[str, Any]) -> str:
    variants = report["variants"]
    baseline = variants[0]
    header = "| phase | metric | " + " | ".join(variants) + " | "
    header += " | ".join(f"{name} / {baseline}" for name in variants[1:]) + " |"
    lines = [
        "Median (min–max) of "
        f"{report['settings']['repeats']} runs; {report['settings']['model']}.",
        "",
        header,
        "|" + "---|" * (2 + 2 * len(variants) - 1),
    ]
    for phase, phase_report in report["phases"].items():
        for name, (label, digits) in METRICS.items():
            cells = [phase_report["summary"][variant].get(name) for variant in variants]
            if all(cell is None for cell in cells):
                continue
            ratios = []
            for cell in cells[1:]:
                if cell is None or cells[0] is None or cells[0]["median"] == 0:
                    ratios.append("n/a")
                else:
                    ratios.append(f"{cell['median'] / cells[0]['median']:.2f}")
            row = [phase, label, *(format_cell(cell, digits) for cell in cells), *ratios]
            lines.append("| " + " | ".join(row) + " |")
    dpo = report["phases"].get("dpo")
    if dpo:
        lines += ["", "| DPO result | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for key in ("final_loss", "final_reward_accuracy", "eval_loss", "eval_reward_accuracy"):
            values = [
                statistics.median(run[key] for run in dpo["runs"][variant])
                if key in dpo["runs"][variant][0] else math.nan
                for variant in variants
            ]
            lines.append(f"| {key} (median) | " + " | ".join(f"{v:.4f}" for v in values) + " |")
        for variant, check in dpo.get("agreement", {}).items():
            verdict = "passed" if check["passed"] else "FAILED"
            lines.append(
                f"\n{variant} against {baseline}: eval loss differs by at most"
                f" {check['max_eval_loss_difference']:.4f} (tolerance {EVAL_LOSS_TOLERANCE}),"
                " eval reward accuracy by at most"
                f" {check['max_eval_reward_accuracy_difference']:.3f}"
                f" (tolerance {EVAL_ACCURACY_TOLERANCE}): {verdict}."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        run_child(args.child)
        return 0

    import torch

    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or len(variants) < 2:
        raise SystemExit(f"error: --variants needs two or more of {', '.join(VARIANTS)}")
    phases = args.phases.split(",")
    if not set(phases) <= {"sft", "dpo"}:
        raise SystemExit("error: --phases takes sft, dpo or both")
    if args.quick:
        args.pairs, args.eval_pairs = min(args.pairs, 16), min(args.eval_pairs, 8)

    work_root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir = resolve_model_dir(args, work_root)
    cuda = torch.cuda.is_available()
    base_spec = {
        "model_dir": str(model_dir),
        "data": str(args.data.resolve()),
        "pairs": args.pairs,
        "eval_pairs": args.eval_pairs,
        "steps": args.steps,
        "seed": args.seed,
        "max_length": args.max_length,
        "sft_batch_size": args.sft_batch_size,
        "sft_accumulation": args.sft_accumulation,
        "dpo_batch_size": args.dpo_batch_size,
        "dpo_accumulation": args.dpo_accumulation,
        "checkpointing": not args.no_checkpointing,
        "sft_learning_rate": args.sft_learning_rate,
        "dpo_learning_rate": args.dpo_learning_rate,
        "peak_tflops": args.peak_tflops,
        "cuda": cuda,
    }
    report: dict[str, Any] = {
        "settings": {
            **{key: value for key, value in base_spec.items() if key != "model_dir"},
            "model": "tiny random Llama (--quick)" if args.quick else DEFAULT_MODEL,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        },
        "variants": variants,
        "phases": {},
    }
    for phase in phases:
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        # Sides alternate within each repeat, so that load from other processes on the
        # machine spreads over all of them.
        for repeat in range(args.repeats):
            for variant in variants:
                spec = {**base_spec, "phase": phase, "variant": variant}
                result = run_phase(spec, work_root / f"{phase}-{variant}-{repeat}")
                runs[variant].append(result)
                print(
                    f"{phase} {variant} #{repeat + 1}: {result['tokens_per_s']:.0f} tokens/s,"
                    f" {result['s_per_step']:.2f} s/step,"
                    f" peak RSS {result['peak_rss_bytes'] / 1024**3:.2f} GiB",
                    flush=True,
                )
        phase_report = {
            "runs": runs,
            "summary": {variant: summarise(runs[variant]) for variant in variants},
        }
        if phase == "dpo" and args.eval_pairs > 0:
            phase_report["agreement"] = {
                variant: check_agreement(runs[variants[0]], runs[variant])
                for variant in variants[1:]
            }
        report["phases"][phase] = phase_report

    table = markdown(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    failed = [
        variant
        for phase_report in report["phases"].values()
        for variant, check in phase_report.get("agreement", {}).items()
        if not check["passed"]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
