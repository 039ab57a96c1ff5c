"""Counting this host's GPUs and giving each run its own, pinned with CUDA_VISIBLE_DEVICES.

GPUs are claimed with one lock file per GPU under the data directory, so that runs in
different threads or processes on the same host never share a GPU.
"""

import fcntl
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings


def detect_gpu_count(settings: Settings) -> int:
    if settings.worker_gpus is not None:
        return settings.worker_gpus
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class GpuLease:
    indices: list[int]
    _handles: list

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(index) for index in self.indices)

    def release(self) -> None:
        for handle in self._handles:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._handles.clear()


def _lock_dir(settings: Settings) -> Path:
    path = Path(settings.data_dir) / "gpu-locks" / socket.gethostname()
    path.mkdir(parents=True, exist_ok=True)
    return path


def acquire_gpus(
    settings: Settings,
    total: int,
    wanted: int,
    keep_waiting: Callable[[], bool],
    poll_s: float = 2.0,
) -> GpuLease | None:
    """Claim `wanted` free GPUs of `total`, waiting while `keep_waiting()` is true.

    Returns None when `keep_waiting` returns false before enough GPUs are free.
    """
    lock_dir = _lock_dir(settings)
    while True:
        handles, indices = [], []
        for index in range(total):
            handle = open(lock_dir / f"gpu{index}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handles.append(handle)
            indices.append(index)
            if len(indices) == wanted:
                return GpuLease(indices, handles)
        GpuLease(indices, handles).release()
        if not keep_waiting():
            return None
        time.sleep(poll_s)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
