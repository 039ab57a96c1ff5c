"""Command lines that start the training child process on one or several processes."""

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """Return a TCP port that is free on this host now, for the process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_command(job_path: Path, num_processes: int) -> list[str]:
    """Return the command that trains the job in `job_path` on `num_processes` processes.

    One process runs `python -m worker.training` directly. Several run under
    `accelerate launch --multi_gpu`, which starts them with torchrun: one per GPU, or with
    `use_cpu` in the job, CPU processes joined by the gloo backend. In accelerate 1.16,
    `accelerate launch --cpu --num_processes N` starts a single process unless MPI is
    configured, so `--cpu` is not used here.
    """
    module = [sys.executable, "-m", "worker.training", str(job_path)]
    if num_processes == 1:
        return module
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *module[1:],
    ]
