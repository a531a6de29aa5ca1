"""Mixed precision: one bit width per layer under a budget of average bits per weight.

Each layer ``l`` takes one bit width ``b_l`` from its own set (e.g. ``{2, 3, 4, 8}``)
so as to minimise the summed layer objective under a storage budget:

.. math::

  \\min_{b} \\sum_l \\|X_l W_l - X_l Q_l(b_l)\\|_F^2
  \\quad \\text{s.t.} \\quad \\sum_l c_l(b_l) \\le B \\sum_l n_l,

where ``c_l(b)`` is the layer's storage in bits with the grid parameters (scales,
zero points) as the packed model stores them (:func:`layer_cost_bits`), ``n_l``
its number of weights and ``B`` the budget in bits per weight. With inputs from
the float model the layer objectives are independent, so this is a multiple-choice
knapsack. :func:`allocate_bits` solves it exactly by dynamic programming over costs
rounded up to ``1 / resolution`` of the budget: the chosen allocation never exceeds
the budget, and it is the exact optimum when every cost is a multiple of that unit.

The objectives come from the Grams alone (:func:`objectives_from_grams`, e.g. with
the cheap :func:`comq_jax.rtn`), or from whole-model runs at each bit width
(:func:`objectives_from_results`); :meth:`Allocation.rules` gives the ``rules`` of
:func:`comq_jax.quantize_model` that quantize with the choice::

  grams = quant_core.layer_grams(model, variables, batches)
  matrices = layer_matrices(model, variables, batches[0])
  triple = objectives_from_grams(grams, matrices, comq_jax.rtn(4), (2, 3, 4, 8))
  allocation = allocate_bits(*triple, budget=3.5)
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(4),
                                   rules=allocation.rules(comq_jax.comq(4)))
"""

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comq_jax import solvers
from quant_core import capture
from quant_core import layers
from quant_core import paths as paths_lib
from quant_core.deploy import sizes

# Relative slack under which a cost counts as a whole number of units: float noise
# must not round an exact multiple up by one unit.
_UNIT_TOLERANCE = 1e-9


def _check_solver(solver) -> None:
  if not isinstance(solver, solvers.Solver):
    raise ValueError("solver must be built by comq_jax.comq, comq_jax.gptq or comq_jax.rtn, "
                     f"got {type(solver).__name__}.")


def layer_cost_bits(matrices, solver: solvers.Solver, bits: int) -> int:
  """Storage in bits of one layer's kernel quantized at ``bits`` on ``solver``'s grid.

  .. math:: c(b) = 8 \\left(\\lceil b \\cdot n / 8 \\rceil + \\text{grid parameter bytes}\\right)

  as :func:`quant_core.deploy.sizes.quantized_kernel_bytes` counts the packed codes.

  Args:
    matrices: ``(groups, d_in, d_out)`` of the layer's 2-D view (as in
      :attr:`comq_jax.LayerReport.matrices`).
    solver: gives the grid, granularity and group size.
    bits: the bit width.

  Returns:
    The packed kernel's size in bits.

  Raises:
    ValueError: a solver not built by :mod:`comq_jax.solvers`, or bits outside
      the solver's range.
  """
  _check_solver(solver)
  chosen = dataclasses.replace(solver, bits=bits)
  packed, _ = sizes.quantized_kernel_bytes(
      tuple(int(size) for size in matrices), bits=chosen.bits, grid=chosen.grid,
      granularity=chosen.granularity, group_size=chosen.group_size)
  return 8 * packed


