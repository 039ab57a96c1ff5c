"""The whole service on PostgreSQL and Redis: the API, a real Celery worker process, the
official client, and real training steps on a tiny model."""

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import rundpo
from sqlalchemy import select

from app import credits
from app.db import session_scope
from app.models import LedgerEntry, Run, RunEvent
from app.statuses import PIPELINE
from tests.conftest import (
    DATA_DIR,
    LiveServer,
    Service,
    make_service,
    start_api,
    start_process,
    stop_process,
)
from tests.tiny_model import tiny_model_dir  # noqa: F401  (a fixture)

E2E_REDIS_URL = "redis://127.0.0.1:6379/14"
TINY = "tiny-llama"

# Small enough for seconds per phase on two CPU cores.
FAST_PARAMS = {
    "base_model": TINY,
    "gpus": 1,
    "sft_ratio": 0.25,
    "sft_num_train_epochs": 1,
    "sft_per_device_train_batch_size": 2,
    "sft_gradient_accumulation_steps": 1,
    "sft_gradient_checkpointing": False,
    "dpo_per_device_train_batch_size": 2,
    "dpo_gradient_accumulation_steps": 1,
    "dpo_gradient_checkpointing": False,
    "dpo_max_length": 128,
    "dpo_learning_rate": 5e-5,
}


@dataclass
class Stack:
    service: Service
    api: LiveServer
    worker: object

    def client(self, key: str) -> rundpo.RundpoClient:
        return rundpo.RundpoClient(api_key=key, base_url=self.api.api_url)


def write_pairs(tmp_path: Path, count: int) -> Path:
    path = tmp_path / f"pairs-{count}.jsonl"
    with open(DATA_DIR / "instruction_preference.strings.jsonl") as source:
        path.write_text("".join(source.readline() for _ in range(count)))
    return path


def start_worker(service: Service) -> object:
    return start_process(["worker"], service.env, service.data_dir / "worker.log")


@pytest.fixture
def stack(monkeypatch, tmp_path, postgres_url, tiny_model_dir) -> Iterator[Stack]:  # noqa: F811
    redis.Redis.from_url(E2E_REDIS_URL).flushdb()
    catalog = {TINY: {"weights": str(tiny_model_dir), "price_per_million_tokens": 1.0}}
    service = make_service(
        monkeypatch,
        tmp_path,
        postgres_url,
        RUNDPO_BROKER_URL=E2E_REDIS_URL,
        RUNDPO_REDIS_URL=E2E_REDIS_URL,
        RUNDPO_MODEL_CATALOG=json.dumps(catalog),
        RUNDPO_ALLOW_CPU_TRAINING="true",
        RUNDPO_WORKER_GPUS="0",
        RUNDPO_WORKER_HEARTBEAT_S="1",
        RUNDPO_WORKER_LOST_AFTER_S="6",
        RUNDPO_ENQUEUE_RETRY_S="1",
        HF_HUB_OFFLINE="1",
    )
    api = start_api(service)
    worker = start_worker(service)
    yield Stack(service, api, worker)
    stop_process(worker)
    stop_process(api.process)


def wait_for(client: rundpo.RundpoClient, run_name: str, until, timeout_s: float = 300):
    """Poll get_status every 0.2 s; return the (status, percent) pairs seen and the last body."""
    seen: list[tuple[str, float]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_status(run_name)
        seen.append((status["status"].value, status["percent"] or 0))
        if until(status):
            return seen, status
        time.sleep(0.2)
    raise AssertionError(f"run {run_name} stuck; statuses seen: {seen[-5:]}")


def status_events(run_name: str) -> list[str]:
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        events = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run.id, RunEvent.type == "status").order_by(RunEvent.id)
        ).all()
        return [event.data["status"] for event in events]


def ledger_kinds(run_name: str) -> list[str]:
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        return list(
            session.scalars(
                select(LedgerEntry.kind).where(LedgerEntry.run_id == run.id).order_by(LedgerEntry.id)
            )
        )


