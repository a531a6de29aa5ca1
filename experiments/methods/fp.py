"""Full precision: the FP phase alone, no quantization."""

from experiments.methods import base

METHOD = base.Method()
