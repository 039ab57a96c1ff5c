"""Environment variables for the training child process: glibc malloc settings.

glibc reads these once, when the process starts, so the process that launches the child must
set them; setting them inside the child has no effect.
"""

from collections.abc import Mapping

# PyTorch on the CPU allocates and frees tensors of tens of MB at every step. With glibc's
# defaults, each thread gets its own arena, and the heap's free top is returned to the system
# and faulted in again on the next step.
MALLOC_SETTINGS = {
    # Two arenas instead of up to 8 per core: less memory held in partly free arenas.
    "MALLOC_ARENA_MAX": "2",
    # Keep up to 512 MiB of free heap top instead of returning it after every step.
    "MALLOC_TRIM_THRESHOLD_": str(512 * 1024**2),
    # Allocations above 32 MiB (glibc's largest threshold on 64-bit) are mapped and unmapped
    # on their own; smaller ones reuse heap memory. Setting it fixes the threshold, which
    # glibc would otherwise raise as large blocks are freed.
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2),
}


def training_environment(base: Mapping[str, str]) -> dict[str, str]:
    """Return `base` with the malloc settings added; values already in `base` are kept."""
    return {**MALLOC_SETTINGS, **base}
