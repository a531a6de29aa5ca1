"""COMQ (Zhang et al., arXiv 2403.07134): coordinate descent on each layer's Gram."""

from experiments.methods import post_training


class COMQMethod(post_training.PostTrainingMethod):
  name = "comq"
  label = "COMQ"


METHOD = COMQMethod()
