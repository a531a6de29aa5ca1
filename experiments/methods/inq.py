"""INQ: one phase per accumulated portion of the schedule (Zhou et al., ICLR 2017).

Entering a phase partitions and quantizes (`INQ.step`); the phase then retrains the
still-float weights with a fresh optimizer (momentum and LR schedule restart), whose
updates of frozen weights are zeroed. The final portion (1.0) only quantizes: no
kernel is left to train (paper Alg. 1). Each layer's n1 comes from the trained FP
weights, at the first INQ phase.

The options of config.inq for less retraining (configs/base.py): compensated steps and
sensitivity-aware portions from the Grams of the calibration images under the current
weights; distillation from the FP weights, kept as state["teacher"]; training what INQ
leaves in float after the final step; BatchNorm statistics re-estimated after it.
"""

import itertools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments.methods import base
from experiments.methods import post_training
import inq_jax
import quant_core
from quant_core import paths


class INQMethod(base.Method):
  """Incremental network quantization to config.inq.bits powers of two."""
  name = "inq"
  label = "INQ"

  def check(self, config):
    inq_jax.validate_schedule(config.inq.schedule)
    if self.quantizer(config).data_aware:
      post_training.require_one_process(jax.process_count())  # before any training
      post_training.calibration_devices(config, None)

  def quantizer(self, config):
    options = config.inq.compensation
    compensation = None
    if options.choose or options.correct:
      compensation = inq_jax.Compensation(
          choose=options.choose, correct=options.correct, damp=options.damp,
          sweeps=options.sweeps, cg_iterations=options.cg_iterations)
    return inq_jax.inq(config.inq.bits, strategy=config.inq.strategy,
                       compensation=compensation,
                       sensitivity_power=config.inq.sensitivity_power)

  def distills(self, config):
    return config.inq.distill_alpha > 0

  def bits(self, config):
    return config.inq.bits

  def init_state(self, config, params):
    return self.quantizer(config).init(params)

  def phases(self, config, steps_per_epoch):
    def epochs(portion):
      return config.inq.final_epochs if portion == 1.0 else config.inq.epochs_per_step
    return [base.Phase(f"inq_{portion:g}", epochs(portion) * steps_per_epoch,
                       config.inq if epochs(portion) else None, portion)
            for portion in inq_jax.validate_schedule(config.inq.schedule)]

  def enter(self, phase, state, context):
    config = context.config
    quantizer = self.quantizer(config)
    params, inq_state = state["variables"]["params"], state["method"]
    if context.phase_index == 1:
      inq_state = quantizer.init(params)  # n1 from the trained FP weights
      if self.distills(config):
        state = dict(state, teacher=state["variables"])
    statistics = None
    if quantizer.data_aware:
      statistics = layer_statistics(context, state["variables"])
    params, inq_state = quantizer.step(
        params, inq_state, phase.portion,
        key=jax.random.fold_in(context.rng, context.phase_index), statistics=statistics)
    variables = dict(state["variables"], params=params)
    if phase.portion == 1.0 and config.inq.bn_recalibration_batches:
      variables = recalibrate_batch_stats(context.task, variables, config,
                                          context.dataset, context.phase_index)
    return dict(state, variables=variables, method=inq_state), None

  def frozen(self, state):
    return state["method"].frozen

  def packed_variables(self, task, state, progress, phases):
    """Each quantized kernel packed as its layer's view matrices (so DenseGeneral and
    grouped convs run too), encoded under the layer's n1 from the INQ state."""
    del progress, phases
    variables = jax.device_get(state["variables"])
    return inq_jax.pack_model(task.bound(variables)[0], variables, state["method"],
                              task.example, **task.apply_kwargs)

  def results(self, task, state, progress, phases, packed):
    params, inq_state = state["variables"]["params"], state["method"]
    fraction = inq_jax.codebook_fraction(params, inq_state)
    if fraction != 1.0:
      raise RuntimeError(f"Only {fraction:.6f} of the quantizable weights are in the "
                         f"{inq_state.bits}-bit power-of-two codebook after the final "
                         "INQ step.")
    return {**base.size_entries(quant_core.deploy.size_report(packed)),
            "codebook_fraction": fraction, "layers": None,
            "zero_fractions": zero_fractions(params, inq_state),
            task.result_keys[3]: [
                {"phase": p.name, "portion": p.portion,
                 task.metric: progress["evaluations"][p.name]} for p in phases[1:]]}


def zero_fractions(params, inq_state):
  """{kernel path: share of its weights that are exactly zero} of the quantized leaves."""
  mask = inq_state.quantizable_mask(params)
  return {paths.path_name(path):
          float(np.mean(np.asarray(leaf) == 0))
          for (path, leaf), selected in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                            jax.tree.leaves(mask), strict=True)
          if selected}


def layer_statistics(context, variables):
  """``{path: inq_jax.LayerStatistics}`` of the calibration images under `variables`."""
  config, task = context.config, context.task
  inputs = post_training.calibration_inputs(config, task, context.dataset,
                                            (config.seed, context.phase_index, 0))
  model, variables = task.bound(jax.device_put(jax.device_get(variables)))
  return inq_jax.layer_statistics(model, variables, inputs, **task.apply_kwargs,
                                  **post_training.calibration_devices(config, context.mesh))


def recalibrate_batch_stats(task, variables, config, dataset, phase_index):
  """`variables` with BatchNorm running statistics re-estimated: forward passes in
  training mode over config.inq.bn_recalibration_batches training batches (the
  layers' own running-average momentum); no parameter changes. Models without
  batch_stats are returned as they are."""
  if "batch_stats" not in variables:
    logging.info("bn_recalibration_batches: the model has no batch_stats; nothing to do.")
    return variables
  others = {k: v for k, v in variables.items() if k != "batch_stats"}

  @jax.jit
  def forward(batch_stats, images):
    _, updates = task.forward({**others, "batch_stats": batch_stats}, images, train=True,
                              mutable=["batch_stats"])
    return updates["batch_stats"]

  batch_stats = variables["batch_stats"]
  batches = itertools.islice(
      dataset.train_epoch(config.batch_size, (config.seed, phase_index, 1)),
      config.inq.bn_recalibration_batches)
  for batch in batches:
    batch_stats = forward(batch_stats, jnp.asarray(task.inputs(batch)))
  return {**variables, "batch_stats": batch_stats}


METHOD = INQMethod()
