"""Whole-file writes: a reader never sees half a file, and a crash leaves the old one."""

import json
import os


def write_atomically(path, data, mode="w"):
  """Writes `data` (str, or bytes with mode "wb") to `path` via a renamed temporary file."""
  tmp_path = path + ".tmp"
  with open(tmp_path, mode) as f:
    f.write(data)
  os.replace(tmp_path, path)


def write_json_atomically(path, value):
  write_atomically(path, json.dumps(value, indent=2))
