"""Logging set-up shared by the absl entry points."""

from absl import logging


def hide_orbax_logs():
  """Drops Orbax's records from the absl log handler.

  Orbax logs every checkpoint write at INFO; this keeps the log to our progress lines.
  """
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
