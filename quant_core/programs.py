"""Compiled programs shared by the Gram capture and the layer solves.

:class:`Programs` compiles ahead of time in background threads, one program per
key, so that later layers' solves compile while earlier work runs;
:func:`count_compilations` counts XLA compilations in a block.
"""

import concurrent.futures
import contextlib
import os
import threading
import time

import jax
import jax.numpy as jnp


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
  """``with ... as n``: ``n[0]`` counts the XLA compilations inside the block."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    count[0] += event == _COMPILE_EVENT

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


class Programs:
  """Ahead-of-time compiled programs, one per key.

  ``submit`` compiles in background threads (XLA compilation releases the
  GIL), so the solves of later layers compile while the Grams are captured
  and earlier layers are solved; ``get`` waits for a program. Tracing time
  counts as compile time too. ``program_bytes`` keeps, per kind of key
  (``key[0]``), the largest program's buffers as XLA assigns them.
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
    self._futures = {}
    self._lock = threading.Lock()
    self.compile_seconds = 0.0
    self.wait_seconds = 0.0
    self.program_bytes = {}

  def _compile(self, kind, lowered):
    start = time.perf_counter()
    program = lowered.compile()
    memory = program.memory_analysis()
    with self._lock:
      self.compile_seconds += time.perf_counter() - start
      if memory is not None:
        footprint = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                     + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        self.program_bytes[kind] = max(self.program_bytes.get(kind, 0), footprint)
    return program

  def submit(self, key, fn, *args, donate_argnums=()):
    """Traces ``fn`` for arguments shaped (and, on a mesh, sharded) like
    ``args`` (here: tracing is not thread-safe for every Flax transform) and
    starts compiling it."""
    if key not in self._futures:
      shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          jnp.shape(a), jnp.result_type(a), sharding=_mesh_sharding(a)), args)
      lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*shapes)
      self._futures[key] = self._pool.submit(self._compile, key[0], lowered)

  def get(self, key, fn, *args, donate_argnums=()):
    """The program of ``key`` (compiled from ``fn`` if never submitted)."""
    self.submit(key, fn, *args, donate_argnums=donate_argnums)
    start = time.perf_counter()
    program = self._futures[key].result()
    self.wait_seconds += time.perf_counter() - start
    return program

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._pool.shutdown(wait=True, cancel_futures=True)
    return False


def _mesh_sharding(a):
  """``a``'s sharding if it is over a mesh, else None (the default device)."""
  sharding = getattr(a, "sharding", None)
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def signature(*trees):
  """A hashable key of the structure, shapes and dtypes of some pytrees of arrays
  (or shape-dtype structs)."""
  leaves, treedef = jax.tree.flatten(trees)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)
