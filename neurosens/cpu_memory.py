"""Keep freed heap memory in the process instead of returning it to the OS (glibc only).

By default glibc serves large blocks with fresh mmap pages and gives them back on free, so every
activation and gradient of a CPU training step is page-faulted in anew; at MNIST/CIFAR batch
sizes that first touch costs as much as the arithmetic of the elementwise ops. Raising the mmap
and trim thresholds lets freed blocks be reused. The price is that the resident size stays at its
peak. The `neurosens` command does this on start (set NEUROSENS_KEEP_FREED_MEMORY=0 to opt out);
a library import never does.
"""
import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold=1 << 30, top_pad=1 << 28):
    """Tune glibc malloc so that blocks up to ``mmap_threshold`` bytes come from the reusable heap
    and freed memory is never trimmed. Returns False (and changes nothing) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, top_pad)))
