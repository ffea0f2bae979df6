"""Timers and peak-memory probes shared by ``run.py`` and the pytest-benchmark suites.

Time
    ``measure_time`` calls ``fn`` ``warmup`` times, then repeatedly until ``budget_s``
    seconds of samples (at least ``min_reps``, at most ``max_reps``) and reports the
    median and the 20th/80th percentiles of the per-call times in milliseconds.
    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events around
    each call (no host sync inside the pair), read after one final synchronize.

Caches
    Bandwidth-bound ops must not be timed on inputs that stay in the last-level cache
    between calls. ``rotation_count`` says how many independent copies of the inputs
    to allocate so that cycling through them touches ``4 ×`` the cache (GPU L2 from
    the device properties, CPU LLC from sysfs); the caller cycles with ``cycle``.

Peak memory (``measure_peak_mb``): the peak of *extra* bytes allocated during one
call, above what was live before it (inputs excluded, outputs and transients
included).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and
    free made through torch's CPU allocator (with its size and timestamp). ``fn`` runs
    twice under the profiler and the second call is measured: the running sum of the
    allocator events inside it, minus the sum at its start, peaks at the value reported
    (the first call makes every block the second one frees visible to the profiler, so a
    ``.grad`` freed and re-allocated nets out as on CUDA). This is
    deterministic and sees every torch tensor, but not memory a compiled extension
    mallocs on its own (fastcl's kernels take raw pointers and allocate scratch through
    torch, so nothing of theirs is missed) nor Python objects.
"""
from __future__ import annotations

import contextlib
import glob
import io
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

_MARK = "fastcl_bench.measured_call"

__all__ = ["Timing", "measure_time", "measure_peak_mb", "rotation_count", "cycle", "cache_bytes", "sync"]


@dataclass
class Timing:
    ms_median: float
    ms_p20: float
    ms_p80: float
    reps: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summarise(ms: list[float]) -> Timing:
    ms = sorted(ms)
    return Timing(statistics.median(ms), _percentile(ms, 0.2), _percentile(ms, 0.8), len(ms))


def measure_time(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 2,
    min_reps: int = 5,
    max_reps: int = 100,
    budget_s: float = 1.0,
) -> Timing:
    """Median / p20 / p80 milliseconds per call of ``fn`` (see the module docstring)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        return _measure_cuda(fn, device, min_reps, max_reps, budget_s)
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _summarise(samples)


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", *, warmup: int = 1, rounds: int = 7) -> dict[str, Timing]:
    """Per-call times of several functions measured round-robin: round ``r`` calls each once.

    For comparisons of long calls (whole training epochs), where timing one function's
    repetitions after another's lets the machine's drift between the blocks into the ratio.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _summarise(values) for name, values in samples.items()}


def _measure_cuda(fn, device, min_reps, max_reps, budget_s) -> Timing:
    # Estimate the per-call time from a few calls, then record events for a fixed count
    # so that no host synchronisation sits between the timed calls.
    probe = 3
    t0 = time.perf_counter()
    for _ in range(probe):
        fn()
    sync(device)
    per_call = max((time.perf_counter() - t0) / probe, 1e-6)
    reps = int(max(min_reps, min(max_reps, budget_s / per_call)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    sync(device)
    return _summarise([s.elapsed_time(e) for s, e in zip(starts, ends)])


def measure_peak_mb(fn: Callable[[], object], device: torch.device | str = "cpu", *, prime: int = 1) -> float:
    """Peak extra MiB allocated during one call of ``fn`` (see the module docstring).

    ``prime``: calls made before the measured one (under the CPU profiler); pass the
    rotation count when ``fn`` cycles through that many input sets."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile, record_function

    # Two calls under the profiler; only the second is measured, so every block it frees
    # was allocated while profiling (the profiler cannot see frees of older blocks).
    with contextlib.redirect_stdout(io.StringIO()):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(max(1, prime)):
                fn()
            with record_function(_MARK):
                fn()
    events = prof.profiler.kineto_results.events()
    mark = [e for e in events if e.name() == _MARK]
    if not mark:
        raise RuntimeError("torch.profiler recorded no marker event; cannot measure CPU memory")
    t0, t1 = mark[0].start_ns(), mark[0].end_ns()
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    current = base = peak = 0
    for e in memory:
        if e.start_ns() > t1:
            break
        current += e.nbytes()
        if e.start_ns() < t0:
            base = current
        else:
            peak = max(peak, current - base)
    return peak / 2**20


def cache_bytes(device: torch.device | str = "cpu") -> int:
    """Size of the last-level cache: GPU L2, or the largest CPU cache listed in sysfs (32 MiB if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 * 2**20


def rotation_count(bytes_per_set: int, device: torch.device | str = "cpu", *, cap: int = 8) -> int:
    """How many copies of an input set to cycle through so that one cycle spans 4 × the LLC."""
    need = 4 * cache_bytes(device)
    return int(max(1, min(cap, -(-need // max(bytes_per_set, 1)))))


def cycle(sets: Sequence[T]) -> Callable[[], T]:
    """A zero-argument function returning the next element of ``sets``, round robin."""
    it = itertools.cycle(sets)
    return lambda: next(it)
