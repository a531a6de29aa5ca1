"""`python -m experiments.llm --config=llm_comq_4bit`: quantization of a language model.

With no model name, trains the embedded byte-level Llama-style model on the bundled King
James Bible (about a minute on 2 CPU cores, no download), then quantizes it with the
config's method (llm_inq_5bit, llm_comq_4bit, llm_gptq_4bit, llm_rtn_4bit, ...) and
reports the perplexity of the FP and the quantized model on held-out windows, the time of
each phase, and the packed model's size. `--config.model.name=gemma3_270m` evaluates and
quantizes Gemma 3 270M instead (its GGUF weights from the extra llm-weights, or
`--config.init_checkpoint=PATH`). See experiments.main for the flags and configs/base.py
(`text_defaults`) for the defaults.
"""

from experiments import main

if __name__ == "__main__":
  main.run("text")
