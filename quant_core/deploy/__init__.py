"""Deployment of quantized weights: packed codes, the Pallas kernels, packed
inference and the packed file.

Loaded only when used: ``import quant_core``, ``import inq_jax`` and
``import comq_jax`` do not import Pallas. The names below are imported from
their modules on first access:

* :mod:`~quant_core.deploy.codes`: packed code layouts for every grid, exact
  round trip of one matrix;
* :mod:`~quant_core.deploy.packed_layers`: the one packed representation of a
  layer (:class:`PackedLayer`) and :func:`unpack`, the one way back to floats;
* :mod:`~quant_core.deploy.recover`: codes recovered from float values, for
  weights that come from elsewhere;
* :mod:`~quant_core.deploy.sizes`: the one size accounting;
* :mod:`~quant_core.deploy.kernels`: the Pallas kernel family;
* :mod:`~quant_core.deploy.inference`: packing a model and running it;
* :mod:`~quant_core.deploy.packed_methods`: running another method of an NNX
  module packed (e.g. a decoder's cached step);
* :mod:`~quant_core.deploy.files`: the packed model file;
* :mod:`~quant_core.deploy.export_gptq`: GPTQ-format checkpoints (import the module:
  ``from quant_core.deploy import export_gptq``).
"""

import importlib

_EXPORTS = {
    "PackedPow2": "codes",
    "PackedUniform": "codes",
    "pack": "codes",
    "pack_layer_quantization": "codes",
    "pack_uniform": "codes",
    "pack_uniform_from_values": "codes",
    "PackedLayer": "packed_layers",
    "pack_pow2_layer": "packed_layers",
    "pack_quantized_layer": "packed_layers",
    "unpack": "packed_layers",
    "pack_layer_values": "recover",
    "pack_matrix_values": "recover",
    "SizeReport": "sizes",
    "size_report": "sizes",
    "IntResult": "kernels",
    "grouped_quantized_matmul": "kernels",
    "quantized_matmul": "kernels",
    "quantized_matmul_reference": "kernels",
    "shift_matmul": "kernels",
    "shift_matmul_reference": "kernels",
    "to_float": "kernels",
    "jit_packed_apply": "inference",
    "pack_layers": "inference",
    "pack_quantization": "inference",
    "packed_apply": "inference",
    "jit_packed_method": "packed_methods",
    "packed_method_apply": "packed_methods",
    "fp32_file_bytes": "files",
    "load_packed": "files",
    "save_packed": "files",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'quant_core.deploy' has no attribute {name!r}")
  return getattr(importlib.import_module(f"quant_core.deploy.{_EXPORTS[name]}"), name)


def __dir__():
  return __all__
