"""Progress of long per-layer work: a log line per layer, and an optional bar.

Quantizing or packing a large model takes minutes, most of it compilation. Each
layer done gets an INFO line on the caller's logger (standard :mod:`logging`),
and with ``progress=True`` a ``tqdm`` bar over the layers (on stderr) shows the
layer just finished.
"""

import logging
from typing import Optional


def check_enabled(progress) -> bool:
  """``progress`` if it is a bool, else ValueError."""
  if not isinstance(progress, bool):
    raise ValueError(f"progress must be True or False, got {progress!r}.")
  return progress


class LayerProgress:
  """Counts finished layers: logs each and, when enabled, advances a bar.

  Use as a context manager, so that the bar is closed when the work stops
  (finished or failed).

  Args:
    logger: where each layer's line goes (INFO).
    total: the number of layers.
    description: the bar's label, e.g. ``"COMQ"`` or ``"packing"``.
    enabled: show the ``tqdm`` bar.
  """

  def __init__(self, logger: logging.Logger, total: int, description: str,
               enabled: bool = False):
    self._logger = logger
    self._bar = None
    if check_enabled(enabled):
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, desc=description, unit="layer", leave=True)

  def layer_done(self, message: str, *args, label: Optional[str] = None) -> None:
    """Logs ``message % args`` and advances the bar, showing ``label``."""
    if self._bar is not None:
      self._bar.clear()  # the log line prints above the bar, not through it
    self._logger.info(message, *args, stacklevel=2)
    if self._bar is not None:
      if label:
        self._bar.set_postfix_str(label, refresh=False)
      self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
