"""Autoregressive generation with a KV cache: one prefill of the prompt, then one cached
step per new token, each step a compiled function reused across calls.

With ``packed_variables`` (a quantized model packed by ``quant_core.deploy``), every step
runs the model's ``forward_with_cache`` with its packed linear layers through the
``quantized_matmul`` kernels (:func:`quant_core.deploy.packed_methods.jit_packed_method`).
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models.llm.decoder import CausalLM


@functools.partial(jax.jit, static_argnums=0)
def _cached_forward(graphdef, state, tokens, cache):
  return nnx.merge(graphdef, state).forward_with_cache(tokens, cache)


def cached_forward(model: CausalLM, *, packed_variables: Optional[Any] = None) -> Callable:
  """The compiled ``forward_with_cache`` step that :func:`generate` runs.

  Each input shape compiles once and is reused across calls (and across models of one
  structure): in a decode loop, once for the prompt and once for the one-token steps.

  Args:
    model: a :class:`CausalLM`; its state is read as it is now.
    packed_variables: optional packed parameters of ``model`` (from
      ``quant_core.deploy.pack_quantization`` or ``load_packed``): the packed linear
      layers then run through ``quantized_matmul``, in the Pallas interpreter on CPU.

  Returns:
    ``forward(tokens, cache) -> (logits, cache)``, as
    :meth:`CausalLM.forward_with_cache`.
  """
  # On the device once: host (numpy) leaves would otherwise be copied at every step.
  if packed_variables is None:
    graphdef, state = nnx.split(model)
    return functools.partial(_cached_forward, graphdef, jax.device_put(state))
  # Imported here: float decoding does not load the kernels (Pallas).
  from quant_core.deploy import packed_methods  # noqa: PLC0415
  step = packed_methods.jit_packed_method(model, "forward_with_cache")
  return functools.partial(step, jax.device_put(packed_variables))


def _check_arguments(model, prompt, max_new_tokens, temperature, rng):
  if not isinstance(model, CausalLM):
    raise ValueError(f"model must be a CausalLM (Llama, Gemma3), got {type(model).__name__}.")
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError("prompt_tokens must be (length,) or (batch, length) with length >= 1, "
                     f"got shape {prompt.shape}.")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng, a jax.random key.")


def generate_with_logits(model: CausalLM, prompt_tokens, max_new_tokens: int, *,
                         temperature: float = 0.0, rng: Optional[jax.Array] = None,
                         packed_variables: Optional[Any] = None):
  """Like :func:`generate`, and also returns the logits each new token was chosen from.

  Returns:
    ``(tokens, logits)``: the prompt followed by the new tokens, ``(batch, length +
    max_new_tokens)`` (or without the batch axis for a 1-D prompt), and the float32
    ``(batch, max_new_tokens, vocab_size)`` logits (same batch convention): entry ``i`` is
    the prediction after the prompt and the first ``i`` new tokens.
  """
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  unbatched = prompt.ndim == 1
  if unbatched:
    prompt = prompt[None]
  _check_arguments(model, prompt, max_new_tokens, temperature, rng)
  forward = cached_forward(model, packed_variables=packed_variables)
  batch_size, length = prompt.shape
  cache = model.init_cache(batch_size, length + max_new_tokens)
  new_tokens, step_logits = [], []
  if max_new_tokens:
    logits, cache = forward(prompt, cache)
  for step in range(max_new_tokens):
    last = logits[:, -1]
    if temperature == 0:
      token = jnp.argmax(last, axis=-1).astype(jnp.int32)
    else:
      token = jax.random.categorical(jax.random.fold_in(rng, step), last / temperature)
      token = token.astype(jnp.int32)
    new_tokens.append(token)
    step_logits.append(last)
    if step + 1 < max_new_tokens:
      logits, cache = forward(token[:, None], cache)
  vocab_size = model.embed.num_embeddings
  tokens = jnp.concatenate([prompt] + [token[:, None] for token in new_tokens], axis=1)
  logits = (jnp.stack(step_logits, axis=1) if step_logits
            else jnp.zeros((batch_size, 0, vocab_size), jnp.float32))
  return (tokens[0], logits[0]) if unbatched else (tokens, logits)


def generate(model: CausalLM, prompt_tokens, max_new_tokens: int, *,
             temperature: float = 0.0, rng: Optional[jax.Array] = None,
             packed_variables: Optional[Any] = None) -> jax.Array:
  """Extends a prompt token by token, reusing a KV cache.

  Greedy (argmax) when ``temperature`` is 0, else each token is sampled from
  ``softmax(logits / temperature)``. Every prompt of a batch has the same length (no
  padding); there is no stop token.

  Args:
    model: a :class:`CausalLM` (e.g. from :func:`create_llm`).
    prompt_tokens: ``(length,)`` or ``(batch, length)`` integer token ids.
    max_new_tokens: how many tokens to add.
    temperature: 0 for greedy decoding, else the sampling temperature.
    rng: a ``jax.random`` key, needed when sampling.
    packed_variables: optional packed parameters of ``model`` (from
      ``quant_core.deploy.pack_quantization`` or ``load_packed``): the prefill and every
      step then run the packed linear layers through ``quantized_matmul`` (see
      :func:`cached_forward`); ``model`` gives the structure and the other state.

  Returns:
    The prompt followed by the new tokens, int32 ``(batch, length + max_new_tokens)``
    (``(length + max_new_tokens,)`` for a 1-D prompt).

  Raises:
    ValueError: for a prompt of the wrong shape, a negative count or temperature, or
      sampling without ``rng``.
  """
  tokens, _ = generate_with_logits(model, prompt_tokens, max_new_tokens,
                                   temperature=temperature, rng=rng,
                                   packed_variables=packed_variables)
  return tokens
