"""Which solver quantizes which layer: ordered rules over module paths.

A rule is ``(pattern, solver)``: ``pattern`` a regular expression that must match
a layer's whole ``/``-joined module path (``re.fullmatch``, e.g. ``"head"``,
``".*attn/.*"``, ``"layers/[0-9]+/mlp/.*"``), ``solver`` a
:class:`comq_jax.solvers.Solver`, or None to keep the layer in float. The first
rule that matches wins; a layer no rule matches takes the default solver of
:func:`comq_jax.quantize_model`. This gives mixed precision and "keep the head
in float" without a hand-written predicate::

  rules = [("head", None), (".*attn/.*", comq_jax.comq(bits=4)),
           (".*mlp/.*", comq_jax.comq(bits=3))]
"""

import re
from typing import Optional, Sequence

from comq_jax import solvers

Rule = tuple  # (pattern: str, solver: Optional[solvers.Solver])


def check_rules(rules: Optional[Sequence[Rule]]) -> tuple:
  """The rules as ``((compiled pattern, solver), ...)``.

  Raises:
    ValueError: for a rule that is not a ``(pattern, solver or None)`` pair, or a
      pattern that does not compile (the message names the rule's index).
  """
  if rules is None:
    return ()
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ValueError("rules must be a sequence of (pattern, solver or None) pairs, got "
                     f"{type(rules).__name__}.")
  checked = []
  for index, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"rules[{index}] must be a (pattern, solver or None) pair, got "
                       f"{rule!r}.")
    pattern, solver = rule
    if not isinstance(pattern, str):
      raise ValueError(f"rules[{index}]: the pattern must be a string (a regular "
                       f"expression over module paths), got {pattern!r}.")
    if solver is not None and not isinstance(solver, solvers.Solver):
      raise ValueError(f"rules[{index}] ({pattern!r}): the solver must be built by "
                       f"comq_jax.comq, gptq or rtn, or be None (keep in float), got "
                       f"{type(solver).__name__}.")
    try:
      checked.append((re.compile(pattern), solver))
    except re.error as error:
      raise ValueError(f"rules[{index}]: {pattern!r} is not a regular expression: "
                       f"{error}.") from None
  return tuple(checked)


def solver_for(path: str, rules: tuple, default: solvers.Solver):
  """``(solver or None, pattern or None)``: the first rule matching ``path``
  (a ``/``-joined module path) and its pattern, else ``(default, None)``."""
  for pattern, solver in rules:
    if pattern.fullmatch(path):
      return solver, pattern.pattern
  return default, None
