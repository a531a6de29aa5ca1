"""Post-training methods: one phase that quantizes on entry and trains no step.

The layers are quantized by `comq_jax.quantize_model` on calibration images from the
training split, with the solver of the method's config block (`solver`: built here, in
one place, from the block's fields).
"""

import dataclasses
import functools
import itertools
import operator
import re

from absl import logging
import jax
import jax.numpy as jnp

from experiments.methods import base
import comq_jax
from comq_jax import bit_allocation
from comq_jax import rules as rules_lib
from comq_jax import solvers
import quant_core
from quant_core import capture
from quant_core import paths as paths_lib


def require_one_process(process_count):
  """Raises NotImplementedError for a multi-process run: calibration images come from
  one process (each process would calibrate on its own rows and quantize differently)."""
  if process_count > 1:
    raise NotImplementedError(
        f"Calibration images (config.calibration) come from one process, and this run has "
        f"{process_count}; multi-process runs support the methods that use none (fp, and "
        "inq without compensation or sensitivity_power).")


def calibration_devices(config, mesh) -> dict:
  """`mesh` and `microbatch` keyword arguments of the calibration (comq_jax): the run's
  mesh when config.calibration.microbatch is set, else none (one device)."""
  microbatch = config.calibration.microbatch
  if microbatch is None:
    return {}
  try:
    capture.check_data_options(None, microbatch)
  except ValueError as error:
    raise ValueError(f"calibration.{error}") from None
  if config.calibration.batch_size % microbatch:
    raise ValueError(f"calibration.microbatch={microbatch} must divide "
                     f"calibration.batch_size={config.calibration.batch_size}.")
  return dict(mesh=mesh, microbatch=microbatch)


