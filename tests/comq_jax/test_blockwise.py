"""Block-wise quantization (``quantize_model(..., blocks=...)``): the same weights as
layer-wise quantization with the same inputs, bounded memory, meshes, and errors."""

import os
import subprocess
import sys
from typing import Optional

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import comq_jax
from tests.experiments import test_distributed

_SOLVERS = {"comq": comq_jax.comq(4, granularity="channel"),
            "gptq": comq_jax.gptq(3, granularity="group", group_size=8)}


class _Block(nn.Module):
  """A pre-norm gated MLP block: ``up`` and ``gate`` read one array."""
  width: int

  @nn.compact
  def __call__(self, x, scale):
    h = nn.LayerNorm()(x) * scale
    hidden = nn.silu(nn.Dense(2 * self.width, name="up")(h)) * nn.Dense(
        2 * self.width, name="gate")(h)
    return x + nn.Dense(self.width, name="down")(hidden)


class _Net(nn.Module):
  """``embed`` -> blocks (sharing one computed ``scale``) -> ``head``; a ``merge``
  layer between two blocks breaks the chain of hidden states there."""
  depth: int
  width: int = 16
  merge_at: Optional[int] = None
  ends: bool = True

  @nn.compact
  def __call__(self, x):
    scale = 1.0 + 0.1 * jnp.tanh(jnp.mean(x, axis=-1, keepdims=True))
    if self.ends:
      x = nn.Dense(self.width, name="embed")(x)
    for index in range(self.depth):
      if index == self.merge_at:
        x = nn.gelu(nn.Dense(self.width, name="merge")(x))
      x = _Block(self.width, name=f"block_{index}")(x, scale)
    return nn.Dense(4, name="head")(x) if self.ends else x


class _NNXBlock(nnx.Module):

  def __init__(self, width, rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.gate = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, x, scale):
    h = self.norm(x) * scale
    return x + self.down(nnx.silu(self.up(h)) * self.gate(h))


class _NNXNet(nnx.Module):

  def __init__(self, depth, width=16, features=8, *, rngs):
    self.embed = nnx.Linear(features, width, rngs=rngs)
    self.blocks = nnx.List([_NNXBlock(width, rngs) for _ in range(depth)])
    self.head = nnx.Linear(width, 4, rngs=rngs)

  def __call__(self, x):
    scale = 1.0 + 0.1 * jnp.tanh(jnp.mean(x, axis=-1, keepdims=True))
    x = self.embed(x)
    for block in self.blocks:
      x = block(x, scale)
    return self.head(x)


def _batches(features=8, sizes=(4, 4, 2), tokens=6):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal((n, tokens, features)), jnp.float32)
          for n in sizes]


def _linen(depth=3, **options):
  model = _Net(depth, **options)
  batches = _batches(features=8 if options.get("ends", True) else 16)
  return model, model.init(jax.random.key(1), batches[0]), batches


def _assert_same_quantization(got, want):
  assert [r.path for r in got.layers] == [r.path for r in want.layers]
  for a, b in zip(got.layers, want.layers, strict=True):
    np.testing.assert_array_equal(a.quantization.codes, b.quantization.codes, err_msg=a.path)
    np.testing.assert_allclose(a.quantization.weights, b.quantization.weights, rtol=1e-6,
                               atol=1e-7, err_msg=a.path)
    np.testing.assert_allclose(a.error, b.error, rtol=1e-5, err_msg=a.path)
  assert [s.path for s in got.skipped] == [s.path for s in want.skipped]


@pytest.mark.parametrize("method,inputs", [("gptq", "sequential"), ("comq", "fp")])
def test_linen_blocks_equal_layer_by_layer(method, inputs):
  # A merge layer between blocks 1 and 2: block 2's inputs come from the model again.
  model, variables, batches = _linen(merge_at=2)
  masks = [np.arange(b.shape[0] * b.shape[1]).reshape(b.shape[:2]) % 5 != 1 for b in batches]
  kwargs = dict(inputs=inputs, row_masks=masks)
  want = comq_jax.quantize_model(model, variables, batches, _SOLVERS[method], **kwargs)
  got = comq_jax.quantize_model(model, variables, batches, _SOLVERS[method],
                                blocks=r"block_\d+", **kwargs)
  _assert_same_quantization(got, want)
  assert [r.path for r in got.layers][:4] == ["embed", "block_0/up", "block_0/gate",
                                              "block_0/down"]
  # Blocks of one structure share their programs: one Gram program per group.
  assert got.timings.compilations < want.timings.compilations or inputs == "fp"


@pytest.mark.slow  # NNX block-wise also runs in the docs' example (tiny_llama)
def test_nnx_blocks_by_class_equal_layer_by_layer():
  model = _NNXNet(3, rngs=nnx.Rngs(0))
  batches = _batches()
  solver = _SOLVERS["gptq"]
  want = comq_jax.quantize_model(model, None, batches, solver, inputs="sequential")
  got = comq_jax.quantize_model(model, None, batches, solver, inputs="sequential",
                                blocks=_NNXBlock)
  _assert_same_quantization(got, want)
  by_pattern = comq_jax.quantize_model(model, None, batches, solver, inputs="sequential",
                                       blocks=r"blocks/\d+")
  _assert_same_quantization(by_pattern, got)
  # The user's module is unchanged; the result's module carries the new weights.
  assert not np.array_equal(got.model.blocks[0].up.kernel.get_value(),
                            model.blocks[0].up.kernel.get_value())


def _block_program_bytes(depth, **kwargs):
  model, variables, batches = _linen(depth, ends=False)
  result = comq_jax.quantize_model(model, variables, batches, _SOLVERS["gptq"], **kwargs)
  return result.timings.program_bytes


