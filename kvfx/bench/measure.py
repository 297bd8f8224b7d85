"""What every kvfx benchmark measures with: wall clocks, the process's resident-memory high-water
mark, and a record of the machine the numbers came from.

Peak memory (:class:`PeakMemory`)
    On Linux, ``VmHWM`` of ``/proc/self/status``: the largest resident set (RSS: pages of this
    process in RAM, weights, activations, caches, compiled code, the Python heap) since the last
    reset. Writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS, so each
    measured run gets its own high-water mark; the benchmark reports the peak *above* the RSS at
    the reset (what the run added). Where that reset is not available the fallback is
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a lifetime peak that is never reset
    (``per_run`` is False and the number says only "at most this much"). On CUDA the peak of
    ``torch.cuda.max_memory_allocated`` above the allocation at the reset is recorded too.

Timing
    ``time.perf_counter`` around a call, with ``torch.cuda.synchronize`` before and after on CUDA.
    CPU numbers on a shared machine are noisy: compare ratios from one run, never absolute numbers
    across runs, and look at the load average recorded with them.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import sys
import time

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Per-run peak memory: ``reset()`` before a run, ``read()`` after it (bytes).

    >>> pm = PeakMemory(); pm.reset(); x = torch.ones(16 << 20); r = pm.read()   # 64 MiB, written
    >>> r["peak_rss_delta_bytes"] >= (60 << 20) or not pm.per_run
    True
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.per_run = self._can_reset()
        self.rss_start = 0
        self.cuda_start = 0

    @staticmethod
    def _can_reset() -> bool:
        if _status_kib("VmHWM") is None:
            return False
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    @property
    def what(self) -> str:
        if self.per_run:
            return ("peak RSS above the RSS at the start of the run: /proc/self/status VmHWM, reset "
                    "per run by writing 5 to /proc/self/clear_refs")
        return "process-lifetime peak RSS (getrusage ru_maxrss); not reset per run"

    def reset(self) -> None:
        """Start a run: free what can be freed, note the RSS, restart the high-water mark."""
        release_memory()
        self.rearm()
        self.rss_start = self.rss()
        if self.cuda:
            self.cuda_start = torch.cuda.memory_allocated()

    def rearm(self, release: bool = False) -> None:
        """Restart the high-water mark at the current RSS, keeping the run's start (to measure
        one phase of a run, e.g. decode after prefill); ``release``: first hand what the last
        phase freed back to the OS, so that the next peak shows what is still held."""
        if release:
            release_memory()
        if self.per_run:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def rss() -> int:
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        import resource

        return _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def read(self) -> dict:
        if self.per_run:
            peak = _status_kib("VmHWM") * 1024
        else:
            import resource

            peak = _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        out = {"peak_rss_bytes": peak, "peak_rss_delta_bytes": peak - self.rss_start,
               "rss_start_bytes": self.rss_start}
        if self.cuda:
            out["peak_cuda_delta_bytes"] = torch.cuda.max_memory_allocated() - self.cuda_start
        return out


def _maxrss_bytes(v: int) -> int:
    return v if sys.platform == "darwin" else v * 1024  # bytes on macOS, KiB on Linux


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that
    the RSS at a reset is not inflated by what earlier runs freed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | str = "cpu"):
    """``(fn(), seconds)``, synchronized on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def ratio(a, b) -> float:
    """a / b, NaN when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return float("nan")
    return a / b


def environment(device: torch.device | str = "cpu") -> dict:
    """Where the numbers come from: versions, device, threads, and the load on the machine."""
    import kvfx

    env = {
        "kvfx": kvfx.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
        else (platform.processor() or platform.machine()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if hasattr(os, "getloadavg"):
        env["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return env
