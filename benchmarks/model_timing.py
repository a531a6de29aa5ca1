"""Timing of ``comq_jax.quantize_model`` as the whole-model benchmarks print it."""

import contextlib
import resource
import time

import jax


@contextlib.contextmanager
def timed():
  """``with timed() as clock``: afterwards ``clock["wall"]`` and ``clock["cpu"]`` (CPU time
  over all threads of the process) hold the block's seconds."""
  clock = {}
  wall, cpu = time.perf_counter(), time.process_time()
  yield clock
  clock["wall"], clock["cpu"] = time.perf_counter() - wall, time.process_time() - cpu


def print_timings(result, clock) -> None:
  """Wall time split as ``result.timings`` splits it, CPU time, compilations, peak RSS."""
  t = result.timings
  other = clock["wall"] - t.capture_seconds - t.compile_wait_seconds - t.solve_seconds
  print(f"  wall {clock['wall']:.1f} s = capture {t.capture_seconds:.1f} s + waiting for "
        f"the capture's compilation {t.compile_wait_seconds:.1f} s + solves "
        f"{t.solve_seconds:.1f} s (two layers at a time, waits for their compilation "
        f"included) + other {other:.1f} s; compilation {t.compile_seconds:.1f} s in "
        f"background threads, overlapping the rest")
  print(f"  CPU time {clock['cpu']:.1f} s over all threads (wall time on an idle machine is "
        f"about this over the cores kept busy)")
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"  compilations {t.compilations}; peak RSS {peak_mib:.0f} MiB; "
        f"{jax.devices()[0].platform} x{jax.device_count()}, "
        f"{jax.local_devices()[0].device_kind}")
