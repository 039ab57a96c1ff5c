"""The run supervisor in this process, on SQLite: failures users hit and what they get."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from app import credits
from app.accounts import authenticate
from app.db import session_scope
from app.deps import get_storage
from app.files import new_file_id, record_upload
from app.models import LedgerEntry, Run
from app.params import parse_run_request
from app.runs import create_run
from app.settings import get_settings
from app.storage import upload_key
from app.uploads import UploadResult
from app.validation import validate_bytes
from tests.conftest import DATA_DIR, make_service
from tests.test_worker_e2e import FAST_PARAMS, TINY
from tests.tiny_model import tiny_model_dir  # noqa: F401  (a fixture)
from worker.supervisor import RunSupervisor


def service_with_model(monkeypatch, tmp_path, weights: str, **extra: str):
    catalog = {TINY: {"weights": weights, "price_per_million_tokens": 1.0}}
    env = {
        "RUNDPO_MODEL_CATALOG": json.dumps(catalog),
        "RUNDPO_ALLOW_CPU_TRAINING": "true",
        "RUNDPO_WORKER_GPUS": "0",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }
    return make_service(monkeypatch, tmp_path, f"sqlite:///{tmp_path / 'data' / 'rundpo.db'}", **env)


def write_pairs_file(tmp_path: Path, count: int) -> Path:
    path = tmp_path / f"pairs-{count}.jsonl"
    with open(DATA_DIR / "instruction_preference.strings.jsonl") as source:
        path.write_text("".join(source.readline() for _ in range(count)))
    return path


def start_run(key: str, pairs: int = 16, **params) -> str:
    """Upload `pairs` real pairs and create a Pending run on them, as the API does."""
    with open(DATA_DIR / "instruction_preference.strings.jsonl", "rb") as source:
        data = b"".join(source.readline() for _ in range(pairs))
    report = validate_bytes(data, max_line_bytes=1 << 20)
    file_id = new_file_id()
    writer = get_storage().open_writer(upload_key(file_id))
    writer.write(data)
    writer.commit()
    with session_scope() as session:
        caller = authenticate(session, key)
        record_upload(
            session,
            caller,
            UploadResult(
                file_id=file_id,
                filename="pairs.jsonl",
                pair_count=report.pair_count,
                size_bytes=len(data),
                token_estimate=report.token_estimate,
                sha256="0" * 64,
                storage_key=upload_key(file_id),
            ),
        )
        request = parse_run_request({"file_id": file_id, **FAST_PARAMS, **params})
        run = create_run(session, get_settings(), caller, request)
        return run.name


def final_run(run_name: str) -> tuple[Run, list[str]]:
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        kinds = list(
            session.scalars(select(LedgerEntry.kind).where(LedgerEntry.run_id == run.id))
        )
        return run, kinds


def assert_failed_and_refunded(run_name: str, *words: str) -> Run:
    run, kinds = final_run(run_name)
    assert run.status == "Failed"
    for word in words:
        assert word in run.failure_reason, run.failure_reason
    assert kinds == ["hold", "refund"]
    with session_scope() as session:
        assert credits.balance_micro(session, run.account_id) == 10_000_000
    return run


def test_missing_model_fails_with_where_it_looked(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-model"
    service = service_with_model(monkeypatch, tmp_path, str(missing))
    run_name = start_run(service.create_account(credits=10))

    assert RunSupervisor(run_name).execute() == "Failed"
    assert_failed_and_refunded(run_name, TINY, str(missing))


def test_missing_stored_file_fails(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    service = service_with_model(monkeypatch, tmp_path, str(tiny_model_dir))
    run_name = start_run(service.create_account(credits=10))
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        get_storage().delete(upload_key(run.file_id))

    assert RunSupervisor(run_name).execute() == "Failed"
    assert_failed_and_refunded(run_name, "missing", "Upload the file again")


def test_corrupt_stored_file_fails(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    service = service_with_model(monkeypatch, tmp_path, str(tiny_model_dir))
    run_name = start_run(service.create_account(credits=10))
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        path = get_storage().local_path(upload_key(run.file_id))
    path.write_bytes(path.read_bytes()[:-40] + b"{not json\n")

    assert RunSupervisor(run_name).execute() == "Failed"
    assert_failed_and_refunded(run_name, "corrupt")


def test_no_gpu_without_cpu_permission(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    service = service_with_model(
        monkeypatch, tmp_path, str(tiny_model_dir), RUNDPO_ALLOW_CPU_TRAINING="false"
    )
    run_name = start_run(service.create_account(credits=10))

    assert RunSupervisor(run_name).execute() == "Failed"
    assert_failed_and_refunded(run_name, "no GPU", "RUNDPO_ALLOW_CPU_TRAINING")


def test_nan_loss_fails_as_diverged(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for path in Path(tiny_model_dir).iterdir():
        if path.is_file():
            (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = next(key for key in weights if "layers.0.mlp.down_proj" in key)
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    service = service_with_model(monkeypatch, tmp_path, str(broken))
    run_name = start_run(service.create_account(credits=10))

    assert RunSupervisor(run_name).execute() == "Failed"
    assert_failed_and_refunded(run_name, "diverged", "learning rate")


def test_second_delivery_is_skipped(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    service = service_with_model(monkeypatch, tmp_path, str(tiny_model_dir))
    run_name = start_run(service.create_account(credits=10))
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        run.worker_id = "other-host:1"
        run.status = "Training SFT"

    assert RunSupervisor(run_name).execute() == "skipped"
    run, kinds = final_run(run_name)
    assert run.status == "Training SFT"
    assert kinds == ["hold"]


def hf_run(key: str, sft_name: str, dpo_name: str) -> str:
    with session_scope() as session:
        caller = authenticate(session, key)
        request = parse_run_request(
            {"hf_sft_dataset_name": sft_name, "hf_dpo_dataset_name": dpo_name, **FAST_PARAMS}
        )
        return create_run(session, get_settings(), caller, request).name


def test_hf_datasets_train_to_complete(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    service = service_with_model(monkeypatch, tmp_path, str(tiny_model_dir))
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    lines = (DATA_DIR / "instruction_preference.strings.jsonl").read_text().splitlines()
    (dpo_dir / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    conversation = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    (sft_dir / "train.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")

    run_name = hf_run(service.create_account(credits=10), str(sft_dir), str(dpo_dir))
    assert RunSupervisor(run_name).execute() == "Complete"
    run, kinds = final_run(run_name)
    assert run.status == "Complete"
    assert kinds == ["hold", "settlement"]


def test_missing_hf_dataset_fails(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    service = service_with_model(monkeypatch, tmp_path, str(tiny_model_dir))
    missing = str(tmp_path / "no-such-dataset")
    run_name = hf_run(service.create_account(credits=10), missing, missing)

    assert RunSupervisor(run_name).execute() == "Failed"
    assert_failed_and_refunded(run_name, "no-such-dataset")
