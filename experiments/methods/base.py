"""What a quantization method provides to the job, and the full-precision default.

A run is a list of phases sharing one training loop. Phase 0 trains (or only
evaluates) the full-precision model; the method adds its own phases. Entering a
phase may change the model (quantize); a phase then trains for its steps, if
any, and is evaluated at its end.

A method is an object with the hooks of :class:`Method`. Register it in
`experiments.methods.REGISTRY` and select it with `config.method`.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

PyTree = Any


class Phase(NamedTuple):
  """One stretch of the run.

  name: unique within the run ("fp", "inq_0.5", "comq"). num_steps: training
  steps after entry. hparams: the config block of the optimizer settings (None
  for a phase that trains no step). portion: the accumulated INQ portion, for
  the metrics (None for other methods).
  """
  name: str
  num_steps: int
  hparams: Optional[ml_collections.ConfigDict]
  portion: Optional[float] = None


class Context(NamedTuple):
  """What a method may use on entering a phase.

  task: the run's `experiments.tasks` task (its model through `task.bound(variables)`,
    the evaluation-mode call arguments `task.apply_kwargs`, the batches' model inputs
    `task.inputs(batch)`).
  phase_index: position of the phase being entered in the run (0 is FP).
  rng: the run's root PRNG key (derive keys with fold_in).
  mesh: the run's device mesh (its axis "batch").
  """
  config: ml_collections.ConfigDict
  task: Any
  dataset: Any
  rng: jax.Array
  phase_index: int
  mesh: jax.sharding.Mesh


def fp_phase(config, steps_per_epoch) -> Phase:
  """Phase 0: FP training for config.fp.num_epochs (0 evaluates imported weights)."""
  return Phase("fp", config.fp.num_epochs * steps_per_epoch,
               config.fp if config.fp.num_epochs else None)


def size_entries(report) -> dict:
  """The results.json size entries of a size report (`quant_core.deploy.SizeReport`)."""
  return {"fp32_bytes": report.fp32_bytes, "packed_bytes": report.packed_bytes,
          "codebook_bytes": report.codebook_bytes, "entropy_bytes": report.entropy_bytes}


class Method:
  """Full precision, and the default of every hook.

  The job calls, in order: `check(config)`; `init_state(config, params)` once (the
  method's checkpointed state, or None); `phases(config, steps_per_epoch)` for the
  phases after the FP one; `enter(phase, state, context)` on entering each of them;
  `frozen(state)` for the training steps of every phase; at the end,
  `packed_variables` (written as the packed model file, and run with eval_packed) and
  `results(task, state, progress, phases, packed)` with what it returned.
  """
  name = "fp"
  label = "FP"

  def check(self, config) -> None:
    """Raises ValueError for config fields this method cannot honour."""
    if config.eval_packed and type(self).packed_variables is Method.packed_variables:
      raise ValueError(f"eval_packed needs a quantization method (inq, comq, gptq, rtn), "
                       f"got {self.name!r}.")

  def check_task(self, config, task) -> None:
    """Raises ValueError for config fields this method cannot honour on ``task``
    (experiments.tasks); called before anything is written."""
    del config, task

  def distills(self, config) -> bool:
    """Whether training steps add distillation from the FP weights, kept in
    state["teacher"] from the method's first phase on."""
    del config
    return False

  def bits(self, config) -> int:
    """Bit width of the quantized kernels (32: full precision)."""
    del config
    return 32

  def init_state(self, config, params) -> Optional[PyTree]:
    """The method's state, checkpointed with the run (None: none)."""
    del config, params
    return None

  def phases(self, config, steps_per_epoch) -> list:
    """The phases after the FP phase."""
    del config, steps_per_epoch
    return []

  def enter(self, phase: Phase, state: dict, context: Context):
    """Runs on entering one of `phases`: returns (state, record).

    state: {"variables": Flax variables, "method": the method's state}. record: a
    JSON-able dict kept in the run's progress (e.g. per-layer errors), or None.
    """
    del phase, context
    return state, None

  def frozen(self, state) -> PyTree:
    """Bool pytree over the params: weights the training steps must not move.

    Every training phase of every method runs the same optimizer (SGD with INQ's
    frozen-update mask, `train.make_optimizer`), so the FP phase gives the same FP
    model whatever the method; by default nothing is frozen.
    """
    return jax.tree.map(lambda p: jnp.zeros(p.shape, bool), state["variables"]["params"])

  def packed_variables(self, task, state, progress, phases):
    """The final variables with packed kernels (`quant_core.deploy`), or None (FP).

    task: the run's task; `task.example` is one model input (shapes only), to find each
    layer's 2-D view.
    """
    del task, state, progress, phases
    return None

  def results(self, task, state, progress, phases, packed) -> dict:
    """The method's entries of results.json (sizes and method-specific keys).

    task: the run's task (`task.config` its config; `task.result_keys[3]` the key of
    per-portion metrics). packed: what `packed_variables` returned (None for FP).
    """
    del progress, phases, packed
    variables = jax.device_get(state["variables"])
    fp32 = sum(4 * leaf.size for leaf in jax.tree.leaves(variables))
    own = sum(leaf.nbytes for leaf in jax.tree.leaves(variables))
    return {task.result_keys[3]: [], "codebook_fraction": None, "layers": None,
            "fp32_bytes": fp32, "packed_bytes": own, "codebook_bytes": own,
            "entropy_bytes": None}
