"""The quantization methods a run can use: `config.method` names one of `REGISTRY`.

Adding a method: write a `base.Method` subclass in its own module and add it here.
`REGISTRY` keeps the display order (fp, inq, comq, gptq, rtn).
"""

from experiments.methods import comq
from experiments.methods import fp
from experiments.methods import gptq
from experiments.methods import inq
from experiments.methods import rtn

REGISTRY = {method.name: method for method in (fp.METHOD, inq.METHOD, comq.METHOD,
                                               gptq.METHOD, rtn.METHOD)}


def get(name):
  """The registered method `name`; ValueError naming the registered ones otherwise."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown method {name!r}; expected one of {sorted(REGISTRY)}.")
  return REGISTRY[name]