def calibration_inputs(config, task, dataset, shuffle_seed):
  """The model inputs (`task.inputs`) of the first `calibration.num_examples` training
  examples of the seeded order `shuffle_seed` (images with the training preprocessing,
  or token windows), as a list of `calibration.batch_size` batches."""
  num, batch_size = config.calibration.num_examples, config.calibration.batch_size
  require_one_process(dataset.process_count)
  if batch_size <= 0 or num <= 0 or num % batch_size:
    raise ValueError(f"calibration.num_examples={num} must be a positive multiple of "
                     f"calibration.batch_size={batch_size}.")
  if num > dataset.num_train_examples:
    raise ValueError(f"calibration.num_examples={num} exceeds the "
                     f"{dataset.num_train_examples} training examples.")
  batches = itertools.islice(dataset.train_epoch(batch_size, shuffle_seed), num // batch_size)
  return [jnp.asarray(task.inputs(batch)) for batch in batches]


def first_and_last_layers(model, variables, image, num_classes):
  """The layers that `skip_first_last` keeps in float: the input layer and the classifier(s).

  The input layer is the first linear layer called (a CNN's stem conv; a ViT's or Swin's
  patch-embedding conv `patch_embed/proj`). The classifiers are the layers called last
  whose kernels output the `num_classes` logits: `fc` of a ResNet, `head` of a ViT,
  `head/fc` of Swin, and both `head` and `head_dist` of a distilled DeiT, whose logits are
  the mean of its two heads (the official COMQ code quantizes every nn.Linear but the
  classifier and never the patch-embedding conv, comq.md §2).

  Args:
    model: the linen model.
    variables: its variables.
    image: one calibration batch (shapes only are used).
    num_classes: outputs of the classifier(s).
  Returns:
    The set of `/`-joined layer paths.
  """
  paths = quant_core.layer_paths(model, variables, image, train=False)
  params = variables["params"]
  ends = {paths[0], paths[-1]}
  for path in reversed(paths):
    kernel = functools.reduce(operator.getitem, path.split("/"), params)["kernel"]
    if kernel.shape[-1] != num_classes:
      break
    ends.add(path)
  return ends


# Fields of a method's config block that are not solver settings: the driver's inputs
# (and blocks), the recipe's skip_first_last and the mixed-precision allocation.
DRIVER_FIELDS = ("inputs", "skip_first_last", "blocks", "bit_budget", "bit_choices",
                 "sensitivity")
SENSITIVITIES = ("rtn", "solver", "fisher")


def solver(config, name):
  """The solver of method `name` (comq, gptq or rtn) from its config block: every
  field but DRIVER_FIELDS is a setting of `comq_jax.comq`, `gptq` or `rtn`."""
  block = config[name].to_dict()
  settings = {key: value for key, value in block.items() if key not in DRIVER_FIELDS}
  try:
    return solvers.SOLVERS[name](**settings)
  except ValueError as error:
    raise ValueError(f"{name}.{error}") from None


def _with_kernels(variables, source, layer_paths):
  """``variables`` with the kernels of ``layer_paths`` taken from ``source``."""
  params = jax.tree.map(lambda leaf: leaf, variables["params"],
                        is_leaf=quant_core.deploy.packed_layers.is_packed_kernel)
  for path in layer_paths:
    keys = path.split("/") if path else ()
    paths_lib.get(params, keys)["kernel"] = paths_lib.get(source["params"], keys)["kernel"]
  return dict(variables, params=params)


def fisher_examples(config, task, dataset, shuffle_seed):
  """The calibration examples (the first `calibration.num_examples` of the seeded order, as
  `calibration_inputs` draws them) one at a time, as whole batches (inputs and labels or
  next tokens), for the per-example Fisher."""
  batches = dataset.train_epoch(1, shuffle_seed)
  return list(itertools.islice(batches, config.calibration.num_examples))


def task_loss(task, variables):
  """``loss_fn(params, batch)``: the task's training loss of the model with ``params``
  (and the other collections of ``variables``) in evaluation mode."""
  def loss_fn(params, batch):
    logits = task.forward(dict(variables, params=params), task.inputs(batch), train=False)[0]
    return task.loss(logits, batch)[0]
  return loss_fn


def allocate(block, method_solver, model, variables, calibration, rules, apply_kwargs,
             fisher=None):
  """The mixed-precision allocation of a method block with `bit_budget` set: layer
  objectives at each of `bit_choices` from the FP model's Grams (`sensitivity` "rtn":
  round-to-nearest on the method's grid; "solver": the method's own solver), or the
  round-to-nearest loss increase weighted by the diagonal empirical Fisher ("fisher":
  `fisher` is ``(loss_fn, params, examples)`` of `comq_jax.bit_allocation.fisher_diagonal`),
  then the exact knapsack of `comq_jax.bit_allocation.allocate_bits`. Layers that `rules`
  keep in float are left out."""
  checked = rules_lib.check_rules(rules or None)
  grams = quant_core.layer_grams(model, variables, calibration, **apply_kwargs)
  matrices = bit_allocation.layer_matrices(model, variables, calibration[0], **apply_kwargs)
  matrices = {path: mats for path, mats in matrices.items()
              if path in grams and rules_lib.solver_for(path, checked, method_solver)[0]}
  measure = method_solver
  if block.sensitivity in ("rtn", "fisher"):
    measure = solvers.rtn(method_solver.bits, grid=method_solver.grid,
                          granularity=method_solver.granularity,
                          group_size=method_solver.group_size,
                          scalar=method_solver.scalar)
  if block.sensitivity == "fisher":
    loss_fn, params, examples = fisher
    by_kernel = bit_allocation.fisher_diagonal(loss_fn, params, examples, list(matrices))
    triple = bit_allocation.objectives_from_fisher(
        bit_allocation.fisher_matrices(model, variables, calibration[0], by_kernel,
                                       **apply_kwargs),
        matrices, measure, tuple(block.bit_choices))
  else:
    triple = bit_allocation.objectives_from_grams(grams, matrices, measure,
                                                  tuple(block.bit_choices))
  allocation = bit_allocation.allocate_bits(*triple, budget=block.bit_budget)
  counts = {bits: list(allocation.bits.values()).count(bits)
            for bits in sorted(set(allocation.bits.values()))}
  logging.info("Mixed precision at %.3f bits per weight (asked %.3f): layers per width %s",
               allocation.average_bits, block.bit_budget, counts)
  return allocation


class PostTrainingMethod(base.Method):
  """Quantizes every linear layer once, after FP training, with `comq_jax.quantize_model`.

  Subclasses set `name` (also the config block and the solver) and `label`.
  """

  def check(self, config):
    super().check(config)
    require_one_process(jax.process_count())  # before any training
    calibration_devices(config, None)
    method_solver = solver(config, self.name)
    block = config[self.name]
    if block.grid == "offset":
      raise ValueError(
          f"{self.name}.grid='offset' has no packed form, and every run writes its packed "
          "model: use grid='signed' (GGUF Q4_0) or 'symmetric', or quantize with the "
          "library (comq_jax solvers with grid='offset', then "
          "experiments.llm_gguf.export_model) for GGUF Q4_1.")
    if block.bit_budget is not None:
      if block.sensitivity not in SENSITIVITIES:
        raise ValueError(f"{self.name}.sensitivity must be one of {SENSITIVITIES}, got "
                         f"{block.sensitivity!r}.")
      try:
        for bits in bit_allocation.check_bit_choices(block.bit_choices):
          dataclasses.replace(method_solver, bits=bits)
      except ValueError as error:
        raise ValueError(f"{self.name}.bit_choices: {error}") from None
      if block.inputs != "fp":
        raise ValueError(f"{self.name}.bit_budget needs {self.name}.inputs='fp' (the "
                         "layer sensitivities are measured on the FP model's inputs), got "
                         f"{block.inputs!r}.")

  def check_task(self, config, task):
    if config[self.name].skip_first_last and task.skip_first_last_error:
      raise ValueError(f"{self.name}.skip_first_last {task.skip_first_last_error}")

  def bits(self, config):
    return config[self.name].bits

  def phases(self, config, steps_per_epoch):
    del config, steps_per_epoch
    return [base.Phase(self.name, 0, None)]

  def enter(self, phase, state, context):
    config, task = context.config, context.task
    calibration = calibration_inputs(config, task, context.dataset,
                                     (config.seed, context.phase_index, 0))
    # Gathered on one device; with calibration.microbatch, quantize_model spreads the
    # calibration and the solves over the mesh itself.
    model, variables = task.bound(jax.device_put(jax.device_get(state["variables"])))
    rules = list(task.float_rules())
    skip_first_last = config[self.name].skip_first_last
    if skip_first_last is None:
      skip_first_last = task.skips_first_last()
    if skip_first_last:
      ends = first_and_last_layers(model, variables, calibration[0],
                                   config.model.num_classes)
      rules += [(re.escape(path), None) for path in sorted(ends)]
    inputs = config[self.name].inputs
    method_solver = solver(config, self.name)
    allocation = None
    if config[self.name].bit_budget is not None:
      fisher = None
      if config[self.name].sensitivity == "fisher":
        state_variables = jax.device_put(jax.device_get(state["variables"]))
        fisher = (task_loss(task, state_variables), state_variables["params"],
                  fisher_examples(config, task, context.dataset,
                                  (config.seed, context.phase_index, 0)))
      allocation = allocate(config[self.name], method_solver, model, variables,
                            calibration, rules, task.apply_kwargs, fisher=fisher)
      rules += allocation.rules(method_solver)
    result = comq_jax.quantize_model(model, variables, calibration,
                                     method_solver, rules=rules or None,
                                     inputs=inputs, blocks=config[self.name].blocks,
                                     progress=config.progress and jax.process_index() == 0,
                                     **task.apply_kwargs,
                                     **calibration_devices(config, context.mesh))
    # JSON types, so that a run resumed from its checkpoint reports the same.
    record = {"layers": [report.record() for report in result.layers],
              "skipped": [entry._asdict() for entry in result.skipped],
              "settings": method_solver.settings(), "inputs": inputs}
    if allocation is not None:
      record["allocation"] = allocation.record()
    return dict(state, variables=result.variables), record

  def quantization(self, state, progress, phases):
    """The run's `comq_jax.ModelQuantization`, rebuilt from its record (a resumed run
    has only the record)."""
    record = progress["records"][phases[-1].name]
    layer_solver = solvers.from_settings(record["settings"])
    # Mixed precision: each layer's own bit width on the method's grid.
    layers = [comq_jax.LayerReport.from_record(
        layer, dataclasses.replace(layer_solver, bits=layer["bits"]))
              for layer in record["layers"]]
    return comq_jax.ModelQuantization(
        variables=jax.device_get(state["variables"]), layers=layers,
        skipped=[comq_jax.SkippedLayer(**entry) for entry in record["skipped"]],
        inputs=record["inputs"])

  def packed_variables(self, task, state, progress, phases):
    """The checkpointed weights packed by recovering each layer's grid from its
    values: a run resumed after its quantization holds the weights, not the codes
    (`quant_core.deploy.pack_layers`; the same codes where the solver uses its lowest
    level, the same values always)."""
    result = self.quantization(state, progress, phases)
    model = task.bound(result.variables)[0]
    by_bits = {}
    for report in result.layers:
      by_bits.setdefault(report.solver.bits, {})[report.path] = report.matrices
    packed = None
    # One pass per bit width (mixed precision), each on the float kernels; the packed
    # kernels of every pass are then gathered into one tree.
    for bits, layer_paths in by_bits.items():
      layer_solver = next(report.solver for report in result.layers
                          if report.solver.bits == bits)
      packed_now = quant_core.deploy.pack_layers(
          result.variables, model, task.example, layer_paths, bits=bits,
          grid=layer_solver.grid, granularity=layer_solver.granularity,
          group_size=layer_solver.group_size,
          progress=task.config.progress and jax.process_index() == 0, **task.apply_kwargs)
      packed = packed_now if packed is None else _with_kernels(packed, packed_now,
                                                               layer_paths)
    return packed

  def results(self, task, state, progress, phases, packed):
    del packed  # The sizes come from the quantization record, as size_report counts them.
    record = progress["records"][phases[-1].name]
    result = self.quantization(state, progress, phases)
    return {**base.size_entries(result.size_report()), task.result_keys[3]: [],
            "codebook_fraction": None, "layers": record["layers"],
            "skipped_layers": record["skipped"]}
