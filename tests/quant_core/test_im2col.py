"""The Gram of conv patches: every way of computing it equals the patches' product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant_core import im2col
from quant_core.layers import Convolution

# (kernel_size, padding, kernel_dilation, feature groups, spatial): stride 1.
STRIDE_ONE = [
    ((3, 3), "SAME", 1, 1, (9, 8)),
    ((3, 3), "VALID", 1, 1, (9, 8)),
    ((3, 3), "SAME", 2, 1, (11, 10)),
    ((5, 5), "SAME", 1, 2, (12, 12)),
    ((3, 3), ((2, 0), (1, 3)), 1, 1, (7, 9)),
    ((1, 3), "SAME", 1, 1, (6, 7)),
    ((2, 2), "SAME", 1, 3, (8, 8)),
    ((3,), "SAME", 1, 1, (20,)),
    ((4,), ((1, 2),), 3, 2, (30,)),
    ((3, 3, 3), "SAME", 1, 1, (5, 6, 7)),
    ((3, 3), "SAME", 1, 1, (2, 2)),        # input smaller than the window
    ((3, 3), ((4, 4), (4, 4)), 1, 1, (3, 3)),  # taps that read only padding
]


def _view(kernel_size, padding, dilation, groups, strides=1, cin_per_group=4):
  return Convolution(kernel_shape=kernel_size + (cin_per_group, 6), strides=strides,
                     padding=padding, input_dilation=None, kernel_dilation=dilation,
                     feature_group_count=groups)


def _patches_gram(view, x, row_weight=None):
  rows = im2col.conv_patches(view, x).reshape(-1, view.groups, view.d_in)
  weighted = rows if row_weight is None else rows * row_weight[:, None, None]
  return jnp.einsum("rgf,rgh->gfh", weighted, rows, precision=jax.lax.Precision.HIGHEST)


def _assert_close(gram, reference):
  assert gram.shape == reference.shape and gram.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(reference)))
  np.testing.assert_allclose(gram, reference, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("case", STRIDE_ONE, ids=str)
def test_shifted_gram_equals_the_patches_product(case):
  view = _view(*case[:4])
  x = jax.random.normal(jax.random.key(0), (3, *case[-1], 4 * view.groups))
  geometry = im2col._geometry(view, x.shape[1:-1])
  shifted = im2col._shifted_patch_gram(geometry, x, view.groups)
  reference = _patches_gram(view, x)
  _assert_close(shifted, reference)


@pytest.mark.parametrize("strides, cin_per_group, weighted", [
    (1, 4, False), (2, 4, False), (1, 4, True), (2, 1, True), (1, 1, False)])
def test_patch_gram_equals_the_patches_product(strides, cin_per_group, weighted):
  groups = 3
  view = _view((3, 3), "SAME", 1, groups, strides, cin_per_group)
  x = jax.random.normal(jax.random.key(1), (2, 10, 9, cin_per_group * groups))
  rows = im2col.conv_patches(view, x).shape[0:3]
  weight = (jax.random.bernoulli(jax.random.key(2), 0.7, (np.prod(rows),)).astype(
      jnp.float32) if weighted else None)
  _assert_close(im2col.patch_gram(view, x, groups, weight),
                _patches_gram(view, x, weight))


@pytest.mark.parametrize("shape, expected", [
    ((16, 56, 56, 64), True),    # ResNet-18 layer1: about 2x cheaper measured
    ((16, 14, 14, 256), True),
    ((16, 7, 7, 512), False),    # edges and blocks outweigh the products
    ((1, 4, 4, 8), False),
])
def test_shifted_gram_is_chosen_where_it_is_cheaper(shape, expected):
  view = _view((3, 3), "SAME", 1, 1, cin_per_group=shape[-1])
  assert im2col._shift_pays(im2col._geometry(view, shape[1:-1]), shape, 1) is expected


def test_strided_and_input_dilated_convs_never_take_the_shifted_gram():
  shape = (16, 56, 56, 64)
  strided = _view((3, 3), "SAME", 1, 1, strides=2, cin_per_group=64)
  dilated = Convolution(kernel_shape=(3, 3, 64, 64), strides=1, padding="SAME",
                        input_dilation=2, kernel_dilation=1, feature_group_count=1)
  for view in (strided, dilated):
    assert not im2col._shift_pays(im2col._geometry(view, shape[1:-1]), shape, 1)


@pytest.mark.parametrize("examples", [6, 7])
@pytest.mark.parametrize("strides, cin_per_group, groups, weighted", [
    (1, 4, 1, False), (2, 4, 3, True), (1, 1, 3, True), (1, 8, 1, False)])
def test_patch_gram_in_steps_equals_the_patches_product(monkeypatch, examples, strides,
                                                        cin_per_group, groups, weighted):
  # A budget of about two examples' patches: 6 examples take steps of 2, 7 (prime)
  # steps of 1; the patches of all examples are never formed at once.
  view = _view((3, 3), "SAME", 1, groups, strides, cin_per_group)
  x = jax.random.normal(jax.random.key(3), (examples, 10, 9, cin_per_group * groups))
  rows = im2col.conv_patches(view, x).shape[0:3]
  cin = cin_per_group * groups
  # Per example: 9 taps at each output position, or 13 shifted inputs of 10 x 9.
  example_bytes = 4 * cin * max(9 * rows[1] * rows[2], 13 * 90 if strides == 1 else 0)
  monkeypatch.setattr(im2col, "_GRAM_STEP_BYTES", 2 * example_bytes)
  weight = (jax.random.bernoulli(jax.random.key(4), 0.7, (np.prod(rows),)).astype(
      jnp.float32) if weighted else None)
  jaxpr = jax.make_jaxpr(lambda x, w: im2col.patch_gram(view, x, groups, w))(x, weight)
  assert "scan" in str(jaxpr)
  _assert_close(im2col.patch_gram(view, x, groups, weight), _patches_gram(view, x, weight))
