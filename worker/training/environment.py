"""Environment variables for the training child process: the memory allocator and its settings.

The dynamic loader and glibc read these once, when the process starts. So the process that launches the child must
set them, and setting them inside the child has no effect.
"""

from collections.abc import Mapping
from pathlib import Path

# Usual install paths of the jemalloc library on x86-64 and arm64 Linux distributions.
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
)

# PyTorch on the CPU allocates and frees tensors of tens of MB at every step. With glibc's
# defaults, each thread gets its own arena, and the heap's free top is returned to the system
# and faulted in again on the next step.
MALLOC_SETTINGS = {
    # Two arenas instead of up to 8 per core: less memory held in partly free arenas.
    "MALLOC_ARENA_MAX": "2",
    # Keep up to 512 MiB of free heap top instead of returning it after every step.
    "MALLOC_TRIM_THRESHOLD_": str(512 * 1024**2),
    # Allocations above 32 MiB (glibc's largest threshold on 64-bit) are mapped and unmapped
    # on their own, and smaller ones reuse heap memory. Setting it fixes the threshold, which
    # glibc would otherwise raise as large blocks are freed.
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2),
}


def jemalloc_path() -> str | None:
    """Return the path of an installed jemalloc library, or None."""
    return next((path for path in JEMALLOC_PATHS if Path(path).is_file()), None)


def training_environment(base: Mapping[str, str]) -> dict[str, str]:
    """Return `base` with the allocator settings added; values already in `base` are kept.

    jemalloc, where installed, is preloaded, because it halved the DPO peak RSS of
    bench/train.py against these glibc settings (SmolLM2-135M, 2 CPU cores). The glibc
    settings apply where it is not installed.
    """
    environment = {**MALLOC_SETTINGS, **base}
    library = jemalloc_path()
    if library is not None and "LD_PRELOAD" not in base:
        environment["LD_PRELOAD"] = library
    return environment
