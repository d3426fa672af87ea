"""Wall-clock timing of jitted calls, shared by the benchmark commands."""

import statistics
import time

import jax


def first_call_s(fn, args) -> float:
    """Seconds of the first call (compilation included)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_ms(fn, args, warmup: int, iters: int) -> float:
    """Median milliseconds of `iters` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def print_peak_memory(device) -> None:
    """Prints the device's peak memory in use where the backend reports it (GPU/TPU; not CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
