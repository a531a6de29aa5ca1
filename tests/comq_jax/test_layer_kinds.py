"""Every linear layer kind, linen and NNX, through comq_jax.quantize_model.

Each case puts the layer under test before a LayerNorm and a Dense head that
a rule leaves in float. The test captures the layer's inputs on
its own (interception of the layer call) and reshapes them and the kernel to
2-D by hand, from the layer's documented semantics, then compares with
``comq_jax.comq(...).quantize_layer``.
"""

import dataclasses
import math
from typing import Callable

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
import quant_core
from tests import helpers
from quant_core import im2col


class _ScaledDense(nn.Dense):
  """A subclass that transforms its input before the Dense product."""

  def __call__(self, x):
    return super().__call__(2.0 * x)


class _ScaledLinear(nnx.Linear):

  def __call__(self, x):
    return super().__call__(2.0 * x)


def _rows_last(x, axes):
  """``x`` with ``axes`` moved last (in that order), as ``(rows, prod(axes))``."""
  kept = [a for a in range(x.ndim) if a not in axes]
  moved = jnp.transpose(x, kept + list(axes))
  return moved.reshape(-1, math.prod(x.shape[a] for a in axes))


def _conv_2d(conv):
  def to_2d(x, kernel):
    groups = conv.feature_group_count
    patches = im2col.conv_patches(conv, x)
    rows = patches.reshape(-1, groups, patches.shape[-1] // groups)
    return rows, im2col.conv_kernel_matrix(kernel, groups)
  return to_2d


@dataclasses.dataclass
class _Case:
  """A layer under test: linen and NNX constructors, the input shape, and its
  2-D view written out: ``to_2d(inputs, kernel) -> ((rows, g, d_in), (g, d_in,
  d_out))``."""
  name: str
  linen: Callable
  nnx: Callable
  input_shape: tuple
  to_2d: Callable


def _dense_2d(x, kernel):
  return x.reshape(-1, 1, x.shape[-1]), kernel[None]


CASES = [
    _Case("dense", lambda: nn.Dense(6), lambda r: nnx.Linear(5, 6, rngs=r), (16, 5),
          _dense_2d),
    _Case("dense_general",
          lambda: nn.DenseGeneral(features=(2, 3), axis=(-2, -1)),
          lambda r: nnx.LinearGeneral((4, 5), (2, 3), axis=(-2, -1), rngs=r),
          (6, 3, 4, 5),
          lambda x, k: (_rows_last(x, (2, 3))[:, None], k.reshape(1, 20, 6))),
    _Case("einsum",
          lambda: nn.Einsum((3, 5, 4), "btd,hdf->bthf"),
          lambda r: nnx.Einsum("btd,hdf->bthf", (3, 5, 4), (3, 4), rngs=r),
          (4, 6, 5),
          lambda x, k: (_rows_last(x, (2,))[:, None],
                        jnp.transpose(k, (1, 0, 2)).reshape(1, 5, 12))),
    _Case("conv_strided_grouped",
          lambda: nn.Conv(6, (3, 3), strides=2, padding="SAME", feature_group_count=2),
          lambda r: nnx.Conv(4, 6, (3, 3), strides=2, padding="SAME",
                             feature_group_count=2, rngs=r),
          (2, 7, 7, 4),
          _conv_2d(nn.Conv(6, (3, 3), strides=2, padding="SAME", feature_group_count=2))),
    _Case("conv_depthwise_dilated",
          lambda: nn.Conv(4, (3, 3), kernel_dilation=2, padding="VALID",
                          feature_group_count=4),
          lambda r: nnx.Conv(4, 4, (3, 3), kernel_dilation=2, padding="VALID",
                             feature_group_count=4, rngs=r),
          (3, 9, 9, 4),
          _conv_2d(nn.Conv(4, (3, 3), kernel_dilation=2, padding="VALID",
                           feature_group_count=4))),
    _Case("subclass", lambda: _ScaledDense(6), lambda r: _ScaledLinear(5, 6, rngs=r),
          (16, 5), lambda x, k: _dense_2d(2.0 * x, k)),
]


class _LinenNet(nn.Module):
  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    y = self.layer(x)
    y = nn.LayerNorm(name="norm")(y)
    return nn.Dense(3, name="head")(y.reshape(y.shape[0], -1))


class _NNXNet(nnx.Module):

  def __init__(self, layer, features, flat, rngs):
    self.layer = layer
    self.norm = nnx.LayerNorm(features, rngs=rngs)
    self.head = nnx.Linear(flat, 3, rngs=rngs)

  def __call__(self, x):
    y = self.norm(self.layer(x))
    return self.head(y.reshape(y.shape[0], -1))


def _batches(shape, n=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.random.normal(k, shape, jnp.float32) for k in keys]


def _linen_model(case):
  model = _LinenNet(case.linen())
  batches = _batches(case.input_shape)
  variables = model.init(jax.random.key(1), batches[0])
  return model, variables, batches


def _nnx_model(case, linen_params):
  """The NNX network with the linen network's weights."""
  rngs = nnx.Rngs(0)
  layer_out = jax.eval_shape(
      lambda p, x: case.linen().apply({"params": p}, x), linen_params["layer"],
      jax.ShapeDtypeStruct(case.input_shape, jnp.float32))
  features = layer_out.shape[-1]
  flat = math.prod(layer_out.shape[1:])
  model = _NNXNet(case.nnx(rngs), features, flat, rngs)
  graphdef, state = nnx.split(model)
  assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
          == jax.tree.map(jnp.shape, dict(linen_params)))
  nnx.replace_by_pure_dict(state, dict(linen_params))
  return nnx.merge(graphdef, state)


