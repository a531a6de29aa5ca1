"""`python -m experiments.compare_runs DIR_A DIR_B`: are two runs the same run?

Compares the results.json of two workdirs field by field (wall-clock fields left out:
they differ between any two runs) and their final checkpoints leaf by leaf, bitwise.
For refactors that must not change behaviour: run a config before and after the change
with the same seed, then compare. Exits 1 when the checkpoints differ.
"""

import json
import os
import sys

import jax
import numpy as np

from experiments import train
from quant_core import paths

# Wall-clock measurements: never equal between two runs.
TIMING_FIELDS = ("seconds", "wall_seconds", "train_seconds", "steps_per_second")


def results_differences(a, b, path=""):
  """``[(field path, value in a, value in b)]`` of two results.json trees."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      if key.endswith(TIMING_FIELDS):
        continue
      out += results_differences(a.get(key), b.get(key), f"{path}/{key}")
    return out
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in
            results_differences(x, y, f"{path}[{i}]")]
  return [] if a == b else [(path, a, b)]


def checkpoint_differences(dir_a, dir_b):
  """Paths of the final-checkpoint leaves that differ (tree, shape, dtype or bits)."""
  state_a, _ = train.latest_checkpoint(dir_a)
  state_b, _ = train.latest_checkpoint(dir_b)
  leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(state_a)
  leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(state_b)
  if tree_a != tree_b:
    return ["<tree structure>"]
  return [paths.path_name(path) for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True)
          if np.asarray(x).dtype != np.asarray(y).dtype
          or not np.array_equal(np.asarray(x), np.asarray(y))]


def main(argv):
  if len(argv) != 3:
    print(__doc__.splitlines()[0])
    return 2
  dir_a, dir_b = argv[1:]
  read = lambda d: json.load(open(os.path.join(d, "results.json"), encoding="utf-8"))
  fields = results_differences(read(dir_a), read(dir_b))
  leaves = checkpoint_differences(dir_a, dir_b)
  print(f"results.json: {len(fields)} fields differ" + "".join(
      f"\n  {path}: {a!r} -> {b!r}" for path, a, b in fields))
  print(f"final checkpoint: {'bitwise equal' if not leaves else 'differs at ' + ', '.join(leaves)}")
  return 1 if leaves else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
