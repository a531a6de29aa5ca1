"""The libraries install and import on their own: no experiment dependency, no Pallas."""

import importlib
import os
import shutil
import subprocess
import sys
import types
import venv

import pytest

import comq_jax
import inq_jax
import quant_core

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a bare install must be able to do: import both packages without Pallas or any
# experiment dependency, then quantize a layer with each library. (orbax-checkpoint
# and absl-py come with flax itself.)
BARE_CHECK = """
import importlib.util, sys
import jax, jax.numpy as jnp
import comq_jax, inq_jax, quant_core
for heavy in ("jax.experimental.pallas", "quant_core.deploy.kernels"):
  assert heavy not in sys.modules, heavy
for extra in ("tensorflow", "tensorflow_datasets", "ml_collections", "sklearn",
              "matplotlib", "pandas"):
  assert importlib.util.find_spec(extra) is None, extra
w = 0.1 * jax.random.normal(jax.random.key(0), (16, 8))
x = jax.random.normal(jax.random.key(1), (64, 16))
assert (comq_jax.comq(bits=4).quantize_layer(w, x).error
        <= comq_jax.rtn(bits=4).quantize_layer(w, x).error)
quantizer = inq_jax.inq(bits=5)
params = {"dense": {"kernel": w}}
params, state = quantizer.step(params, quantizer.init(params), 1.0)
assert inq_jax.codebook_fraction(params, state) == 1.0
# The packed file is a library feature: save, load and run a packed model.
import flax.linen as nn
from quant_core import deploy
net = nn.Dense(8)
variables = net.init(jax.random.key(2), x)
result = comq_jax.quantize_model(net, variables, [x], comq_jax.comq(bits=4))
deploy.save_packed("packed.safetensors", deploy.pack_quantization(result))
loaded = deploy.load_packed("packed.safetensors", like=variables)
y = deploy.packed_apply(net, loaded, x)
expected = net.apply(result.variables, x)
assert float(jnp.max(jnp.abs(y - expected))) <= 1e-4 * float(jnp.max(jnp.abs(expected)))
print("bare install ok")
"""


@pytest.mark.integration
def test_importing_the_libraries_does_not_import_pallas():
  check = ("import sys, comq_jax, inq_jax, quant_core\n"
           "print(sorted(m for m in ('jax.experimental.pallas', 'quant_core.deploy.kernels')"
           " if m in sys.modules))\n"
           "quant_core.deploy.shift_matmul\n"
           "print('jax.experimental.pallas' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                       check=True, cwd=REPO).stdout.split("\n")
  assert out[:2] == ["[]", "True"]  # loaded on first use of a kernel, not before


LIBRARIES = ("quant_core", "inq_jax", "comq_jax")


def test_all_lists_resolvable_public_names():
  for package in (inq_jax, comq_jax, quant_core.deploy):
    names = package.__all__
    assert names == sorted(set(names)), package.__name__  # sorted, no duplicates
    # A star import binds exactly the listed names, to the package's own objects.
    namespace = {}
    exec(f"from {package.__name__} import *", namespace)  # noqa: S102
    del namespace["__builtins__"]
    assert sorted(namespace) == names, package.__name__
    for name in names:
      value = namespace[name]
      assert value is getattr(package, name), (package.__name__, name)
      assert not name.startswith("_") and not isinstance(value, types.ModuleType), name
      if callable(value):
        # Functions and classes are the libraries' own, defined under that name in
        # the module they name, and documented.
        module = value.__module__
        assert module.split(".")[0] in LIBRARIES, (package.__name__, name, module)
        assert getattr(importlib.import_module(module), value.__name__) is value, name
        assert value.__name__ == name and (value.__doc__ or "").strip(), name
      else:
        assert name.isupper() and value is not None, (package.__name__, name)


# Slow (about 45 s, a pip install): CI's own fresh install covers the package with its
# extras; this checks the bare library without them.
@pytest.mark.slow
@pytest.mark.integration
def test_bare_library_installs_into_a_fresh_venv_and_imports(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.py", "README.md"):
    shutil.copy(os.path.join(REPO, name), source)
  for package in ("quant_core", "inq_jax", "comq_jax"):
    shutil.copytree(os.path.join(REPO, package), source / package,
                    ignore=shutil.ignore_patterns("__pycache__"))
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)], check=True)
  out = subprocess.run([python, "-c", BARE_CHECK], capture_output=True, text=True,
                       cwd=str(tmp_path), env={"PATH": os.environ["PATH"],
                                               "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "bare install ok"