def _captured_inputs(model, variables, batches):
  """The inputs of the linen layer ``layer``'s outermost call (a subclass's
  ``__call__`` calls the base one again), captured by the test itself."""
  captured, depth = [], [0]

  def interceptor(next_fun, args, kwargs, context):
    if context.module.path != ("layer",) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if depth[0] == 0:
      captured.append(args[0])
    depth[0] += 1
    try:
      return next_fun(*args, **kwargs)
    finally:
      depth[0] -= 1

  for batch in batches:
    with nn.intercept_methods(interceptor):
      model.apply(variables, batch)
  return captured


# The head stays in float: a rule with no solver.
_SKIP_HEAD = [("head", None)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_linen_and_nnx_layer_kind_is_quantized_like_quantize_layer(case):
  model, variables, batches = _linen_model(case)
  params = variables["params"]
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=3),
                                   rules=_SKIP_HEAD)
  new = result.variables["params"]

  # Exactly the layer's kernel changes; the head is skipped, by name and reason.
  assert [r.path for r in result.layers] == ["layer"]
  assert [(s.path, s.reason) for s in result.skipped] == [("head", "rule 'head'")]
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, new)
  assert [jax.tree_util.keystr(p) for p, c in jax.tree.leaves_with_path(changed)
          if c] == ["['layer']['kernel']"]

  # The same solve on inputs captured and reshaped by the test, group by group.
  raw = _captured_inputs(model, variables, batches)
  rows = jnp.concatenate([case.to_2d(x, params["layer"]["kernel"])[0] for x in raw])
  _, mats = case.to_2d(raw[0], params["layer"]["kernel"])
  _, new_mats = case.to_2d(raw[0], new["layer"]["kernel"])
  assert result.layers[0].matrices == mats.shape
  errors = []
  for g in range(mats.shape[0]):
    x = rows[:, g]
    gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    direct = comq_jax.comq(bits=3).quantize_layer(mats[g], gram=gram)
    np.testing.assert_array_equal(new_mats[g], direct.weights)
    errors.append(float(direct.error))
    # At most 2^3 levels per output channel.
    assert max(np.unique(np.asarray(new_mats[g][:, j])).size
               for j in range(mats.shape[2])) <= 8
  np.testing.assert_allclose(result.layers[0].error, math.sqrt(sum(e * e for e in errors)),
                             rtol=1e-6)

  # NNX: the same network with the same weights gets the same quantized weights.
  nnx_model = _nnx_model(case, params)
  nnx_result = comq_jax.quantize_model(nnx_model, None, batches, comq_jax.comq(bits=3),
                                       rules=_SKIP_HEAD)
  assert [r.path for r in nnx_result.layers] == ["layer"]
  np.testing.assert_array_equal(nnx_result.variables["params"]["layer"]["kernel"],
                                new["layer"]["kernel"])
  assert isinstance(nnx_result.model, type(nnx_model))
  np.testing.assert_array_equal(nnx_result.model.layer.kernel[...], new["layer"]["kernel"])
  # The user's module is left as it was.
  np.testing.assert_array_equal(nnx_model.layer.kernel[...], params["layer"]["kernel"])
  np.testing.assert_allclose(nnx_result.model(batches[0]),
                             model.apply(result.variables, batches[0]), rtol=1e-5,
                             atol=1e-5)


