"""Timing helpers the bench scripts share: device-side timing on CUDA, wall time elsewhere.

On CUDA a timed call is bracketed by CUDA events and nothing syncs between calls (a sync after
every call would add the host's round trip to every short kernel); one synchronize at the end
reads all the events. On the CPU, perf_counter around each call.
"""
from __future__ import annotations

import statistics
import time

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def call_times(fn, dev: torch.device, reps: int, warmup: int = 1, setup=None) -> list[float]:
    """Seconds per call of fn() over reps calls (after warmup calls). setup(), if given, runs
    before each call, untimed (on CUDA its work is queued outside the events)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if dev.type == "cuda":
        pairs = []
        for _ in range(reps):
            if setup is not None:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(dev)
        return [s.elapsed_time(e) / 1e3 for s, e in pairs]
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, dev: torch.device, reps: int, warmup: int = 1, setup=None) -> float:
    """Median seconds of fn() (see call_times)."""
    return statistics.median(call_times(fn, dev, reps, warmup, setup))


def loop_time(step, dev: torch.device, n: int) -> float:
    """Seconds per iteration of a loop of n step() calls, wall clock from a synchronised start to
    a synchronised end: what a pipelined loop (the host one step behind) achieves per step."""
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(dev)
    return (time.perf_counter() - t0) / n