@pytest.mark.parametrize("inputs", ["sequential", pytest.param("fp", marks=pytest.mark.slow)])
def test_block_memory_does_not_grow_with_depth(inputs):
  # Every program's buffers (arguments, outputs, temporaries) as XLA assigns them.
  four = _block_program_bytes(4, inputs=inputs, blocks=r"block_\d+")
  eight = _block_program_bytes(8, inputs=inputs, blocks=r"block_\d+")
  assert set(four) == {"block inputs", "capture", "propagate", "solve"}
  assert eight == four
  if inputs == "fp":
    # Without blocks, the one pass that captures every Gram holds them all.
    assert (_block_program_bytes(8, inputs="fp")["capture"]
            > 1.5 * _block_program_bytes(4, inputs="fp")["capture"])


def test_host_parameters_stay_on_the_host():
  # Parameters given as numpy arrays: the quantized kernels come back as numpy arrays,
  # equal to those of the same parameters on the device.
  model, variables, batches = _linen(2, ends=False)
  kwargs = dict(inputs="fp", blocks=r"block_\d+")
  on_device = comq_jax.quantize_model(model, variables, batches, _SOLVERS["gptq"], **kwargs)
  host = jax.tree.map(np.asarray, variables)
  on_host = comq_jax.quantize_model(model, host, batches, _SOLVERS["gptq"], **kwargs)
  kernel = on_host.variables["params"]["block_1"]["down"]["kernel"]
  assert isinstance(kernel, np.ndarray)
  jax.tree.map(np.testing.assert_array_equal, on_host.variables, on_device.variables)


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:4]), ("batch",))


@pytest.mark.parametrize("method", ["comq"])
def test_blocks_on_a_mesh_equal_one_device(method):
  model, variables, batches = _linen(merge_at=2)
  kwargs = dict(inputs="sequential", blocks=r"block_\d+", microbatch=1)
  single = comq_jax.quantize_model(model, variables, batches, _SOLVERS[method], **kwargs)
  sharded = comq_jax.quantize_model(model, variables, batches, _SOLVERS[method],
                                    mesh=_mesh(), **kwargs)
  jax.tree.map(np.testing.assert_array_equal, sharded.variables, single.variables)
  assert [r.error for r in sharded.layers] == [r.error for r in single.layers]


def _quantize_in_process(out, port, num_processes, process_id):
  """One process of a two-process run: the block model on a mesh over every
  process's devices; process 0 saves the parameters to ``out``."""
  jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  model, variables, batches = _linen(merge_at=2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  result = comq_jax.quantize_model(model, variables, batches, _SOLVERS["comq"], mesh=mesh,
                                   inputs="sequential", blocks=r"block_\d+", microbatch=1)
  if jax.process_index() == 0:
    flat = jax.tree_util.tree_flatten_with_path(result.variables["params"])[0]
    np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat})


@pytest.mark.integration
@pytest.mark.slow  # the 4-device mesh test runs by default
def test_blocks_over_two_processes_equal_one_device(tmp_path):
  model, variables, batches = _linen(merge_at=2)
  single = comq_jax.quantize_model(model, variables, batches, _SOLVERS["comq"],
                                   inputs="sequential", blocks=r"block_\d+", microbatch=1)
  out, port = tmp_path / "params.npz", test_distributed.free_port()
  env = dict(os.environ, PYTHONPATH=test_distributed.REPO, JAX_PLATFORMS="cpu",
             JAX_NUM_CPU_DEVICES="2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true")  # as conftest.py, for bitwise equality
  processes = [subprocess.Popen(
      [sys.executable, "-m", "tests.comq_jax.test_blockwise", str(out), str(port), "2",
       str(i)], cwd=test_distributed.REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    for process in processes:
      log = process.communicate(timeout=test_distributed.TIMEOUT_S)[0]
      assert process.returncode == 0, log[-5000:]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  saved = np.load(out)
  flat = jax.tree_util.tree_flatten_with_path(single.variables["params"])[0]
  assert len(saved.files) == len(flat)
  for path, leaf in flat:
    np.testing.assert_array_equal(saved[jax.tree_util.keystr(path)], leaf,
                                  err_msg=jax.tree_util.keystr(path))


class _Shared(nn.Module):
  """One block module called twice."""

  @nn.compact
  def __call__(self, x):
    block = _Block(8, name="block")
    scale = jnp.ones_like(x[..., :1])
    return block(block(x, scale), scale)


def test_bad_blocks_raise():
  model, variables, batches = _linen()
  solver = _SOLVERS["comq"]
  with pytest.raises(ValueError, match=r"matched no module .* e\.g\. \['block_0'"):
    comq_jax.quantize_model(model, variables, batches, solver, blocks="layers/.*")
  with pytest.raises(ValueError, match="blocks must be a pattern"):
    comq_jax.quantize_model(model, variables, batches, solver, blocks=3)
  with pytest.raises(ValueError, match="not a valid regular expression"):
    comq_jax.quantize_model(model, variables, batches, solver, blocks="block_(")
  with pytest.raises(ValueError, match="blocks is empty"):
    comq_jax.quantize_model(model, variables, batches, solver, blocks=())
  shared = _Shared()
  shared_variables = shared.init(jax.random.key(0), batches[0])
  with pytest.raises(ValueError, match="block block is called more than once"):
    comq_jax.quantize_model(shared, shared_variables, batches, solver, blocks="block")


if __name__ == "__main__":
  _quantize_in_process(*sys.argv[1:])