class _Attention(nn.Module):
  """Token embedding, masked self-attention, a per-token MLP and a head."""

  @nn.compact
  def __call__(self, batch):
    tokens, valid = batch
    x = nn.Dense(8, name="embed")(tokens)
    mask = nn.make_attention_mask(valid, valid)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, mask=mask)
    x = x + nn.Dense(8, name="mlp")(nn.gelu(nn.LayerNorm()(x)))
    return nn.Dense(3, name="head")(x)


def _token_batch(key, lengths, width=5, length=7):
  """Tokens padded with noise after each sequence's length, and the valid mask."""
  tokens = jax.random.normal(key, (len(lengths), length, width))
  valid = jnp.arange(length)[None, :] < jnp.asarray(lengths)[:, None]
  return tokens, valid


def test_multi_head_attention_is_quantized_end_to_end():
  model = _Attention()
  batches = [_token_batch(jax.random.key(i), [7, 7, 7]) for i in range(2)]
  variables = model.init(jax.random.key(9), batches[0])
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4))
  paths = [r.path for r in result.layers]
  assert paths == ["embed", "attn/query", "attn/key", "attn/value", "attn/out", "mlp",
                   "head"]
  assert result.skipped == []
  for name in ("query", "key", "value", "out"):
    old = variables["params"]["attn"][name]["kernel"]
    new = result.variables["params"]["attn"][name]["kernel"]
    assert new.shape == old.shape and not np.array_equal(new, old)
  # q/k/v: (8 -> 2 heads x 4), out: (2 heads x 4 -> 8).
  assert [r.matrices for r in result.layers[1:5]] == [(1, 8, 8)] * 4


def test_masked_calibration_on_padded_batches_equals_unpadded_batches():
  model = _Attention()
  lengths = [[7, 3, 5], [2, 6, 4]]
  padded = [_token_batch(jax.random.key(i), n) for i, n in enumerate(lengths)]
  variables = model.init(jax.random.key(9), padded[0])
  # The same sequences, each alone and unpadded.
  unpadded = [(tokens[j:j + 1, :n], valid[j:j + 1, :n])
              for (tokens, valid), ns in zip(padded, lengths, strict=True)
              for j, n in enumerate(ns)]
  masks = [valid for _, valid in padded]
  with_masks = comq_jax.quantize_model(model, variables, padded, comq_jax.comq(bits=4),
                                       row_masks=masks)
  alone = comq_jax.quantize_model(model, variables, unpadded, comq_jax.comq(bits=4))
  without_masks = comq_jax.quantize_model(model, variables, padded, comq_jax.comq(bits=4))
  for a, b, c in zip(with_masks.layers, alone.layers, without_masks.layers, strict=True):
    np.testing.assert_allclose(a.error, b.error, rtol=1e-4)
    assert a.error != c.error  # the noise in the padding would have counted
  np.testing.assert_array_equal(
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(with_masks.variables)]),
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(alone.variables)]))