def test_run_to_complete_with_official_client(stack, tmp_path, tiny_model_dir):  # noqa: F811
    key = stack.service.create_account(credits=100)
    client = stack.client(key)
    uploaded = client.upload_file(str(write_pairs(tmp_path, 24)))

    response = client.session.post(
        f"{stack.api.api_url}/run_dpo.php", json={"file_id": uploaded.file_id, **FAST_PARAMS}
    )
    assert response.status_code == 200, response.text
    run_name = response.json()["run_name"]

    seen, final = wait_for(client, run_name, lambda s: s["status"].value in ("Complete", "Failed"))
    assert final["status"] == rundpo.RunStatus.COMPLETED, stack.service.data_dir

    # Every status, in order, from the run's events; the client saw a subsequence of them.
    expected = [status.value for status in PIPELINE]
    assert status_events(run_name) == expected
    observed = [status for status, _ in seen]
    order = [expected.index(status) for status in observed]
    assert order == sorted(order)
    for phase in ("Training SFT", "Training DPO"):
        percents = [percent for status, percent in seen if status == phase]
        assert percents == sorted(percents)

    # The adapter zip, downloaded as the official client does, loads on the base model.
    target = rundpo.download_and_extract(final["download_url"], run_name, tmp_path / "adapters")
    names = {path.name for path in target.iterdir()}
    for expected_file in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
        "metrics.json",
        "training_log.jsonl",
        "README.md",
    ):
        assert expected_file in names
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, target)
    assert model.peft_config["default"].r == 32 + 16

    # The hold was settled to the tokens trained.
    assert ledger_kinds(run_name) == ["hold", "settlement"]
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        assert run.tokens_trained > 0
        assert 0 < run.cost_micro <= run.hold_micro
        assert credits.balance_micro(session, run.account_id) == 100_000_000 - run.cost_micro
    assert client.get_credits() == pytest.approx(100 - run.cost_micro / 1e6)

    # The run's working files are gone but its log.
    work_dir = stack.service.data_dir / "runs" / run_name
    assert [path.name for path in work_dir.iterdir()] == ["run.log"]

    # A second delivery of the same task changes nothing.
    from app.queue import TRAIN_TASK, sender

    sender().send_task(TRAIN_TASK, args=[run_name])
    time.sleep(3)
    assert client.get_status(run_name)["status"] == rundpo.RunStatus.COMPLETED
    assert ledger_kinds(run_name) == ["hold", "settlement"]
    assert "not training it again" in (stack.service.data_dir / "worker.log").read_text()


@pytest.mark.parametrize("phase", ["Training SFT", "Training DPO"])
def test_cancel_during_training(stack, tmp_path, phase):
    key = stack.service.create_account(credits=100)
    client = stack.client(key)
    uploaded = client.upload_file(str(write_pairs(tmp_path, 64)))
    params = dict(FAST_PARAMS)
    if phase == "Training SFT":
        params.update(sft_ratio=1.0, sft_num_train_epochs=30)
    else:
        params.update(dpo_num_train_epochs=30)
    response = client.session.post(
        f"{stack.api.api_url}/run_dpo", json={"file_id": uploaded.file_id, **params}
    )
    run_name = response.json()["run_name"]

    wait_for(client, run_name, lambda s: s["status"].value == phase or s["status"].value in ("Complete", "Failed"))
    assert client.get_status(run_name)["status"].value == phase
    cancelled_at = time.monotonic()
    assert client.cancel_run(run_name) is True
    _, final = wait_for(client, run_name, lambda s: s["status"].value == "Failed", timeout_s=10)
    assert time.monotonic() - cancelled_at < 10
    body = client.session.get(
        f"{stack.api.api_url}/get_status", params={"run_name": run_name}
    ).json()
    assert "Cancelled" in body["failure_reason"]
    assert ledger_kinds(run_name) == ["hold", "refund"]
    assert client.get_credits() == 100

    # The child process group is gone and nothing but the log is left.
    deadline = time.monotonic() + 10
    work_dir = stack.service.data_dir / "runs" / run_name
    while time.monotonic() < deadline and len(list(work_dir.iterdir())) > 1:
        time.sleep(0.2)
    assert [path.name for path in work_dir.iterdir()] == ["run.log"]
    assert not _training_processes(run_name)


def _training_processes(run_name: str) -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "worker.training" in cmdline and run_name in cmdline:
            found.append(process.pid)
    return found


def test_killed_worker_fails_and_refunds(stack, tmp_path):
    key = stack.service.create_account(credits=100)
    client = stack.client(key)
    uploaded = client.upload_file(str(write_pairs(tmp_path, 64)))
    params = {**FAST_PARAMS, "sft_ratio": 1.0, "sft_num_train_epochs": 30}
    run_name = client.session.post(
        f"{stack.api.api_url}/run_dpo", json={"file_id": uploaded.file_id, **params}
    ).json()["run_name"]
    wait_for(client, run_name, lambda s: s["status"].value == "Training SFT")

    os.killpg(stack.worker.pid, signal.SIGKILL)
    stack.worker.wait()

    _, final = wait_for(client, run_name, lambda s: s["status"].value == "Failed", timeout_s=30)
    body = client.session.get(
        f"{stack.api.api_url}/get_status", params={"run_name": run_name}
    ).json()
    assert "worker" in body["failure_reason"]
    assert "lost" in body["failure_reason"]
    assert ledger_kinds(run_name) == ["hold", "refund"]
    assert client.get_credits() == 100
    time.sleep(1)
    assert not _training_processes(run_name)
