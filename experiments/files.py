"""File writes shared by the experiments.

`write_atomically`: a reader never sees half a file, and a crash leaves the old one.
`append_jsonl`: one JSON record per line at the end of a log (sweep_status.jsonl).
"""

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


def append_jsonl(path, record):
  """Appends `record` to the JSON-lines file `path` as one line, flushed on return."""
  with open(path, "a") as f:  # closing the file flushes the line
    f.write(json.dumps(record) + "\n")
