"""Logging set-up shared by the absl entry points."""

from absl import logging
import jax


def hide_orbax_logs():
  """Drops Orbax's records from the absl log handler.

  Orbax logs every checkpoint write at INFO; this keeps the log to our progress lines.
  """
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)


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
