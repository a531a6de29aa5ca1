"""Post-training methods: one phase that quantizes on entry and trains no step.

The layers are quantized by `comq_jax.quantize_model` on calibration images from the
training split; each method names its layer solver and options.
"""

import itertools

import jax
import jax.numpy as jnp

from experiments.methods import base
import comq_jax
import inq_jax


def calibration_images(config, dataset, shuffle_seed):
  """The first `calibration.num_examples` training images of the seeded order
  `shuffle_seed`, with the training preprocessing, as a list of
  `calibration.batch_size` batches."""
  num, batch_size = config.calibration.num_examples, config.calibration.batch_size
  if batch_size <= 0 or num <= 0 or num % batch_size:
    raise ValueError(f"calibration.num_examples={num} must be a positive multiple of "
                     f"calibration.batch_size={batch_size}.")
  if num > dataset.num_train_examples:
    raise ValueError(f"calibration.num_examples={num} exceeds the "
                     f"{dataset.num_train_examples} training examples.")
  batches = itertools.islice(dataset.train_epoch(batch_size, shuffle_seed), num // batch_size)
  return [jnp.asarray(batch["image"]) for batch in batches]


class PostTrainingMethod(base.Method):
  """Quantizes every linear layer once, after FP training, with `comq_jax.quantize_model`.

  Subclasses set `name` (also the config block and the `method` of quantize_model),
  `label` and `solver_options`.
  """

  def solver_options(self, config) -> dict:
    """quantize_model's keyword arguments from the method's config block."""
    raise NotImplementedError

  def check(self, config):
    super().check(config)
    block = config[self.name]
    comq_jax.grid.check_options(bits=block.bits, grid=block.grid,
                                granularity=block.granularity, scalar=block.scalar,
                                group_size=block.group_size)

  def bits(self, config):
    return config[self.name].bits

  def phases(self, config, steps_per_epoch):
    del config, steps_per_epoch
    return [base.Phase(self.name, 0, None)]

  def enter(self, phase, state, context):
    config = context.config
    images = calibration_images(config, context.dataset,
                                (config.seed, context.phase_index, 0))
    # On the default device: the model runs eagerly under a method interceptor.
    variables = jax.device_put(jax.device_get(state["variables"]))
    skip = None
    if config[self.name].skip_first_last:
      paths = inq_jax.layer_paths(context.model, variables, images[0], train=False)
      ends = {paths[0], paths[-1]}
      skip = lambda path, kernel: path in ends
    result = comq_jax.quantize_model(context.model, variables, images, method=self.name,
                                     skip=skip, train=False, **self.solver_options(config))
    # JSON types, so that a run resumed from its checkpoint reports the same.
    record = {"layers": [dict(report._asdict(), shape=list(report.shape))
                         for report in result.layers],
              "skipped": result.skipped, "settings": result.settings}
    return dict(state, variables=result.variables), record

  def results(self, config, state, progress, phases):
    record = progress["records"][phases[-1].name]
    layers = [comq_jax.LayerReport(**dict(layer, shape=tuple(layer["shape"])))
              for layer in record["layers"]]
    result = comq_jax.ModelQuantization(
        variables=jax.device_get(state["variables"]), layers=layers,
        skipped=record["skipped"], settings=record["settings"])
    return {**base.size_entries(result.size_report()), "portion_accuracies": [],
            "codebook_fraction": None, "layers": record["layers"],
            "skipped_layers": record["skipped"]}