class Allocation(NamedTuple):
  """A bit width per layer, as :func:`allocate_bits` chose it.

  Attributes:
    bits: ``{path: bits}`` in the order the layers were given.
    average_bits: the chosen total cost over the total number of weights.
    budget: the budget asked for, in bits per weight.
    objective: the summed objective of the choice.
    weights: the total number of weights.
  """
  bits: dict
  average_bits: float
  budget: float
  objective: float
  weights: int

  def rules(self, solver: solvers.Solver) -> list:
    """``[(re.escape(path), solver at that path's bits), ...]``, the ``rules`` of
    :func:`comq_jax.quantize_model`.

    Raises:
      ValueError: a solver not built by :mod:`comq_jax.solvers`, or a chosen bit
        width outside its range.
    """
    _check_solver(solver)
    return [(re.escape(path), dataclasses.replace(solver, bits=bits))
            for path, bits in self.bits.items()]

  def record(self) -> dict:
    """The allocation as JSON types."""
    return dict(bits={path: int(bits) for path, bits in self.bits.items()},
                average_bits=float(self.average_bits), budget=float(self.budget),
                objective=float(self.objective), weights=int(self.weights))


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_value(value, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value >= 0):
    raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")
  return float(value)


def _check_inputs(objectives, costs, weights):
  """``[(path, [(bits, objective, cost), ...], weights), ...]`` in the given order."""
  for name, table in (("objectives", objectives), ("costs", costs), ("weights", weights)):
    if not isinstance(table, Mapping):
      raise ValueError(f"{name} must be a dict keyed by layer path, got "
                       f"{type(table).__name__}.")
  if not objectives:
    raise ValueError("objectives is empty: there is no layer to allocate bits to.")
  for name, table in (("costs", costs), ("weights", weights)):
    if set(table) != set(objectives):
      missing, extra = sorted(set(objectives) - set(table)), sorted(set(table) - set(objectives))
      raise ValueError(f"{name} must have the layers of objectives: missing {missing}, "
                       f"extra {extra}.")
  checked = []
  for path, choices in objectives.items():
    if not isinstance(choices, Mapping) or not isinstance(costs[path], Mapping):
      raise ValueError(f"{path}: objectives and costs must map bits to values.")
    if not choices:
      raise ValueError(f"{path}: the layer has no bit width to choose from.")
    if set(costs[path]) != set(choices):
      raise ValueError(f"{path}: costs has bits {sorted(costs[path])}, objectives "
                       f"{sorted(choices)}; they must be the same.")
    for bits in choices:
      if not _is_int(bits) or not 1 <= bits <= 16:
        raise ValueError(f"{path}: bits must be integers in 1..16, got {bits!r}.")
    count = weights[path]
    if not _is_int(count) or count < 1:
      raise ValueError(f"{path}: weights must be a positive integer count, got {count!r}.")
    checked.append((path, [(int(bits), _check_value(choices[bits], f"{path}: objective"),
                            _check_value(costs[path][bits], f"{path}: cost"))
                           for bits in sorted(choices)], int(count)))
  return checked


