"""GPTQ (Frantar et al., ICLR 2023) on the same Grams and grids as COMQ: the baseline."""

from experiments.methods import post_training


class GPTQMethod(post_training.PostTrainingMethod):
  name = "gptq"
  label = "GPTQ"


METHOD = GPTQMethod()
