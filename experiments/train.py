"""The experiment job: `train_and_evaluate(config, workdir) -> results`.

  build the task (data, model, loss, metric) -> obtain FP weights (train, or import them)
  -> quantize with the method `config.method` -> evaluate -> write results.json

The task (`experiments.tasks`) is the plug: image classification (digits, ImageNet; test
accuracy) or language modelling (`experiments.llm`; perplexity). Everything else here,
and the methods, are the same for both.

The run is a list of phases sharing one training loop: phase 0 trains (or only
evaluates) the full-precision model; the method (`experiments.methods`) adds its
phases, says what happens on entering each, and adds its entries to results.json.

Resumption: Orbax checkpoints hold the variables, the optimizer state of the phase
in progress, the method's state and the position (phase, step within phase).
Training batches are a pure function of (seed, phase, epoch), so a restarted run sees
the same data and, on CPU, ends with bitwise-identical parameters.

Multi-process runs (`jax.distributed`, started by experiments.main): the mesh spans every
process's devices, each process feeds its rows of every batch (experiments.input_pipeline),
and every process runs the same steps and saves its shards of each Orbax checkpoint.
Process 0 alone writes config.json, metrics.jsonl, results.json and the packed model file.
"""

import copy
import json
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments import files
from experiments import llm_export
from experiments import methods
from experiments import tasks
from experiments.methods import base
import inq_jax
import quant_core


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(hparams, steps_per_epoch):
  """SGD + momentum (or AdamW), weight decay on kernels, one step LR decay, frozen
  updates zeroed.

  hparams.optimizer: "sgd" (L2 weight decay added to the gradient, then SGD with
  momentum) or "adamw" (Adam with decoupled weight decay, Loshchilov & Hutter, 2019:
  the decay is added to Adam's update and scaled by the learning rate).
  Weight decay applies to Conv/Dense kernels only (Caffe's decay_mult 0 for biases;
  BN parameters undecayed). Every phase uses INQ's frozen-update mask (the mask is an
  argument of the update, nothing is frozen outside INQ's phases), so the FP phase
  runs the same computation, and gives the same FP model, for every method.
  """
  decay_step = hparams.lr_decay_epoch * steps_per_epoch
  learning_rates = jnp.array([hparams.learning_rate,
                              hparams.learning_rate * hparams.lr_decay_factor], jnp.float32)
  # Written out since optax's piecewise schedule mixes int and float dtypes, which
  # strict dtype promotion rejects.
  schedule = lambda count: learning_rates[(count >= decay_step).astype(jnp.int32)]
  decay = optax.add_decayed_weights(hparams.weight_decay, mask=quant_core.quantizable_mask)
  optimizer = hparams.get("optimizer", "sgd")
  if optimizer == "sgd":
    return inq_jax.inq_optimizer(optax.chain(decay, optax.sgd(schedule,
                                                              momentum=hparams.momentum)))
  if optimizer == "adamw":
    return inq_jax.inq_optimizer(optax.chain(optax.scale_by_adam(), decay,
                                             optax.scale_by_learning_rate(schedule)))
  raise ValueError(f"optimizer={optimizer!r}; expected one of {OPTIMIZERS}.")