def test_masked_grams_equal_unpadded_grams():
  model = _Attention()
  lengths = [4, 7, 1]
  padded = _token_batch(jax.random.key(3), lengths)
  variables = model.init(jax.random.key(9), padded)
  masked = quant_core.layer_grams(model, variables, [padded], row_masks=[padded[1]])
  alone = quant_core.layer_grams(model, variables, [
      (padded[0][j:j + 1, :n], padded[1][j:j + 1, :n]) for j, n in enumerate(lengths)])
  unmasked = quant_core.layer_grams(model, variables, [padded])
  assert list(masked) == list(alone) == ["embed", "attn/query", "attn/key", "attn/value",
                                         "attn/out", "mlp", "head"]
  for path in masked:
    assert int(masked[path].count) == int(alone[path].count) == sum(lengths)
    assert int(unmasked[path].count) == 3 * 7
    np.testing.assert_allclose(masked[path].gram, alone[path].gram, rtol=1e-5, atol=1e-5)
  # The first layer's Gram from rows built by hand: the valid tokens only.
  rows = padded[0][padded[1]]
  np.testing.assert_allclose(masked["embed"].gram[0],
                             jnp.matmul(rows.T, rows, precision="highest"), rtol=1e-6)


@pytest.mark.parametrize("case", ["dense_general_batch_dims", "einsum_batched_weight",
                                  "einsum_sum", "kernel_rank", "masked_conv"])
def test_unsupported_layers_raise_naming_the_layer(case):
  x = jnp.ones((4, 6, 5))
  layer, message = {
      "dense_general_batch_dims": (nn.DenseGeneral(3, axis=-1, batch_dims=(0,)),
                                   "batch axes"),
      "einsum_batched_weight": (nn.Einsum((4, 5, 3), "btd,bdf->btf"),
                                "kernel axis 'b' indexes the input and the output"),
      "einsum_sum": (nn.Einsum((5, 3), "btd,df->bf"),
                     "input axis 't' is summed without the kernel"),
      "kernel_rank": (nn.Dense(3), "kernel has rank 3"),
      "masked_conv": (nn.Conv(3, (3,), mask=jnp.ones((3, 5, 3))), "kernel mask"),
  }[case]
  model = _LinenNet(layer)
  variables = model.init(jax.random.key(0), x)
  if case == "kernel_rank":
    params = dict(variables["params"])
    params["layer"] = dict(params["layer"], kernel=jnp.ones((5, 3, 1)))
    variables = {"params": params}
  with pytest.raises(ValueError, match=f"^layer \\(nn\\.[A-Za-z]+\\): .*{message}"):
    comq_jax.quantize_model(model, variables, [x], comq_jax.comq(bits=4))
  if case != "kernel_rank":
    # Asked for, it is left in float and listed with the reason.
    result = comq_jax.quantize_model(model, variables, [x], comq_jax.comq(bits=4),
                                     on_unsupported="skip")
    assert [s.path for s in result.skipped] == ["layer"]
    assert message in result.skipped[0].reason
    assert [r.path for r in result.layers] == ["head"]


def test_linear_like_and_uncalled_layers_are_listed_not_dropped():

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, use_extra=False):
      y = nn.ConvTranspose(4, (3,), name="up")(x)
      if use_extra:
        y = nn.Dense(4, name="extra")(y)
      return nn.Dense(2, name="head")(y)

  x = jnp.ones((2, 6, 3))
  model = Net()
  variables = model.init(jax.random.key(0), x, use_extra=True)
  result = comq_jax.quantize_model(model, variables, [x], comq_jax.comq(bits=4))
  assert [r.path for r in result.layers] == ["head"]
  skipped = {s.path: (s.kind, s.reason) for s in result.skipped}
  assert skipped == {
      "up": ("ConvTranspose", "ConvTranspose is not a supported linear layer kind"),
      "extra": ("unknown module", "its kernel was not used by a supported layer's "
                "__call__ on the calibration batches")}


