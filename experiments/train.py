"""The experiment job: `train_and_evaluate(config, workdir) -> results`.

  build model and data -> obtain FP weights (train, or import torchvision weights)
  -> quantize with `config.method` -> evaluate -> write results.json

The run is a list of phases sharing one training loop: phase 0 trains (or just evaluates)
the full-precision model; each INQ portion is one more phase that partitions and quantizes
on entry (`quantizer.step`), retrains the still-float weights with a fresh optimizer
(momentum and LR schedule restart, as in the paper) and evaluates at the end.

Resumption: Orbax checkpoints hold the variables, optimizer and INQ state plus the
position (phase, step within phase). Training batches are a pure function of
(seed, phase, epoch), so a restarted run sees the same data and, on CPU, ends with
bitwise-identical parameters.
"""

import json
import math
import os
import time
from typing import NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments import input_pipeline
from experiments import models
from experiments import torchvision_import
import inq_jax


class Phase(NamedTuple):
  """One stretch of training with its own optimizer.

  name: "fp" or "inq_<portion>". portion: accumulated INQ portion quantized on entry, or
  None for full precision. num_steps: training steps after entry. hparams: the config
  block holding the optimizer settings (config.fp or config.inq).
  """
  name: str
  portion: Optional[float]
  num_steps: int
  hparams: ml_collections.ConfigDict


def fp_phase(config, steps_per_epoch):
  return Phase("fp", None, config.fp.num_epochs * steps_per_epoch, config.fp)


def inq_phases(config, steps_per_epoch):
  """One phase per portion; the last (1.0) only quantizes: no kernel is left to train."""
  schedule = inq_jax.validate_schedule(config.inq.schedule)
  return [Phase(f"inq_{portion:g}", portion,
                0 if portion == 1.0 else config.inq.epochs_per_step * steps_per_epoch,
                config.inq) for portion in schedule]


# Quantization methods: name -> phases that follow the FP phase. Post-training methods
# (rtn, comq) will be phases with num_steps 0 that quantize on entry.
METHODS = {
    "fp": lambda config, steps_per_epoch: [],
    "inq": inq_phases,
}


def method_bits(config):
  return 32 if config.method == "fp" else config.inq.bits


def make_optimizer(hparams, steps_per_epoch, frozen):
  """SGD + momentum, weight decay on kernels, step LR decay; frozen updates zeroed.

  Weight decay applies to Conv/Dense kernels only (Caffe's decay_mult 0 for biases; BN
  parameters undecayed). The frozen mask is all False in the FP phase.
  """
  decay_step = hparams.lr_decay_epoch * steps_per_epoch
  learning_rates = jnp.array([hparams.learning_rate,
                              hparams.learning_rate * hparams.lr_decay_factor], jnp.float32)
  # One step decay; written out since optax's piecewise schedule mixes int and float
  # dtypes, which strict dtype promotion rejects.
  schedule = lambda count: learning_rates[(count >= decay_step).astype(jnp.int32)]
  inner = optax.chain(
      optax.add_decayed_weights(hparams.weight_decay,
                                mask=inq_jax.quantizable_mask(frozen)),
      optax.sgd(schedule, momentum=hparams.momentum))
  return inq_jax.inq_optimizer(inner, frozen)


def make_train_step(model, optimizer):
  """Jitted SGD step. The frozen mask lives in the optimizer state, so one compiled step
  serves every INQ phase that shares the same hyper-parameters."""

  def loss_fn(params, batch_stats, batch):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                  batch["image"], train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (logits, updates["batch_stats"])

  @jax.jit
  def train_step(state, batch):
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.float32)
    # The updated parameters too, so that a diverged state is never checkpointed.
    finite = jnp.isfinite(loss) & jnp.all(jnp.array(
        [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))
    new_state = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}

  return train_step


def make_eval_step(model):
  @jax.jit
  def eval_step(params, batch_stats, batch):
    logits = model.apply({"params": params, "batch_stats": batch_stats},
                         batch["image"], train=False)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(correct * batch["mask"]), jnp.sum(batch["mask"])
  return eval_step


def evaluate(eval_step, state, dataset, batch_size, batch_sharding):
  correct, count = 0.0, 0.0
  for batch in dataset.eval_batches(batch_size):
    batch_correct, batch_count = eval_step(
        state["params"], state["batch_stats"], jax.device_put(batch, batch_sharding))
    correct += float(batch_correct)
    count += float(batch_count)
  return correct / count


def packed_model_bytes(variables, bits, quantizable):
  """Bytes of the model stored with `bits`-bit quantizable kernels, FP32 elsewhere.

  ceil(bits * n / 8) per quantizable leaf + 4 bytes per other float element
  (biases, BN parameters and running statistics). bits=32 gives the FP32 size.
  """
  total = 0
  for leaf, is_quantizable in zip(jax.tree.leaves(variables), jax.tree.leaves(quantizable)):
    total += math.ceil(bits * leaf.size / 8) if is_quantizable else 4 * leaf.size
  return total