def make_train_step(task, optimizer, distillation=None):
  """Jitted optimizer step of `state` ({"variables", "opt_state", ...}) on a batch.

  The frozen mask is an argument (data), so one compiled step serves every phase
  whose optimizer has the same settings.

  distillation: None, or (alpha, temperature): the loss adds
  alpha * T^2 * KL(teacher || student) of the softmaxes at temperature T, the teacher
  being state["teacher"] (variables) in evaluation mode (Hinton et al., 2015).
  """

  def loss_fn(params, others, batch, teacher):
    inputs = task.inputs(batch)
    logits, updates = task.forward({"params": params, **others}, inputs, train=True,
                                   mutable=list(others))
    loss, accuracy = task.loss(logits, batch)
    if distillation is not None:
      alpha, temperature = distillation
      teacher_logits = jax.lax.stop_gradient(task.forward(teacher, inputs, train=False)[0])
      kl = optax.losses.kl_divergence(jax.nn.log_softmax(logits / temperature),
                                      jax.nn.softmax(teacher_logits / temperature))
      loss = loss + alpha * temperature**2 * kl.mean()
    return loss, (accuracy, updates)

  @jax.jit
  def train_step(state, frozen, batch):
    variables = state["variables"]
    others = {k: v for k, v in variables.items() if k != "params"}
    (loss, (accuracy, others)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], others, batch, state.get("teacher"))
    # Standard promotion: optax's Adam raises an int step count to a float power, which
    # strict promotion (the test suite's) rejects.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(grads, state["opt_state"], variables["params"],
                                            frozen=frozen)
    params = optax.apply_updates(variables["params"], updates)
    # The updated parameters too, so that a diverged state is never checkpointed.
    finite = jnp.isfinite(loss) & jnp.all(jnp.array(
        [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))
    new_state = dict(state, variables={"params": params, **others}, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}

  return train_step


def make_eval_step(task, apply_fn=None):
  """Jitted masked metric sums (`task.eval_sums`) of `apply_fn(variables, inputs) ->
  logits`, by default the task's model in evaluation mode."""
  if apply_fn is None:
    apply_fn = lambda variables, inputs: task.forward(variables, inputs, train=False)[0]

  @jax.jit
  def eval_step(variables, batch):
    return task.eval_sums(apply_fn(variables, task.inputs(batch)), batch)
  return eval_step


def evaluate(task, eval_step, variables, dataset, batch_size, batch_sharding):
  """The task's metric over the eval set (test accuracy, or perplexity), each process
  feeding its rows of every batch.

  The counts of a batch sharded over all processes are global already; with a sharding
  local to each process (the packed model on one device per process) they are summed
  over the processes.
  """
  counts = np.zeros(2)
  for batch in dataset.eval_batches(batch_size):
    counts += [float(count) for count in eval_step(
        variables, jax.make_array_from_process_local_data(batch_sharding, batch))]
  if batch_sharding.is_fully_addressable and jax.process_count() > 1:
    # Gathered as float32 (JAX's default), exact for counts below 2**24.
    counts = np.asarray(multihost_utils.process_allgather(counts), np.float64).sum(axis=0)
  return task.summarize(counts)


def with_keys_of(tree, template):
  """``tree`` with the dict keys of ``template`` where they differ only in type.

  A checkpoint restored without a template (`final_variables`) names the integer key 0
  of an NNX list of blocks "0"; anything else that differs is left for the caller's
  structure check.
  """
  if not (isinstance(tree, dict) and isinstance(template, dict)):
    return tree
  if set(tree) == set(template):
    return {key: with_keys_of(tree[key], template[key]) for key in tree}
  if {str(key) for key in template} != set(tree):
    return tree
  return {key: with_keys_of(tree[str(key)], template[key]) for key in template}


def is_writer():
  """Whether this process writes the run's files (one process does: process 0)."""
  return jax.process_index() == 0


class Trainer:
  """The pieces of one run that every phase shares: task (model, data), mesh, method, steps.

  Compiled train steps are cached by what they depend on: the optimizer settings.
  """

  def __init__(self, config, workdir, task, mesh, fp_variables=None):
    self.config, self.workdir, self.task = config, workdir, task
    dataset = self.dataset = task.dataset
    self.fp_variables, self.mesh = fp_variables, mesh
    self.method = methods.get(config.method)
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.batch_sharding = jax.sharding.NamedSharding(mesh,
                                                     jax.sharding.PartitionSpec("batch"))
    self.steps_per_epoch = dataset.num_train_examples // config.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size {config.batch_size} exceeds the "
                       f"{dataset.num_train_examples} training examples.")
    fp_phase = base.fp_phase(config, self.steps_per_epoch)
    if fp_variables is not None or not task.trains_fp:
      # Given or pretrained: phase 0 only evaluates them.
      fp_phase = fp_phase._replace(num_steps=0, hparams=None)
    self.phases = [fp_phase] + self.method.phases(config, self.steps_per_epoch)
    self.rng = jax.random.key(config.seed)
    self.eval_step = make_eval_step(task)
    self._train_steps = {}

  def optimizer(self, phase_index):
    """The optimizer of a phase that trains, else None."""
    hparams = self.phases[phase_index].hparams
    return None if hparams is None else make_optimizer(hparams, self.steps_per_epoch)

  def train_step(self, phase_index):
    hparams = self.phases[phase_index].hparams
    key = hparams.to_json()
    if key not in self._train_steps:
      distillation = None
      if phase_index > 0 and self.method.distills(self.config):
        distillation = (hparams.distill_alpha, hparams.distill_temperature)
      self._train_steps[key] = make_train_step(self.task, self.optimizer(phase_index),
                                               distillation)
    return self._train_steps[key]

  def initial_state(self):
    """{"variables", "method"}: FP weights (initialised or imported) and method state.

    The task imports config.init_checkpoint (timm, torchvision, GGUF or safetensors
    weights): every variable converted, or an error naming the key, before anything is
    written.
    """
    variables = self.task.init_variables(self.rng)
    if self.fp_variables is not None:
      fp_variables = with_keys_of(self.fp_variables, variables)
      if jax.tree.structure(fp_variables) != jax.tree.structure(variables):
        raise ValueError("fp_variables do not have the structure of the model's variables.")
      variables = jax.tree.map(jnp.asarray, fp_variables)
    else:
      imported = self.task.import_weights(variables)
      if imported is not None:
        variables = imported
    state = {"variables": variables}
    if self.method.distills(self.config):
      # The FP weights once the method's first phase begins; here for the structure
      # of the state (checkpoint restore).
      state["teacher"] = variables
    method_state = self.method.init_state(self.config, variables["params"])
    if method_state is not None:
      state["method"] = method_state
    return state

  def with_optimizer(self, state, phase_index):
    """`state` with a fresh optimizer state for the phase (none if it trains no step)."""
    state = {k: v for k, v in state.items() if k != "opt_state"}
    optimizer = self.optimizer(min(phase_index, len(self.phases) - 1))
    if optimizer is not None:
      state["opt_state"] = optimizer.init(state["variables"]["params"])
    return jax.device_put(state, self.replicated)

  def enter(self, state, progress):
    """Enters phase progress["phase"]: the method quantizes; returns the new state."""
    phase = self.phases[progress["phase"]]
    start = time.time()
    context = base.Context(self.config, self.task, self.dataset, self.rng,
                           progress["phase"], self.mesh)
    state, record = self.method.enter(phase, state, context)
    if record is not None:
      progress["records"][phase.name] = record
    logging.info("%s: quantized on entry in %.1fs", phase.name, time.time() - start)
    return self.with_optimizer(state, progress["phase"])

  def evaluate(self, variables):
    return evaluate(self.task, self.eval_step, variables, self.dataset,
                    self.config.eval_batch_size, self.batch_sharding)