def allocate_bits(objectives: Mapping, costs: Mapping, weights: Mapping, budget: float, *,
                  resolution: int = 65536) -> Allocation:
  """The bit widths of least summed objective within a budget of bits per weight.

  An exact multiple-choice knapsack by dynamic programming: with
  ``unit = budget * sum(weights) / resolution`` and each cost rounded up to
  ``u_l(b) = ceil(c_l(b) / unit)`` units,

  .. math:: F_l(r) = \\min_b \\big(F_{l-1}(r - u_l(b)) + E_l(b)\\big),
    \\quad F_0(0) = 0, \\ F_0(r > 0) = \\infty,

  the least objective of the first ``l`` layers using exactly ``r`` units, for
  ``r = 0..resolution``. The choice is ``argmin_r F_L(r)`` followed back. Since
  ``u_l(b) \\cdot unit \\ge c_l(b)``, the true cost stays within the budget (up to
  float rounding, a relative 1e-9); it is the exact optimum when every cost is a
  whole number of units, and otherwise optimal for the rounded costs. Ties go to
  fewer units, then to lower bits. Time ``O(L K resolution)`` for ``K`` choices;
  the rounding leaves unused at most ``L`` units (0.2% of the budget for 126
  layers at the default resolution).

  Args:
    objectives: ``{path: {bits: objective}}``, finite and >= 0; each layer may
      have its own set of bits (integers in 1..16).
    costs: ``{path: {bits: cost in bits}}`` with the same keys (e.g. from
      :func:`layer_cost_bits`).
    weights: ``{path: number of weights}``.
    budget: bits per weight over these layers (finite, > 0).
    resolution: units of capacity (an integer >= 1); more is finer and slower.

  Returns:
    An :class:`Allocation`, its layers in the order of ``objectives``.

  Raises:
    ValueError: no layers; layers or bits that differ between the arguments; a
      layer without choices; bits, objectives, costs or weights out of range;
      a budget that is not finite and > 0, or below the cheapest allocation (the
      message gives its average bits); a resolution too coarse to fit it; a
      resolution that is not an integer >= 1.
  """
  layers_checked = _check_inputs(objectives, costs, weights)
  if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not (
      math.isfinite(budget) and budget > 0):
    raise ValueError(f"budget must be a finite number of bits per weight > 0, got {budget!r}.")
  if not _is_int(resolution) or resolution < 1:
    raise ValueError(f"resolution must be an integer >= 1, got {resolution!r}.")
  total_weights = sum(count for _, _, count in layers_checked)
  allowed = float(budget) * total_weights
  cheapest = sum(min(cost for _, _, cost in choices) for _, choices, _ in layers_checked)
  if cheapest > allowed * (1 + _UNIT_TOLERANCE):
    raise ValueError(f"budget={budget} bits per weight is below the cheapest allocation, "
                     f"{cheapest / total_weights:.6g} bits per weight; the budget must be at "
                     "least that.")
  unit = allowed / resolution

  def units(cost):
    exact = cost / unit
    return math.ceil(exact - _UNIT_TOLERANCE * max(1.0, exact))

  best = np.full(resolution + 1, np.inf)
  best[0] = 0.0
  back_pointers = []
  for _, choices, _ in layers_checked:
    # Fewer units first, then lower bits: a strict improvement keeps the first tie.
    ordered = sorted((units(cost), bits, value, cost) for bits, value, cost in choices)
    new_best = np.full_like(best, np.inf)
    pick = np.full(best.shape, -1, np.int16)
    for index, (used, _, value, _) in enumerate(ordered):
      if used <= resolution:
        candidate = np.full_like(best, np.inf)
        candidate[used:] = best[:resolution + 1 - used] + value
        better = candidate < new_best
        new_best = np.where(better, candidate, new_best)
        pick[better] = index
    best = new_best
    back_pointers.append((ordered, pick))
  if not np.isfinite(best).any():
    raise ValueError(f"resolution={resolution} is too coarse for budget={budget}: the costs "
                     "rounded up to its units exceed the budget although the cheapest "
                     f"allocation ({cheapest / total_weights:.6g} bits per weight) fits; "
                     "raise resolution.")
  remaining = int(np.argmin(best))  # The first minimum: the fewest units.
  chosen = []
  for ordered, pick in reversed(back_pointers):
    chosen.append(ordered[pick[remaining]])
    remaining -= chosen[-1][0]
  chosen.reverse()
  return Allocation(
      bits={path: bits for (path, _, _), (_, bits, _, _) in zip(layers_checked, chosen,
                                                                 strict=True)},
      average_bits=sum(cost for *_, cost in chosen) / total_weights, budget=float(budget),
      objective=sum(value for _, _, value, _ in chosen), weights=total_weights)


def check_bit_choices(bit_choices) -> tuple:
  if isinstance(bit_choices, (str, bytes)) or not isinstance(bit_choices, Sequence) or (
      not bit_choices) or not all(_is_int(bits) for bits in bit_choices):
    raise ValueError(f"bit_choices must be a non-empty sequence of integer bit widths, got "
                     f"{bit_choices!r}.")
  return tuple(sorted(set(int(bits) for bits in bit_choices)))