def write_json_atomically(path, value):
  tmp_path = path + ".tmp"
  with open(tmp_path, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp_path, path)


def append_metrics(workdir, record):
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")


def check_same_config(workdir, config_json):
  """A workdir holds one run: resuming it with a different config is an error.

  stop_after_steps is exempt: it only decides when this process stops.
  """
  path = os.path.join(workdir, "config.json")
  current = json.loads(config_json)
  if not os.path.exists(path):
    write_json_atomically(path, current)
    return
  with open(path) as f:
    saved = json.load(f)
  saved.pop("stop_after_steps")
  current.pop("stop_after_steps")
  if saved != current:
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    raise ValueError(f"{workdir} holds a run with a different config (fields {changed} "
                     "differ); use another --workdir to start a new run.")


def make_mesh(num_devices):
  devices = jax.local_devices()
  if num_devices > len(devices):
    raise ValueError(f"num_devices={num_devices} but only {len(devices)} local devices.")
  return jax.sharding.Mesh(np.array(devices[:num_devices or len(devices)]), ("batch",))


def check_divisible(name, batch_size, num_devices):
  if batch_size % num_devices:
    raise ValueError(f"{name}={batch_size} must be divisible by the {num_devices} devices "
                     "it is sharded over (set num_devices or the batch size).")