class MetricsWindow:
  """Train metrics since the last log line: checks them for NaN/inf and logs means."""

  def __init__(self, workdir):
    self.path, self.metrics, self.start = os.path.join(workdir, "metrics.jsonl"), [], time.time()

  def flush(self, phase, progress):
    if not self.metrics:
      return
    losses = np.asarray(jnp.stack([m["loss"] for m in self.metrics]))
    finite = np.asarray(jnp.stack([m["finite"] for m in self.metrics]))
    if not np.all(finite):
      bad = int(np.argmin(finite))
      raise FloatingPointError(
          f"Non-finite loss or parameters at training step "
          f"{progress['global_step'] - len(losses) + bad + 1} (phase {phase.name}, loss "
          f"{losses[bad]}); the last good checkpoint in {os.path.dirname(self.path)} "
          "is kept.")
    record = {"type": "train", "phase": progress["phase"], "phase_name": phase.name,
              "step_in_phase": progress["step_in_phase"],
              "global_step": progress["global_step"], "loss": float(losses.mean()),
              "accuracy": float(np.mean([m["accuracy"] for m in self.metrics])),
              "steps_per_second": len(losses) / (time.time() - self.start)}
    if is_writer():
      files.append_jsonl(self.path, record)
    logging.info("%s step %d/%d: loss %.4f, accuracy %.4f, %.1f steps/s", phase.name,
                 progress["step_in_phase"], phase.num_steps, record["loss"],
                 record["accuracy"], record["steps_per_second"])
    self.metrics, self.start = [], time.time()


