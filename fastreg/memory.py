"""The cache of large CPU buffers that fastreg's fused ops allocate (csrc/mem/cpu_buffers.h).

Buffers of 2 MiB and more -- the (chunk, V) logits buffer, grad_weight, grad_input of the fused
losses on CPU -- come from 2 MiB-aligned blocks with transparent huge pages, and a freed block is
kept for the next request of about its size, so that the next training step reuses the last
one's pages instead of page-faulting through them again. The tensors are ordinary CPU tensors; the blocks cached while no tensor uses them are bounded by
``FASTREG_CPU_CACHE_MB`` (default 1024; 0 keeps nothing) or :func:`set_cpu_cache_limit`.

    fastreg.cpu_cache_info()    # {'cached_bytes', 'limit_bytes', 'live_bytes', 'hits', 'misses'}
    fastreg.empty_cpu_cache()   # give every cached block back to the system
"""
from __future__ import annotations

from ._C_loader import _C


def cpu_cache_info() -> dict:
    """Bytes cached (free blocks kept), the limit, bytes in live tensors, and hits / misses."""
    return dict(_C.cpu_cache_info())


def empty_cpu_cache() -> None:
    """Return every cached block to the system (tensors in use keep theirs)."""
    _C.cpu_cache_release()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Bytes of free blocks the cache may keep; 0 keeps none (huge pages are still used)."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"set_cpu_cache_limit: limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: limit_bytes must be >= 0, got {limit_bytes}")
    _C.cpu_cache_set_limit(limit_bytes)