def train_and_evaluate(config, workdir):
  """Runs (or resumes) the experiment `config` in `workdir` and returns the results dict.

  Returns None when the run stops early because of `config.stop_after_steps`.
  """
  os.makedirs(workdir, exist_ok=True)
  check_same_config(workdir, config.to_json())
  mesh = make_mesh(config.num_devices)
  num_devices = mesh.devices.size
  check_divisible("batch_size", config.batch_size, num_devices)
  check_divisible("eval_batch_size", config.eval_batch_size, num_devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

  dataset = input_pipeline.create_dataset(config)
  steps_per_epoch = dataset.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {config.batch_size} exceeds the "
                     f"{dataset.num_train_examples} training examples.")
  if config.method not in METHODS:
    raise ValueError(f"Unknown method {config.method!r}; expected one of {sorted(METHODS)}.")
  phases = [fp_phase(config, steps_per_epoch)] + METHODS[config.method](config, steps_per_epoch)
  quantizer = inq_jax.inq(config.inq.bits, strategy=config.inq.strategy)
  logging.info("%d devices, %d training examples, %d steps/epoch, phases %s", num_devices,
               dataset.num_train_examples, steps_per_epoch,
               [(p.name, p.num_steps) for p in phases])

  model = models.create_model(config.model.name, config.model.num_classes)
  rng = jax.random.key(config.seed)
  variables = jax.jit(lambda key: model.init(
      key, jnp.zeros((1,) + dataset.image_shape, jnp.float32), train=False))(rng)
  if config.init_checkpoint:
    logging.info("Importing torchvision weights from %s", config.init_checkpoint)
    variables = torchvision_import.import_torchvision(config.init_checkpoint, variables)
  params = variables["params"]
  inq_state = quantizer.init(params)
  state = {"params": params, "batch_stats": variables["batch_stats"],
           "opt_state": make_optimizer(phases[0].hparams, steps_per_epoch,
                                       inq_state.frozen).init(params),
           "inq_state": inq_state}
  state = jax.device_put(state, replicated)
  progress = {"phase": 0, "step_in_phase": 0, "global_step": 0, "accuracies": {}}

  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep,
                                         create=True)
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                             options=options) as manager:
    if manager.latest_step() is not None:
      abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
      state, progress = restored["state"], restored["progress"]
      logging.info("Resumed from checkpoint %d: %s", manager.latest_step(), progress)

    def save():
      manager.save((manager.latest_step() or 0) + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))

    eval_step = make_eval_step(model)
    train_steps = {}  # compiled train step per optimizer group (fp / inq)
    steps_this_run = 0
    while progress["phase"] < len(phases):
      phase = phases[progress["phase"]]
      optimizer = make_optimizer(phase.hparams, steps_per_epoch, state["inq_state"].frozen)
      optimizer_group = "fp" if phase.portion is None else "inq"
      if optimizer_group not in train_steps:
        train_steps[optimizer_group] = make_train_step(model, optimizer)
      train_step = train_steps[optimizer_group]
      window_start, window_metrics = time.time(), []

      def flush(step_in_phase):
        """Checks the losses since the last flush; logs their means."""
        if not window_metrics:
          return
        losses = np.asarray(jnp.stack([m["loss"] for m in window_metrics]))
        finite = np.asarray(jnp.stack([m["finite"] for m in window_metrics]))
        if not np.all(finite):
          bad = int(np.argmin(finite))
          bad_step = progress["global_step"] - len(losses) + bad + 1
          raise FloatingPointError(
              f"Non-finite loss or parameters at training step {bad_step} (phase "
              f"{phase.name}, loss {losses[bad]}); the last good checkpoint in {workdir} "
              "is kept.")
        record = {"type": "train", "phase": progress["phase"], "phase_name": phase.name,
                  "step_in_phase": step_in_phase, "global_step": progress["global_step"],
                  "loss": float(losses.mean()),
                  "accuracy": float(np.mean([m["accuracy"] for m in window_metrics])),
                  "steps_per_second": len(losses) / (time.time() - window_start)}
        append_metrics(workdir, record)
        logging.info("%s step %d/%d: loss %.4f, accuracy %.4f, %.1f steps/s", phase.name,
                     step_in_phase, phase.num_steps, record["loss"], record["accuracy"],
                     record["steps_per_second"])
        window_metrics.clear()

      while progress["step_in_phase"] < phase.num_steps:
        epoch, batch_in_epoch = divmod(progress["step_in_phase"], steps_per_epoch)
        for batch in dataset.train_epoch(config.batch_size,
                                         (config.seed, progress["phase"], epoch),
                                         batch_in_epoch):
          state, metrics = train_step(state, jax.device_put(batch, batch_sharding))
          window_metrics.append(metrics)
          progress["step_in_phase"] += 1
          progress["global_step"] += 1
          steps_this_run += 1
          step_in_phase = progress["step_in_phase"]
          at_checkpoint = step_in_phase % config.checkpoint_every_steps == 0
          stopping = steps_this_run == config.stop_after_steps
          if (step_in_phase % config.log_every_steps == 0 or at_checkpoint or stopping
              or step_in_phase == phase.num_steps):
            flush(step_in_phase)
            window_start = time.time()
          if at_checkpoint or stopping:
            save()
          if stopping:
            manager.wait_until_finished()
            logging.info("Stopping after %d steps (stop_after_steps).", steps_this_run)
            return None
          if step_in_phase == phase.num_steps:
            break

      accuracy = evaluate(eval_step, state, dataset, config.eval_batch_size, batch_sharding)
      progress["accuracies"][phase.name] = accuracy
      append_metrics(workdir, {"type": "eval", "phase": progress["phase"],
                               "phase_name": phase.name, "portion": phase.portion,
                               "global_step": progress["global_step"], "accuracy": accuracy})
      logging.info("%s: test accuracy %.4f", phase.name, accuracy)

      progress["phase"] += 1
      progress["step_in_phase"] = 0
      if progress["phase"] < len(phases):
        next_phase = phases[progress["phase"]]
        if next_phase.portion is not None:
          params, inq_state = state["params"], state["inq_state"]
          if progress["phase"] == 1:
            inq_state = quantizer.init(params)  # n1 from the trained FP weights
          params, inq_state = quantizer.step(
              params, inq_state, next_phase.portion,
              key=jax.random.fold_in(rng, progress["phase"]))
          state = dict(state, params=params, inq_state=inq_state)
        state["opt_state"] = make_optimizer(next_phase.hparams, steps_per_epoch,
                                            state["inq_state"].frozen).init(state["params"])
        state = jax.device_put(state, replicated)
      save()
    manager.wait_until_finished()

  return write_results(config, workdir, phases, state, progress["accuracies"])


def write_results(config, workdir, phases, state, accuracies):
  """Checks the codebook, computes sizes and writes results.json atomically."""
  bits = method_bits(config)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  quantizable = {"params": inq_jax.quantizable_mask(state["params"]),
                 "batch_stats": jax.tree.map(lambda _: False, state["batch_stats"])}
  codebook_fraction = None
  if config.method == "inq":
    codebook_fraction = inq_jax.codebook_fraction(state["params"], state["inq_state"], bits)
    if codebook_fraction != 1.0:
      raise RuntimeError(f"Only {codebook_fraction:.6f} of the quantizable weights are in "
                         f"the {bits}-bit power-of-two codebook after the final INQ step.")
  results = {
      "config_name": config.name,
      "dataset": config.dataset,
      "model": config.model.name,
      "method": config.method,
      "bits": bits,
      "seed": config.seed,
      "fp_accuracy": accuracies["fp"],
      "final_accuracy": accuracies[phases[-1].name],
      "portion_accuracies": [{"phase": p.name, "portion": p.portion,
                              "accuracy": accuracies[p.name]} for p in phases[1:]],
      "codebook_fraction": codebook_fraction,
      "packed_bytes": packed_model_bytes(variables, bits, quantizable),
      "fp32_bytes": packed_model_bytes(variables, 32, quantizable),
  }
  write_json_atomically(os.path.join(workdir, "results.json"), results)
  return results