def layer_matrices(model_or_apply, variables, batch, **apply_kwargs) -> dict:
  """Each supported linear layer's weights as its 2-D view's matrices.

  Args:
    model_or_apply, variables, **apply_kwargs: as in :func:`comq_jax.quantize_model`.
    batch: one model input (shapes only are traced, :func:`quant_core.layer_views`).

  Returns:
    ``{path: (groups, d_in, d_out) array}`` in forward order, the paths of
    :func:`quant_core.layer_grams`.
  """
  target = capture.model_adapter(model_or_apply, variables, apply_kwargs)
  views = layers.layer_views(model_or_apply, variables, batch, **apply_kwargs)
  return {path: view.matrices(paths_lib.get(target.params, path.split("/"))["kernel"])
          for path, view in views.items() if view is not None}


def objectives_from_grams(grams: Mapping, weights_by_path: Mapping, solver: solvers.Solver,
                          bit_choices: Sequence[int]):
  """Layer objectives at each bit width from the Grams alone.

  .. math:: E_l(b) = \\sum_g \\|X_{lg} W_{lg} - X_{lg} Q_{lg}(b)\\|_F^2
    = \\sum_g \\operatorname{tr}\\big((W_{lg} - Q_{lg})^\\top H_{lg} (W_{lg} - Q_{lg})\\big)

  over the layer's feature groups ``g``, ``Q`` from ``solver`` at ``b`` bits
  (:func:`comq_jax.rtn` is cheap; COMQ and GPTQ solve each layer at each width).

  Args:
    grams: ``{path: GramAccumulator}`` (:func:`quant_core.layer_grams`) or
      ``{path: (groups, d_in, d_in) array}``.
    weights_by_path: ``{path: (groups, d_in, d_out) array}`` of the layers to
      allocate (e.g. :func:`layer_matrices`); its order is kept.
    solver: the solver, its ``bits`` replaced by each choice.
    bit_choices: the bit widths each layer may take.

  Returns:
    ``(objectives, costs, weights)`` as :func:`allocate_bits` takes them.

  Raises:
    ValueError: no layers, a layer without a Gram or with a Gram of another shape,
      matrices that are not 3-D, or bad solver settings or bit choices.
  """
  def objective(chosen, matrix, group_gram, _):
    return float(chosen.quantize_layer(matrix, gram=group_gram).error) ** 2  # the norm
  return _objectives(weights_by_path, solver, bit_choices, objective, grams=grams)


def fisher_diagonal(loss_fn: Callable, params, batches: Sequence[Any],
                    layer_paths: Sequence[str]) -> dict:
  """The diagonal empirical Fisher of each layer's kernel.

  .. math:: F_l = \\frac{1}{N} \\sum_{n=1}^{N}
    \\Big(\\frac{\\partial \\mathcal{L}(\\theta, x_n)}{\\partial W_l}\\Big)^2

  over the ``N`` batches ``x_n`` (element-wise square). With one example per batch
  this is the per-example empirical Fisher; larger batches average the gradients
  first and give a smaller, coarser estimate.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` loss (e.g. the mean next-token
      cross-entropy of a language model).
    params: the parameters, a nested dict holding ``{"kernel": array}`` at each
      ``/``-joined path of ``layer_paths``.
    batches: the batches, read once; one compiled gradient serves them all when
      they share a shape.
    layer_paths: the layers' module paths (as in :func:`layer_matrices`).

  Returns:
    ``{path: float32 array of the kernel's shape}``; map it to a layer's matrices
    with its view (:func:`fisher_matrices`).

  Raises:
    ValueError: no batches or no layers, or a path without a kernel.
  """
  layer_paths = list(layer_paths)
  if not layer_paths:
    raise ValueError("layer_paths is empty: there is no layer to measure.")
  kernels = {}
  for path in layer_paths:
    try:
      kernels[path] = paths_lib.get(params, path.split("/"))["kernel"]
    except (KeyError, IndexError, TypeError):
      raise ValueError(f"{path}: params has no kernel at that path.") from None

  def loss_of_kernels(chosen, batch):
    tree = jax.tree.map(lambda leaf: leaf, params)
    for path, kernel in chosen.items():
      paths_lib.get(tree, path.split("/"))["kernel"] = kernel
    return loss_fn(tree, batch)

  @jax.jit
  def add_squares(sums, batch):
    grads = jax.grad(loss_of_kernels)(kernels, batch)
    return {path: sums[path] + jnp.square(grads[path].astype(jnp.float32)) for path in sums}

  sums = {path: jnp.zeros(kernel.shape, jnp.float32) for path, kernel in kernels.items()}
  count = 0
  for batch in batches:
    sums = add_squares(sums, batch)
    count += 1
  if not count:
    raise ValueError("batches is empty: the Fisher needs at least one batch.")
  return {path: total / count for path, total in sums.items()}


