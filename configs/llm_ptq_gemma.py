"""The post-training methods on Gemma 3 270M: perplexity and quantization time.

method {RTN, GPTQ, GPTQ with act-order (static groups), COMQ, COMQ started from GPTQ's
solution, COMQ on the power-of-two grid} x setting {W4 g128, W3 g128, W2 g64}, every
grid asymmetric min-max but the power-of-two one, plus the FP model, on the same
128 calibration windows of 128 tokens (seed 0) and the same 64 held-out evaluation windows
of the King James Bible; GPTQ and COMQ at W3 g128 also with calibration seeds 1 and 2
(4 more runs). The defaults of each method are those of llm_comq_4bit,
llm_gptq_4bit and llm_rtn_4bit (COMQ: one greedy sweep; GPTQ: blocks of 128, 1%
dampening). Gemma 3 270M comes from the extra llm-weights (GGUF Q4_K_M, de-quantized).

Full sweep (23 runs, about 80 minutes on 2 CPU cores; each run loads the model, evaluates
FP, captures the Grams, solves, evaluates and writes its packed file):
  python -m experiments.sweep --config=llm_ptq_gemma --dataset=text \\
      --workdir=workdirs/sweeps/llm_ptq_gemma
Reduced (--reduced: W4 g128 only, RTN, GPTQ and COMQ, 3 runs).
"""

from configs import base
from configs import comq_4bit

DATASETS = base.TEXT_DATASETS
# (name, bits, group size) of each setting.
SETTINGS = (("w4g128", 4, 128), ("w3g128", 3, 128), ("w2g64", 2, 64))
# (method, extra overrides).
METHODS = (("rtn", {}), ("gptq", {}),
           ("gptq", {"gptq.act_order": True, "gptq.static_groups": True}),
           ("comq", {}), ("comq", {"comq.init": "gptq"}), ("comq", {"comq.grid": "pow2"}))


def get_config(dataset="text"):
  config = comq_4bit.get_config(base.check_text_dataset(dataset, "llm_ptq_gemma"))
  config.name = "llm_ptq_gemma"
  config.model.name = "gemma3_270m"
  return config


# Settings where the calibration sample's spread matters: GPTQ and COMQ at W3 g128 also
# run with calibration seeds 1 and 2.
SEEDED = ("w3g128", ("gptq", "comq"))


def sweep(add, reduced=False):
  if not reduced:
    add(method="fp")
  for _, bits, group_size in SETTINGS[:1] if reduced else SETTINGS:
    for method, extra in METHODS:
      if reduced and extra:
        continue
      point = {"method": method, **extra, f"{method}.bits": bits,
               f"{method}.granularity": "group", f"{method}.group_size": group_size}
      add(**point)
  if not reduced:
    name, methods = SEEDED
    _, bits, group_size = next(setting for setting in SETTINGS if setting[0] == name)
    for seed in (1, 2):
      for method in methods:
        add(**{"method": method, f"{method}.bits": bits, f"{method}.granularity": "group",
               f"{method}.group_size": group_size, "seed": seed})
