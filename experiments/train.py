"""The experiment job: `train_and_evaluate(config, workdir) -> results`.

  build model and data -> obtain FP weights (train, or import torchvision weights)
  -> quantize with `config.method` -> evaluate -> write results.json

The run is a list of phases sharing one training loop: phase 0 trains (or just evaluates)
the full-precision model; each later phase quantizes on entry, trains for its steps (if
any) and evaluates at the end:
  inq:  one phase per portion: partition and quantize (`quantizer.step`), then retrain the
        still-float weights with a fresh optimizer (momentum and LR schedule restart).
  comq: one phase, no training: `comq_jax.quantize_model` on calibration images from the
        training split; the per-layer COMQ and round-to-nearest errors are recorded.
  rtn:  one phase, no training: `comq_jax.round_to_nearest` of every Conv/Dense kernel.

Resumption: Orbax checkpoints hold the variables, optimizer and INQ state plus the
position (phase, step within phase). Training batches are a pure function of
(seed, phase, epoch), so a restarted run sees the same data and, on CPU, ends with
bitwise-identical parameters.
"""

import itertools
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

from experiments import files
from experiments import input_pipeline
from experiments import models
from experiments import torchvision_import
import comq_jax
import inq_jax


class Phase(NamedTuple):
  """One stretch of training with its own optimizer.

  name: "fp", "inq_<portion>", "comq" or "rtn". kind: what happens on entry: "fp"
  (nothing), "inq", "comq" or "rtn" (quantize). portion: accumulated INQ portion
  quantized on entry (INQ only). num_steps: training steps after entry. hparams: the
  config block holding the optimizer settings (config.fp or config.inq).
  """
  name: str
  kind: str
  portion: Optional[float]
  num_steps: int
  hparams: ml_collections.ConfigDict


def fp_phase(config, steps_per_epoch):
  return Phase("fp", "fp", None, config.fp.num_epochs * steps_per_epoch, config.fp)


def inq_phases(config, steps_per_epoch):
  """One phase per portion; the last (1.0) only quantizes: no kernel is left to train."""
  schedule = inq_jax.validate_schedule(config.inq.schedule)
  return [Phase(f"inq_{portion:g}", "inq", portion,
                0 if portion == 1.0 else config.inq.epochs_per_step * steps_per_epoch,
                config.inq) for portion in schedule]


def post_training_phase(method):
  """Post-training methods: one phase that quantizes on entry and trains no step."""
  return lambda config, steps_per_epoch: [Phase(method, method, None, 0, config.fp)]


# Quantization methods: name -> phases that follow the FP phase.
METHODS = {
    "fp": lambda config, steps_per_epoch: [],
    "inq": inq_phases,
    "comq": post_training_phase("comq"),
    "rtn": post_training_phase("rtn"),
}


def method_bits(config):
  """Bit width of the quantized kernels (32 for fp); config.<method>.bits otherwise."""
  return 32 if config.method == "fp" else config[config.method].bits


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