def fisher_matrices(model_or_apply, variables, batch, fisher: Mapping,
                    **apply_kwargs) -> dict:
  """``{path: (groups, d_in, d_out)}``: each kernel-shaped Fisher of
  :func:`fisher_diagonal` laid out as the layer's matrices (as
  :func:`layer_matrices` lays out the weights)."""
  views = layers.layer_views(model_or_apply, variables, batch, **apply_kwargs)
  missing = sorted(path for path in fisher if views.get(path) is None)
  if missing:
    raise ValueError(f"fisher has layers without a supported linear view: {missing}.")
  return {path: views[path].matrices(values) for path, values in fisher.items()}


def objectives_from_fisher(fisher: Mapping, weights_by_path: Mapping, solver: solvers.Solver,
                           bit_choices: Sequence[int], *, grams: Optional[Mapping] = None):
  """Layer objectives at each bit width as the loss increase they cause, to second order.

  .. math:: E_l(b) = \\tfrac{1}{2} \\sum_{g,i,j} F_{lgij}\\,(W_{lgij} - Q_{lgij}(b))^2

  the diagonal Fisher ``F`` standing in for the loss's Hessian at a trained model
  (whose gradient is about zero). Unlike the layer objective of
  :func:`objectives_from_grams`, it weighs each layer by what its outputs cost the
  model's loss downstream (a layer whose outputs are normalized away costs little).

  Args:
    fisher: ``{path: (groups, d_in, d_out) array}`` of the layers' matrices
      (:func:`fisher_matrices`).
    weights_by_path: ``{path: (groups, d_in, d_out) array}`` (:func:`layer_matrices`);
      its order is kept.
    solver: quantizes each layer at each width (its ``bits`` replaced);
      :func:`comq_jax.rtn` needs no data, other solvers need ``grams``.
    bit_choices: the bit widths each layer may take.
    grams: ``{path: Gram}`` as in :func:`objectives_from_grams`, for solvers that
      need them.

  Returns:
    ``(objectives, costs, weights)`` as :func:`allocate_bits` takes them.

  Raises:
    ValueError: no layers, a layer without a Fisher or with one of another shape,
      a solver that needs Grams without them, or bad solver settings or bit choices.
  """
  def objective(chosen, matrix, group_gram, group_fisher):
    quantized = chosen.quantize_layer(matrix, gram=group_gram).weights
    return 0.5 * float(np.sum(np.asarray(group_fisher, np.float64) * np.square(
        np.asarray(matrix, np.float64) - np.asarray(quantized, np.float64))))

  for path, matrices in weights_by_path.items():
    if path not in fisher:
      raise ValueError(f"{path}: no Fisher in fisher (it has {sorted(fisher)}).")
    if np.shape(fisher[path]) != np.shape(matrices):
      raise ValueError(f"{path}: the Fisher must have the matrices' shape "
                       f"{np.shape(matrices)}, got {np.shape(fisher[path])}.")
  if grams is None and not isinstance(solver, solvers.RTN):
    raise ValueError(f"solver {type(solver).__name__} needs the layers' Grams: pass grams "
                     "(or measure with comq_jax.rtn).")
  return _objectives(weights_by_path, solver, bit_choices, objective, grams=grams,
                     fisher=fisher)


