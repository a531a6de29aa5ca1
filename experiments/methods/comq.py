"""COMQ (Zhang et al., arXiv 2403.07134): coordinate descent on each layer's Gram."""

from experiments.methods import post_training


class COMQMethod(post_training.PostTrainingMethod):
  name = "comq"
  label = "COMQ"

  def solver_options(self, config):
    block = config.comq
    return dict(bits=block.bits, iters=block.iters, order=block.order,
                scale_update=block.scale_update, scalar=block.scalar, grid=block.grid,
                granularity=block.granularity, group_size=block.group_size,
                init=block.init, inputs=block.inputs)


METHOD = COMQMethod()
