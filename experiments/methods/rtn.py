"""Round-to-nearest on the COMQ grids: the data-free baseline (errors still measured)."""

from experiments.methods import post_training


class RoundToNearestMethod(post_training.PostTrainingMethod):
  name = "rtn"
  label = "RTN"

  def solver_options(self, config):
    block = config.rtn
    return dict(bits=block.bits, grid=block.grid, granularity=block.granularity,
                group_size=block.group_size, scalar=block.scalar)


METHOD = RoundToNearestMethod()
