"""Deployment of quantized weights: packed codes, the Pallas kernels, packed inference.

Loaded only when used: ``import inq_jax`` and ``import comq_jax`` do not import
Pallas. The names below are imported from their modules on first access.
"""

import importlib

_EXPORTS = {
    "PackedLayer": "packing",
    "PackedPow2": "packing",
    "PackedUniform": "packing",
    "SizeReport": "packing",
    "pack": "packing",
    "pack_layer_quantization": "packing",
    "pack_layer_values": "packing",
    "pack_matrix_values": "packing",
    "pack_params": "packing",
    "pack_uniform": "packing",
    "pack_uniform_from_values": "packing",
    "size_report": "packing",
    "unpack": "packing",
    "unpack_params": "packing",
    "IntResult": "kernels",
    "quantized_matmul": "kernels",
    "quantized_matmul_reference": "kernels",
    "shift_matmul": "kernels",
    "shift_matmul_reference": "kernels",
    "to_float": "kernels",
    "evaluate_packed": "inference",
    "jit_packed_apply": "inference",
    "pack_layers": "inference",
    "pack_quantization": "inference",
    "pack_variables": "inference",
    "packed_apply": "inference",
    "fp32_file_bytes": "files",
    "load_packed": "files",
    "save_packed": "files",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'inq_jax.deploy' has no attribute {name!r}")
  return getattr(importlib.import_module(f"inq_jax.deploy.{_EXPORTS[name]}"), name)


def __dir__():
  return __all__