def train_phase(trainer, state, progress, save, steps_this_run):
  """Runs the remaining steps of phase progress["phase"], checkpointing on the way.

  Returns (state, steps_this_run, stopped): stopped when config.stop_after_steps ran.
  """
  config, phase = trainer.config, trainer.phases[progress["phase"]]
  window = MetricsWindow(trainer.workdir)
  frozen = jax.device_put(trainer.method.frozen(state), trainer.replicated)
  while progress["step_in_phase"] < phase.num_steps:
    train_step = trainer.train_step(progress["phase"])
    epoch, batch_in_epoch = divmod(progress["step_in_phase"], trainer.steps_per_epoch)
    for batch in trainer.dataset.train_epoch(
        config.batch_size, (config.seed, progress["phase"], epoch), batch_in_epoch):
      state, metrics = train_step(state, frozen, jax.make_array_from_process_local_data(
          trainer.batch_sharding, batch))
      window.metrics.append(metrics)
      progress["step_in_phase"] += 1
      progress["global_step"] += 1
      steps_this_run += 1
      step = progress["step_in_phase"]
      at_checkpoint = step % config.checkpoint_every_steps == 0
      stopping = steps_this_run == config.stop_after_steps
      if step % config.log_every_steps == 0 or at_checkpoint or stopping or (
          step == phase.num_steps):
        window.flush(phase, progress)
      if at_checkpoint or stopping:
        save(state)
      if stopping:
        return state, steps_this_run, True
      if step == phase.num_steps:
        break
  return state, steps_this_run, False


