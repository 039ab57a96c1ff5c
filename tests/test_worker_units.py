"""Worker pieces without a broker: GPU leases, the import boundary, out-of-memory kills."""

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
from sqlalchemy import select

from app.db import session_scope
from app.models import Run
from app.settings import Settings
from tests.conftest import REPO
from tests.test_supervisor import assert_failed_and_refunded, service_with_model, start_run
from tests.tiny_model import tiny_model_dir  # noqa: F401  (a fixture)
from worker.gpus import acquire_gpus
from worker.supervisor import RunSupervisor


def test_gpu_leases_do_not_overlap(tmp_path):
    settings = Settings(data_dir=tmp_path)
    first = acquire_gpus(settings, total=3, wanted=2, keep_waiting=lambda: False)
    second = acquire_gpus(settings, total=3, wanted=1, keep_waiting=lambda: False)
    assert first.indices == [0, 1]
    assert second.indices == [2]
    assert first.cuda_visible_devices == "0,1"
    assert acquire_gpus(settings, total=3, wanted=1, keep_waiting=lambda: False) is None

    first.release()
    third = acquire_gpus(settings, total=3, wanted=2, keep_waiting=lambda: False)
    assert third.indices == [0, 1]
    third.release()
    second.release()


def test_gpu_lease_waits_until_free(tmp_path):
    settings = Settings(data_dir=tmp_path)
    held = acquire_gpus(settings, total=1, wanted=1, keep_waiting=lambda: False)
    threading.Timer(0.5, held.release).start()
    started = time.monotonic()
    lease = acquire_gpus(settings, total=1, wanted=1, keep_waiting=lambda: True, poll_s=0.1)
    assert lease.indices == [0]
    assert time.monotonic() - started >= 0.4
    lease.release()


def test_api_never_imports_torch():
    code = (
        "import sys, app.main, app.cli, app.routes.dashboard, app.storage_s3\n"
        "app.main.create_app()\n"
        "heavy = [name for name in ('torch', 'transformers', 'trl', 'peft', 'accelerate')"
        " if name in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_killed_training_process_reads_as_out_of_memory(monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    service = service_with_model(monkeypatch, tmp_path, str(tiny_model_dir))
    run_name = start_run(service.create_account(credits=10), pairs=64, sft_ratio=1.0, sft_num_train_epochs=30)

    def kill_when_training() -> None:
        # What the kernel's out-of-memory killer does: SIGKILL to the training process.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with session_scope() as session:
                status = session.scalar(select(Run.status).where(Run.name == run_name))
            if status == "Training SFT":
                for process in psutil.process_iter(["cmdline"]):
                    cmdline = " ".join(process.info["cmdline"] or [])
                    if "worker.training" in cmdline and run_name in cmdline:
                        os.kill(process.pid, signal.SIGKILL)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_training)
    killer.start()
    assert RunSupervisor(run_name).execute() == "Failed"
    killer.join()
    assert_failed_and_refunded(run_name, "Out of memory", "batch size")
