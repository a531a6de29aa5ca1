"""Round-to-nearest on the COMQ grids: the data-free baseline (errors still measured)."""

from experiments.methods import post_training


class RoundToNearestMethod(post_training.PostTrainingMethod):
  name = "rtn"
  label = "RTN"


METHOD = RoundToNearestMethod()
