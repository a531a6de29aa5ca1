"""INQ: one phase per accumulated portion of the schedule (Zhou et al., ICLR 2017).

Entering a phase partitions and quantizes (`INQ.step`); the phase then retrains the
still-float weights with a fresh optimizer (momentum and LR schedule restart), whose
updates of frozen weights are zeroed. The final portion (1.0) only quantizes: no
kernel is left to train (paper Alg. 1). Each layer's n1 comes from the trained FP
weights, at the first INQ phase.
"""

import functools
import operator

import jax

from experiments.methods import base
import inq_jax


class INQMethod(base.Method):
  """Incremental network quantization to config.inq.bits powers of two."""
  name = "inq"
  label = "INQ"

  def check(self, config):
    inq_jax.validate_schedule(config.inq.schedule)
    self.quantizer(config)

  def quantizer(self, config):
    return inq_jax.inq(config.inq.bits, strategy=config.inq.strategy)

  def bits(self, config):
    return config.inq.bits

  def init_state(self, config, params):
    return self.quantizer(config).init(params)

  def phases(self, config, steps_per_epoch):
    return [base.Phase(f"inq_{portion:g}",
                       0 if portion == 1.0 else config.inq.epochs_per_step * steps_per_epoch,
                       None if portion == 1.0 else config.inq, portion)
            for portion in inq_jax.validate_schedule(config.inq.schedule)]

  def enter(self, phase, state, context):
    quantizer = self.quantizer(context.config)
    params, inq_state = state["variables"]["params"], state["method"]
    if context.phase_index == 1:
      inq_state = quantizer.init(params)  # n1 from the trained FP weights
    params, inq_state = quantizer.step(
        params, inq_state, phase.portion,
        key=jax.random.fold_in(context.rng, context.phase_index))
    return dict(state, variables=dict(state["variables"], params=params),
                method=inq_state), None

  def frozen(self, state):
    return state["method"].frozen

  def packed_variables(self, model, state, progress, phases, example):
    """Each quantized kernel packed as its layer's view matrices (so DenseGeneral and
    grouped convs run too), n1 per layer recovered from the power-of-two values."""
    del progress, phases
    variables = jax.device_get(state["variables"])
    mask = state["method"].quantizable_mask(variables["params"])
    paths = [path for path in inq_jax.layer_paths(model, variables, example, train=False)
             if functools.reduce(operator.getitem, path.split("/"), mask)["kernel"]]
    return inq_jax.deploy.pack_layers(variables, model, example, paths,
                                      bits=state["method"].bits, grid="pow2",
                                      granularity="layer", train=False)

  def results(self, config, state, progress, phases):
    params, inq_state = state["variables"]["params"], state["method"]
    fraction = inq_jax.codebook_fraction(params, inq_state)
    if fraction != 1.0:
      raise RuntimeError(f"Only {fraction:.6f} of the quantizable weights are in the "
                         f"{inq_state.bits}-bit power-of-two codebook after the final "
                         "INQ step.")
    packed = inq_jax.deploy.pack_variables(jax.device_get(state["variables"]), inq_state)
    return {**base.size_entries(inq_jax.deploy.size_report(packed)),
            "codebook_fraction": fraction, "layers": None,
            "portion_accuracies": [
                {"phase": p.name, "portion": p.portion,
                 "accuracy": progress["accuracies"][p.name]} for p in phases[1:]]}


METHOD = INQMethod()
