"""Measuring time and peak memory of a call, on CPU or CUDA, for benchmarks and the demo.

CUDA: ``torch.cuda.max_memory_allocated`` above the memory in use before the call, with proper
synchronisation around timings. CPU: the process's resident set size, sampled by a background thread
while the call runs, above the RSS before it (freed heap memory is handed back to the OS first with
``malloc_trim`` so that an earlier call's leftovers do not hide this one's peak).
"""
from __future__ import annotations

import ctypes
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc (macOS, musl): RSS figures are then upper bounds
        pass


class _RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.0005):
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)


class PeakMemory:
    """Context manager: ``.peak_bytes`` = the most memory the block used beyond what was in use before."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self._sampler = _RssSampler()
            self._start = self._sampler.peak
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._sampler.stopped.set()
            self._sampler.join()
            self.peak_bytes = max(self._sampler.peak, psutil.Process().memory_info().rss) - self._start


@dataclass
class Measurement:
    times: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu") -> Measurement:
    """Median wall time over ``repeats`` calls after ``warmup`` calls, and the peak memory of one call."""
    for _ in range(warmup):
        fn()
    result = Measurement()
    with PeakMemory(device) as peak:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        result.times.append(time.perf_counter() - start)
    result.peak_bytes = peak.peak_bytes
    for _ in range(repeats - 1):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        result.times.append(time.perf_counter() - start)
    return result
