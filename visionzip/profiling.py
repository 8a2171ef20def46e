"""Measuring time and peak memory of a call, on CPU or CUDA, for benchmarks and the demo.

CUDA: ``torch.cuda.max_memory_allocated`` above the memory in use before the call, with proper
synchronisation around timings. CPU, by default (``cpu_mode="tensors"``): the peak of live tensor memory
during the call, replayed from the allocation and free events that ``torch.profiler`` records
(``profile_memory=True``): deterministic, and the CPU analogue of ``max_memory_allocated``.
``cpu_mode="rss"``: the process's resident set size, sampled by a background thread while the call runs,
above the RSS before it (glibc keeps freed memory around, so this one is noisy by tens of MiB).
Memory is measured on a call of its own, never on a timed one (either way of measuring slows the call).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import sys
import tempfile
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


def _live_tensor_peak(events) -> int:
    """Peak of the running sum of allocations (+) and frees (-) in profiler events, in time order."""
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


# c10's CPU allocator logs this (once, then every 1000th time) when a block allocated before a memory-
# profiling session is freed during it: the usual case for a call that replaces cached tensors. It says
# what ``_live_tensor_peak`` already assumes (frees of earlier blocks carry no size, so the peak counts the
# call's own allocations), and a C++ log level cannot be changed once torch is imported.
UNKNOWN_BLOCK_NOTICE = b"Memory block of unknown size was allocated before"


@contextlib.contextmanager
def _stderr_without(notice: bytes):
    """Everything written to file descriptor 2 in the block (C++ logs included) is held back and written
    out at its end, less the lines containing ``notice``; nothing else is lost or reordered."""
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(descriptor)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), descriptor)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, descriptor)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True) if notice not in line)
            if kept:
                os.write(descriptor, kept)


class PeakMemory:
    """Context manager: ``.peak_bytes`` = the most memory the block used beyond what was in use before.

    ``cpu_mode``: "tensors" (live tensor memory, from the profiler's allocation events) or "rss"."""

    def __init__(self, device: torch.device | str = "cpu", cpu_mode: str = "tensors"):
        if cpu_mode not in ("tensors", "rss"):
            raise ValueError(f"cpu_mode must be 'tensors' or 'rss', got {cpu_mode!r}")
        self.device = torch.device(device)
        self.cpu_mode = cpu_mode
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.cpu_mode == "tensors":
            # libkineto prints two log lines per profiling session at its default level; read when it
            # starts (the first session), and a user's own setting wins
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            self._quiet = _stderr_without(UNKNOWN_BLOCK_NOTICE)
            self._quiet.__enter__()
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self._profiler.__enter__()
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
        elif self.cpu_mode == "tensors":
            try:
                self._profiler.__exit__(*exc)
            finally:
                self._quiet.__exit__(*exc)
            self.peak_bytes = _live_tensor_peak(self._profiler.events())
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


def timed_call(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Wall time of one call in seconds, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    cpu_mode: str = "tensors",
) -> Measurement:
    """Median wall time over ``repeats`` calls after ``warmup`` calls, and the peak memory of one more
    call (untimed: measuring memory slows the call it watches)."""
    return measure_interleaved({"call": fn}, repeats=repeats, warmup=warmup, device=device, cpu_mode=cpu_mode)["call"]


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    cpu_mode: str = "tensors",
) -> dict[str, Measurement]:
    """``measure`` for several calls whose *ratio* matters, taken round by round (A B, then B A, ...).

    On a shared machine the load drifts during a run; alternating the calls makes the drift hit all of
    them alike, so that e.g. "compression step / vanilla tower" is not decided by which ran first.
    Rounds: ``warmup`` untimed, one untimed round watching peak memory, ``repeats`` timed.
    """
    names = list(fns)
    results = {name: Measurement() for name in names}
    for _ in range(warmup):
        for name in names:
            fns[name]()
    for name in names:
        with PeakMemory(device, cpu_mode) as peak:
            fns[name]()
        results[name].peak_bytes = peak.peak_bytes
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            results[name].times.append(timed_call(fns[name], device))
    return results