def _objectives(weights_by_path, solver, bit_choices, objective, *, grams, fisher=None):
  """``(objectives, costs, weights)`` with ``objective(solver at b bits, matrix, Gram or
  None, Fisher or None)`` summed over each layer's matrices."""
  _check_solver(solver)
  bit_choices = check_bit_choices(bit_choices)
  if not weights_by_path:
    raise ValueError("weights_by_path is empty: there is no layer to allocate bits to.")
  objectives, costs, weights = {}, {}, {}
  for path, matrices in weights_by_path.items():
    matrices = np.asarray(matrices)
    if matrices.ndim != 3:
      raise ValueError(f"{path}: matrices must be (groups, d_in, d_out), got "
                       f"{matrices.shape}.")
    gram = [None] * matrices.shape[0]
    if grams is not None:
      if path not in grams:
        raise ValueError(f"{path}: no Gram in grams (it has {sorted(grams)}).")
      gram = np.asarray(getattr(grams[path], "gram", grams[path]))
      if gram.shape != (matrices.shape[0],) + matrices.shape[1:2] * 2:
        raise ValueError(f"{path}: matrices must be (groups, d_in, d_out) and the Gram "
                         f"(groups, d_in, d_in), got {matrices.shape} and {gram.shape}.")
    group_fisher = [None] * matrices.shape[0] if fisher is None else np.asarray(fisher[path])
    objectives[path] = {
        bits: sum(objective(dataclasses.replace(solver, bits=bits), matrix, group_gram, f)
                  for matrix, group_gram, f in zip(matrices, gram, group_fisher, strict=True))
        for bits in bit_choices}
    costs[path] = {bits: layer_cost_bits(matrices.shape, solver, bits) for bits in bit_choices}
    weights[path] = math.prod(matrices.shape)
  return objectives, costs, weights


def objectives_from_results(results: Mapping):
  """Layer objectives at each bit width from whole-model runs, one per width.

  .. math:: E_l(b) = \\text{error}_l(b)^2

  with ``error`` the report's ``||X W - X Q||_F`` over the layer's groups.

  Args:
    results: ``{bits: comq_jax.ModelQuantization}``, each run with
      ``inputs="fp"`` (the layer objectives must not depend on the other
      layers' choices) and every layer at that run's bits.

  Returns:
    ``(objectives, costs, weights)`` as :func:`allocate_bits` takes them, the
    layers in the first run's order.

  Raises:
    ValueError: no runs, a key that is not an integer, a run with sequential
      inputs, a layer at other bits or without its solver, or runs that quantize
      different layers or shapes.
  """
  if not isinstance(results, Mapping) or not results:
    raise ValueError("results must be a non-empty dict {bits: ModelQuantization}.")
  objectives, costs, weights, shapes = {}, {}, {}, {}
  first_bits, first = next(iter(results.items()))
  for bits, result in results.items():
    if not _is_int(bits):
      raise ValueError(f"results must be keyed by integer bits, got {bits!r}.")
    if result.inputs != "fp":
      raise ValueError(f"results[{bits}] has inputs={result.inputs!r}; the objectives must "
                       "come from runs with inputs='fp'.")
    layer_paths = [report.path for report in result.layers]
    if sorted(layer_paths) != sorted(report.path for report in first.layers):
      raise ValueError(f"results[{bits}] quantizes {layer_paths}, results[{first_bits}] "
                       f"{[report.path for report in first.layers]}; the runs must quantize "
                       "the same layers.")
    for report in result.layers:
      if report.bits != bits or report.solver is None:
        raise ValueError(f"results[{bits}]: layer {report.path} is at {report.bits} bits "
                         f"with solver {report.solver}; every layer must be at {bits} bits "
                         "with its solver.")
      shape = tuple(report.matrices)
      if shapes.setdefault(report.path, shape) != shape:
        raise ValueError(f"{report.path}: the runs give it matrices {shapes[report.path]} "
                         f"and {shape}; they must be the same.")
      weights[report.path] = math.prod(shape)
      objectives.setdefault(report.path, {})[bits] = float(report.error) ** 2
      costs.setdefault(report.path, {})[bits] = layer_cost_bits(report.matrices,
                                                                report.solver, bits)
  order = [report.path for report in first.layers]
  return ({path: objectives[path] for path in order}, {path: costs[path] for path in order},
          {path: weights[path] for path in order})