def test_no_quantizable_layer_and_bad_masks_raise():

  class Norm(nn.Module):

    @nn.compact
    def __call__(self, batch):
      return nn.LayerNorm()(batch[0])

  batch = _token_batch(jax.random.key(0), [3, 4])
  norm = Norm()
  with pytest.raises(ValueError, match="no linear layer to quantize"):
    comq_jax.quantize_model(norm, norm.init(jax.random.key(0), batch), [batch],
                            comq_jax.comq(bits=4))
  model = _Attention()
  variables = model.init(jax.random.key(9), batch)
  with pytest.raises(ValueError, match="^embed: the row masks cover zero"):
    comq_jax.quantize_model(model, variables, [batch], comq_jax.comq(bits=4),
                            row_masks=[jnp.zeros((2, 7), bool)])
  with pytest.raises(ValueError, match=r"^embed: a row mask of shape \(7, 2\)"):
    comq_jax.quantize_model(model, variables, [batch], comq_jax.comq(bits=4),
                            row_masks=[jnp.ones((7, 2), bool)])
  with pytest.raises(ValueError, match="1 masks for 2 calibration batches"):
    comq_jax.quantize_model(model, variables, [batch, batch], comq_jax.comq(bits=4),
                            row_masks=[batch[1]])


class _Repeated(nn.Module):
  """Four blocks of the same shape between a stem and a head of other shapes."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    for i in range(4):
      x = x + nn.relu(nn.Conv(8, (3, 3), name=f"block{i}")(x))
    x = nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


def test_compilations_depend_on_distinct_layer_signatures():
  model = _Repeated()
  batches = _batches((2, 6, 6, 2))
  variables = model.init(jax.random.key(0), batches[0])
  first = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4))
  with helpers.count_compilations() as count:
    result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4))
  # Once the small eager programs are cached: the capture and the solves of
  # (1, 18, 8), (1, 72, 8), (32 of 8 groups, 9, 1) and (1, 8, 3); not one per layer.
  assert len(result.layers) == 7
  assert count[0] == 5
  assert result.timings.compilations == 5
  assert first.timings.compilations >= 5


def test_program_bytes_cover_what_the_programs_hold():
  model = _Repeated()
  batches = _batches((2, 6, 6, 2))
  variables = model.init(jax.random.key(0), batches[0])
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4))
  memory = result.timings.program_bytes
  assert set(memory) == {"capture", "solve"}
  # The capture step holds the params, every Gram and the batch; the largest solve
  # at least its Gram and weights.
  params = sum(leaf.nbytes for leaf in jax.tree.leaves(variables["params"]))
  grams = sum(4 * g * d * d for g, d, _ in (r.matrices for r in result.layers))
  assert memory["capture"] >= params + grams + batches[0].nbytes
  assert memory["solve"] >= 4 * (72 * 72 + 72 * 8)


class _Lifted(nn.Module):
  """A remat block (captured) and a scanned stack of blocks (reported, not quantized)."""

  @nn.compact
  def __call__(self, x):

    class Block(nn.Module):

      @nn.compact
      def __call__(self, x, _=None):
        return nn.relu(nn.Dense(8)(x)), None

    x, _ = nn.remat(Block)(name="remat")(x)
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="scan")(x, None)
    return nn.Dense(2, name="head")(x)


def test_layers_inside_remat_are_quantized_and_scanned_layers_are_named():
  model = _Lifted()
  batches = _batches((4, 5))
  variables = model.init(jax.random.key(0), batches[0])
  with pytest.raises(ValueError, match=r"^scan/Dense_0 \(nn.Dense\): its kernel is "
                     r"\(3, 8, 8\) in the params but \(8, 8\) at the call"):
    comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4))
  result = comq_jax.quantize_model(model, variables, batches, comq_jax.comq(bits=4),
                                   on_unsupported="skip")
  assert [r.path for r in result.layers] == ["remat/Dense_0", "head"]
  assert [s.path for s in result.skipped] == ["scan/Dense_0"]
  grams = quant_core.layer_grams(model, variables, batches)
  rows = jnp.concatenate(batches)
  np.testing.assert_allclose(grams["remat/Dense_0"].gram[0],
                             jnp.matmul(rows.T, rows, precision="highest"), rtol=1e-6)
