"""GPTQ (Frantar et al., ICLR 2023) on the same Grams and grids as COMQ: the baseline."""

from experiments.methods import post_training


class GPTQMethod(post_training.PostTrainingMethod):
  name = "gptq"
  label = "GPTQ"

  def solver_options(self, config):
    block = config.gptq
    return dict(bits=block.bits, grid=block.grid, granularity=block.granularity,
                group_size=block.group_size, scalar=block.scalar,
                block_size=block.block_size, damp=block.damp, act_order=block.act_order,
                static_groups=block.static_groups)


METHOD = GPTQMethod()