def make_eval_step(apply_fn):
  """Jitted masked accuracy counts of `apply_fn(variables, images) -> logits`."""
  @jax.jit
  def eval_step(variables, batch):
    logits = apply_fn(variables, batch["image"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(correct * batch["mask"]), jnp.sum(batch["mask"])
  return eval_step


def evaluate(eval_step, variables, dataset, batch_size, batch_sharding):
  correct, count = 0.0, 0.0
  for batch in dataset.eval_batches(batch_size):
    batch_correct, batch_count = eval_step(variables, jax.device_put(batch, batch_sharding))
    correct += float(batch_correct)
    count += float(batch_count)
  return correct / count


def model_variables(state):
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def calibration_images(config, dataset, shuffle_seed):
  """COMQ calibration inputs: the first `comq.num_calibration_examples` training images
  of the seeded order `shuffle_seed`, with the training preprocessing, as a list of
  `comq.calibration_batch_size` batches."""
  num, batch_size = config.comq.num_calibration_examples, config.comq.calibration_batch_size
  if batch_size <= 0 or num <= 0 or num % batch_size:
    raise ValueError(f"comq.num_calibration_examples={num} must be a positive multiple of "
                     f"comq.calibration_batch_size={batch_size}.")
  if num > dataset.num_train_examples:
    raise ValueError(f"comq.num_calibration_examples={num} exceeds the "
                     f"{dataset.num_train_examples} training examples.")
  batches = itertools.islice(dataset.train_epoch(batch_size, shuffle_seed), num // batch_size)
  return [jnp.asarray(batch["image"]) for batch in batches]


def comq_quantize(comq_config, model, variables, images):
  """COMQ of every Conv/Dense kernel (first and last too unless skip_first_last).

  Returns (params, layers): the quantized params and one JSON-ready dict per layer.
  """
  skip = None
  if comq_config.skip_first_last:
    paths = comq_jax.layer_paths(model, variables, images[0], train=False)
    ends = {paths[0], paths[-1]}
    skip = lambda path, kernel: path in ends
  quantized, reports = comq_jax.quantize_model(
      model, variables, images, bits=comq_config.bits, iters=comq_config.iters,
      order=comq_config.order, scale_update=comq_config.scale_update,
      scalar=comq_config.scalar, grid=comq_config.grid,
      granularity=comq_config.granularity, skip=skip, inputs=comq_config.inputs,
      train=False)
  layers = [{"path": r.path, "shape": list(r.shape), "bits": r.bits,
             "comq_error": r.error, "rtn_error": r.rtn_error, "seconds": r.seconds}
            for r in reports]
  return quantized["params"], layers


def rtn_quantize(rtn_config, params):
  """Round-to-nearest of every quantizable kernel (inq_jax.quantizable_mask: every
  Conv/Dense kernel) on its (kh*kw*cin, cout) matrix view: one grid per output channel."""
  def leaf(w, selected):
    if not selected:
      return w
    result = comq_jax.round_to_nearest(
        w.reshape(-1, w.shape[-1]), bits=rtn_config.bits, grid=rtn_config.grid,
        granularity=rtn_config.granularity, scalar=rtn_config.scalar)
    return result.weights.reshape(w.shape)
  return jax.tree.map(leaf, params, inq_jax.quantizable_mask(params))


def quantized_mask(config, params, layers):
  """Which params leaves hold quantized kernels after the method ran (bool pytree)."""
  if config.method == "comq":
    paths = {layer["path"] for layer in layers}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (path[-1].key == "kernel"
                         and "/".join(k.key for k in path[:-1]) in paths), params)
  if config.method == "fp":
    return jax.tree.map(lambda _: False, params)
  return inq_jax.quantizable_mask(params)


# Per-channel (or per-layer) grid parameters stored beside the codes, in bytes: float32
# scale and zero point (asymmetric), float32 scale (symmetric), int32 n1 (pow2).
GRID_PARAMETER_BYTES = {"asymmetric": 8, "symmetric": 4, "pow2": 4}


def grid_levels(bits, grid):
  """Number of levels of a `bits`-bit `grid`, read off `comq_jax.make_grid`."""
  return comq_jax.make_grid(jnp.ones((1, 2), jnp.float32), bits=bits, grid=grid).units.shape[-1]


def model_sizes(config, variables, inq_state, quantized):
  """Bytes of the final model: the one place that sizes every method.

  Returns {"fp32_bytes", "packed_bytes", "codebook_bytes", "entropy_bytes"}:
  * inq: `inq_jax.pack_params` + `inq_jax.size_report` on the real packed codes (padding
    and per-layer n1 included); codebook_bytes = log2(2^(bits-1)+1) bits per weight,
    entropy_bytes = empirical code entropy (`SizeReport`).
  * comq / rtn: ceil(bits * n / 8) code bytes per quantized kernel plus its grid
    parameters per output channel (one set for granularity "layer",
    GRID_PARAMETER_BYTES); codebook_bytes uses log2(levels) bits per weight; no
    entropy_bytes (None).
  * fp: packed = codebook = fp32.
  Leaves that are not quantized (biases, BatchNorm, batch_stats) count in their own dtype.
  """
  if config.method == "inq":
    packed = dict(variables, params=inq_jax.pack_params(
        variables["params"], inq_state, config.inq.bits))
    report = inq_jax.size_report(packed)
    return {"fp32_bytes": report.fp32_bytes, "packed_bytes": report.packed_bytes,
            "codebook_bytes": report.codebook_bytes, "entropy_bytes": report.entropy_bytes}
  quantized = {"params": quantized,
               "batch_stats": jax.tree.map(lambda _: False, variables["batch_stats"])}
  fp32 = packed = codebook = 0
  for leaf, is_quantized in zip(jax.tree.leaves(variables), jax.tree.leaves(quantized)):
    fp32 += 4 * leaf.size
    if not is_quantized:
      packed += leaf.size * leaf.dtype.itemsize
      codebook += leaf.size * leaf.dtype.itemsize
      continue
    block = config[config.method]
    grids = 1 if block.granularity == "layer" else leaf.shape[-1]
    grid_bytes = grids * GRID_PARAMETER_BYTES[block.grid]
    packed += math.ceil(block.bits * leaf.size / 8) + grid_bytes
    codebook += leaf.size * math.log2(grid_levels(block.bits, block.grid)) / 8 + grid_bytes
  return {"fp32_bytes": fp32, "packed_bytes": packed, "codebook_bytes": codebook,
          "entropy_bytes": None}


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
  if config.method not in METHODS:
    raise ValueError(f"Unknown method {config.method!r}; expected one of {sorted(METHODS)}.")
  if config.eval_packed and config.method != "inq":
    raise ValueError(f"eval_packed needs method 'inq' (power-of-two kernels), got "
                     f"{config.method!r}.")
  # Data first: an unprepared dataset stops the run before anything is written.
  dataset = input_pipeline.create_dataset(config)
  os.makedirs(workdir, exist_ok=True)
  check_same_config(workdir, config.to_json())
  mesh = make_mesh(config.num_devices)
  num_devices = mesh.devices.size
  check_divisible("batch_size", config.batch_size, num_devices)
  check_divisible("eval_batch_size", config.eval_batch_size, num_devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

  steps_per_epoch = dataset.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {config.batch_size} exceeds the "
                     f"{dataset.num_train_examples} training examples.")
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
  # layers: COMQ's per-layer report (JSON), kept here so that a resumed run has it.
  progress = {"phase": 0, "step_in_phase": 0, "global_step": 0, "accuracies": {},
              "layers": None}

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

    eval_step = make_eval_step(lambda v, images: model.apply(v, images, train=False))
    train_steps = {}  # compiled train step per phase kind (fp / inq)
    steps_this_run = 0
    while progress["phase"] < len(phases):
      phase = phases[progress["phase"]]
      if phase.num_steps and phase.kind not in train_steps:
        optimizer = make_optimizer(phase.hparams, steps_per_epoch, state["inq_state"].frozen)
        train_steps[phase.kind] = make_train_step(model, optimizer)
      train_step = train_steps.get(phase.kind)
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

      accuracy = evaluate(eval_step, model_variables(state), dataset, config.eval_batch_size,
                          batch_sharding)
      progress["accuracies"][phase.name] = accuracy
      append_metrics(workdir, {"type": "eval", "phase": progress["phase"],
                               "phase_name": phase.name, "portion": phase.portion,
                               "global_step": progress["global_step"], "accuracy": accuracy})
      logging.info("%s: test accuracy %.4f", phase.name, accuracy)

      progress["phase"] += 1
      progress["step_in_phase"] = 0
      if progress["phase"] < len(phases):
        next_phase = phases[progress["phase"]]
        start = time.time()
        if next_phase.kind == "inq":
          params, inq_state = state["params"], state["inq_state"]
          if progress["phase"] == 1:
            inq_state = quantizer.init(params)  # n1 from the trained FP weights
          params, inq_state = quantizer.step(
              params, inq_state, next_phase.portion,
              key=jax.random.fold_in(rng, progress["phase"]))
          state = dict(state, params=params, inq_state=inq_state)
        elif next_phase.kind == "comq":
          images = calibration_images(config, dataset, (config.seed, progress["phase"], 0))
          logging.info("COMQ on %d calibration images", sum(len(x) for x in images))
          # On the default device: the model runs eagerly under a method interceptor.
          variables = jax.device_put(jax.device_get(model_variables(state)))
          params, progress["layers"] = comq_quantize(config.comq, model, variables, images)
          state = dict(state, params=params)
        elif next_phase.kind == "rtn":
          state = dict(state, params=rtn_quantize(config.rtn, state["params"]))
        if next_phase.kind != "fp":
          logging.info("%s: quantized on entry in %.1fs", next_phase.name, time.time() - start)
        state["opt_state"] = make_optimizer(next_phase.hparams, steps_per_epoch,
                                            state["inq_state"].frozen).init(state["params"])
        state = jax.device_put(state, replicated)
      save()
    manager.wait_until_finished()

  packed_accuracy = None
  if config.eval_packed:
    packed_accuracy = evaluate_packed(config, model, state, dataset, mesh.devices.flat[0])
    logging.info("packed %d-bit kernels: test accuracy %.4f", config.inq.bits,
                 packed_accuracy)
  return write_results(config, workdir, phases, state, progress, packed_accuracy)


def evaluate_packed(config, model, state, dataset, device):
  """Test accuracy of the INQ model run from its packed codes by the shift kernel.

  Packs once (`inq_jax.pack_variables`) and jits `inq_jax.packed_apply`, the two halves of
  `inq_jax.evaluate_packed` (which would re-pack and re-compile for every batch). Runs on
  one device: the Pallas kernel is not partitioned over the batch mesh.
  """
  packed = jax.device_put(inq_jax.pack_variables(
      jax.device_get(model_variables(state)), state["inq_state"], config.inq.bits), device)
  eval_step = make_eval_step(
      lambda v, images: inq_jax.packed_apply(model, v, images, train=False))
  return evaluate(eval_step, packed, dataset, config.eval_batch_size,
                  jax.sharding.SingleDeviceSharding(device))


def write_results(config, workdir, phases, state, progress, packed_accuracy):
  """Checks the codebook, computes sizes and writes results.json atomically.

  Keys common to every method: config_name, dataset, model, method, bits, seed,
  fp_accuracy, final_accuracy, packed_accuracy (INQ with eval_packed, else None),
  portion_accuracies (INQ, else []), codebook_fraction (INQ, else None), the sizes of
  `model_sizes` and layers (COMQ's per-layer errors, else None).
  """
  bits = method_bits(config)
  accuracies = progress["accuracies"]
  variables = jax.device_get(model_variables(state))
  codebook_fraction = None
  if config.method == "inq":
    codebook_fraction = inq_jax.codebook_fraction(state["params"], state["inq_state"], bits)
    if codebook_fraction != 1.0:
      raise RuntimeError(f"Only {codebook_fraction:.6f} of the quantizable weights are in "
                         f"the {bits}-bit power-of-two codebook after the final INQ step.")
  sizes = model_sizes(config, variables, state["inq_state"],
                      quantized_mask(config, variables["params"], progress["layers"]))
  results = {
      "config_name": config.name,
      "dataset": config.dataset,
      "model": config.model.name,
      "method": config.method,
      "bits": bits,
      "seed": config.seed,
      "fp_accuracy": accuracies["fp"],
      "final_accuracy": accuracies[phases[-1].name],
      "packed_accuracy": packed_accuracy,
      "portion_accuracies": [{"phase": p.name, "portion": p.portion,
                              "accuracy": accuracies[p.name]}
                             for p in phases[1:] if p.kind == "inq"],
      "codebook_fraction": codebook_fraction,
      **sizes,
      "layers": progress["layers"],
  }
  files.write_json_atomically(os.path.join(workdir, "results.json"), results)
  return results