def check_same_config(workdir, config_json):
  """A workdir holds one run: resuming it with a different config is an error.

  stop_after_steps is exempt: it only decides when this process stops. Every process
  checks; process 0 writes config.json for a new run.
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config_json)
  if not os.path.exists(path):
    if is_writer():
      files.write_json_atomically(path, current)
    return
  with open(path) as f:
    saved = json.load(f)
  saved.pop("stop_after_steps")
  current.pop("stop_after_steps")
  if saved != current:
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise ValueError(f"{workdir} holds a run with a different config (fields {changed} "
                     "differ); use another --workdir to start a new run.")


def make_mesh(config):
  """1-D batch mesh over config.num_devices devices (0: all, of every process).

  The devices are ordered by process, so that each process's rows of a batch are one
  contiguous block (experiments.input_pipeline.process_rows). Batch sizes are checked.
  """
  devices = sorted(jax.devices(), key=lambda device: device.process_index)
  if config.num_devices > len(devices):
    raise ValueError(f"num_devices={config.num_devices} but only {len(devices)} "
                     "devices.")
  if jax.process_count() > 1 and config.num_devices not in (0, len(devices)):
    raise ValueError(f"num_devices={config.num_devices}: a run of {jax.process_count()} "
                     f"processes uses all their {len(devices)} devices (num_devices 0 or "
                     f"{len(devices)}).")
  mesh = jax.sharding.Mesh(np.array(devices[:config.num_devices or len(devices)]),
                           ("batch",))
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % mesh.devices.size:
      raise ValueError(f"{name}={config[name]} must be divisible by the "
                       f"{mesh.devices.size} devices it is sharded over (set num_devices "
                       "or the batch size).")
  return mesh


def restore(manager, trainer, state):
  """(state, progress) of the newest checkpoint, or of a fresh run when there is none."""
  progress = {"phase": 0, "step_in_phase": 0, "global_step": 0, "evaluations": {},
              "records": {}, "seconds": {}}
  step = manager.latest_step()
  if step is None:
    return trainer.with_optimizer(state, 0), progress
  progress = manager.restore(step, args=ocp.args.Composite(
      progress=ocp.args.JsonRestore()))["progress"]
  # The optimizer state has the structure of the phase in progress.
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          trainer.with_optimizer(state, progress["phase"]))
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))["state"]
  logging.info("Resumed from checkpoint %d: %s", step, progress)
  return jax.device_put(state, trainer.replicated), progress


def train_and_evaluate(config, workdir, *, fp_variables=None):
  """Runs (or resumes) the experiment `config` in `workdir` and returns the results dict.

  fp_variables: trained FP variables (e.g. `final_variables` of an FP run) to start
  from; phase 0 then only evaluates them. Sweeps use it to share one FP model.

  Returns None when the run stops early because of `config.stop_after_steps`, and on
  every process but process 0, which alone writes the results.
  """
  methods.get(config.method).check(config)
  # Data and model first: an unprepared dataset, or a model or checkpoint that cannot be
  # used, stops the run before anything is written.
  task = tasks.create_task(config, jax.process_index(), jax.process_count())
  methods.get(config.method).check_task(config, task)
  mesh = make_mesh(config)
  trainer = Trainer(config, workdir, task, mesh, fp_variables)
  # Imported before the workdir is made, so that a bad checkpoint leaves nothing behind.
  initial_state = trainer.initial_state()
  os.makedirs(workdir, exist_ok=True)
  check_same_config(workdir, config.to_json())
  logging.info("%d devices, %d training examples, %d steps/epoch, phases %s",
               mesh.devices.size, task.dataset.num_train_examples, trainer.steps_per_epoch,
               [(p.name, p.num_steps) for p in trainer.phases])

  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep,
                                         create=True)
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                             options=options) as manager:
    state, progress = restore(manager, trainer, initial_state)

    def save(state):
      # A copy: the save may finish in the background while training moves progress on.
      manager.save((manager.latest_step() or 0) + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          progress=ocp.args.JsonSave(copy.deepcopy(progress))))

    steps_this_run = 0
    seconds = progress.setdefault("seconds", {})

    def timed(name, start):  # wall time of this run and of those before it
      seconds[name] = seconds.get(name, 0.0) + time.time() - start

    while progress["phase"] < len(trainer.phases):
      phase = trainer.phases[progress["phase"]]
      start = time.time()
      state, steps_this_run, stopped = train_phase(trainer, state, progress, save,
                                                   steps_this_run)
      if phase.num_steps:
        timed(f"{phase.name}/train", start)
      if stopped:
        manager.wait_until_finished()
        logging.info("Stopping after %d steps (stop_after_steps).", steps_this_run)
        return None
      start = time.time()
      value = trainer.evaluate(state["variables"])
      timed(f"{phase.name}/evaluate", start)
      progress["evaluations"][phase.name] = value
      if is_writer():
        files.append_jsonl(os.path.join(workdir, "metrics.jsonl"), {
            "type": "eval", "phase": progress["phase"], "phase_name": phase.name,
            "portion": phase.portion, "global_step": progress["global_step"],
            task.metric: value})
      logging.info("%s: test %s %.4f", phase.name, task.metric, value)
      progress["phase"] += 1
      progress["step_in_phase"] = 0
      if progress["phase"] < len(trainer.phases):
        start = time.time()
        state = trainer.enter(state, progress)
        timed(f"{trainer.phases[progress['phase']].name}/quantize", start)
      save(state)
    manager.wait_until_finished()
  return write_results(trainer, workdir, state, progress)


def latest_checkpoint(workdir):
  """(state, progress) of the newest checkpoint `train_and_evaluate` wrote in `workdir`."""
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints")) as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), progress=ocp.args.JsonRestore()))
  return restored["state"], restored["progress"]


def final_variables(workdir):
  """The variables of the newest checkpoint `train_and_evaluate` wrote in `workdir`
  (the final ones, once the run has finished)."""
  return latest_checkpoint(workdir)[0]["variables"]


# The packed model of every quantized run (quant_core.deploy.files schema).
PACKED_MODEL_FILE = "packed_model.safetensors"


def write_results(trainer, workdir, state, progress):
  """Writes the packed model file, evaluates it if asked, writes the export of
  `config.export` for a language model (workdir/gptq_checkpoint, experiments.llm_export)
  and writes results.json.

  Every process packs and evaluates; process 0 writes and returns the results, the
  others return None.

  Keys common to every method: config_name, dataset, model, method, bits, seed, the
  task's metric of the FP model, of the final model and of the packed model (with
  eval_packed, else None): fp_accuracy, final_accuracy and packed_accuracy for images,
  fp_perplexity, perplexity and packed_perplexity for language models; seconds (wall
  time per phase and part: "fp/train", "fp/evaluate", "comq/quantize", ..., "pack" and,
  with an export, "export"), packed_file_bytes (the size of
  workdir/packed_model.safetensors), fp32_file_bytes (a safetensors file of the same
  variables in float32) and packed_memory_bytes (the packed variables in memory, padding
  included); the last three are None for FP. The
  method adds its sizes (fp32_bytes, packed_bytes, codebook_bytes, entropy_bytes) and
  its own keys (portion_accuracies or portion_perplexities, codebook_fraction, layers,
  ...).
  """
  config, method, task = trainer.config, trainer.method, trainer.task
  start = time.time()
  packed = method.packed_variables(task, state, progress, trainer.phases)
  seconds = dict(progress["seconds"], pack=time.time() - start)
  packed_value = None
  if config.eval_packed:
    # One device per process: the Pallas kernel is not partitioned over the batch mesh.
    device = jax.local_devices()[0]
    model = task.bound(state["variables"])[0]
    apply_fn = lambda v, inputs: quant_core.deploy.packed_apply(model, v, inputs,
                                                             **task.apply_kwargs)
    start = time.time()
    packed_value = evaluate(task, make_eval_step(task, apply_fn),
                            jax.device_put(packed, device), trainer.dataset,
                            config.eval_batch_size, jax.sharding.SingleDeviceSharding(device))
    seconds["packed/evaluate"] = time.time() - start
    logging.info("packed model through quantized_matmul: test %s %.4f", task.metric,
                 packed_value)
  if not is_writer():
    return None
  sizes = dict(packed_file_bytes=None, fp32_file_bytes=None, packed_memory_bytes=None)
  if packed is not None:
    sizes = dict(
        packed_file_bytes=quant_core.deploy.save_packed(
            os.path.join(workdir, PACKED_MODEL_FILE), packed),
        fp32_file_bytes=quant_core.deploy.fp32_file_bytes(state["variables"]),
        packed_memory_bytes=quant_core.deploy.size_report(packed).packed_bytes)
  if config.dataset == "text" and config.export is not None:
    start = time.time()
    directory = llm_export.export_run(config, task.model.config, state["variables"],
                                      packed, workdir)
    seconds["export"] = time.time() - start
    logging.info("%s checkpoint written to %s", config.export, directory)
  evaluations = progress["evaluations"]
  fp_key, final_key, packed_key = task.result_keys[:3]
  results = {
      "config_name": config.name,
      "dataset": config.dataset,
      "model": config.model.name,
      "method": config.method,
      "bits": method.bits(config),
      "seed": config.seed,
      fp_key: evaluations["fp"],
      final_key: evaluations[trainer.phases[-1].name],
      packed_key: packed_value,
      "seconds": seconds,
      **sizes,
      **method.results(task, state, progress, trainer.phases, packed),
  }
  files.write_json_atomically(os.path.join(workdir, "results.json"), results)
  return results
