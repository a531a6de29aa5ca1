"""Logging set-up shared by the absl entry points."""

import logging as std_logging

from absl import logging
import jax


def hide_orbax_logs():
  """Drops Orbax's records from the absl log handler.

  Orbax logs every checkpoint write at INFO; this keeps the log to our progress lines.
  """
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)


def hide_backend_probe_logs():
  """Quiets JAX's backend discovery, whose INFO line about a missing ``libtpu`` opens
  every CPU or GPU run; its warnings and errors still show.

  Call before the first JAX call that picks the backends.
  """
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


def label_processes():
  """Prefixes every log line with "[process i/n] " when the job runs as several processes.

  Every process logs its progress; the label says which one speaks.
  """
  if jax.process_count() == 1:
    return
  label = f"[process {jax.process_index()}/{jax.process_count()}] "

  def add_label(record):
    record.msg = label + str(record.msg)
    return True

  logging.get_absl_handler().addFilter(add_label)
