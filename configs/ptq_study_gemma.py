"""MagR, COMQ's options, GPTQ and mixed precision at 3 and 2 bits on Gemma 3 270M.

The cells of the low-bit study that decide its targets (docs/ptq-study.md), at W3 g128
and W2 g64 (asymmetric min-max grids, inputs from the FP model, the calibration and
evaluation windows of llm_ptq_gemma): COMQ with 3 greedy sweeps and scale updates, from
the FP weights or from GPTQ's solution, without and with MagR (per-group l-infinity,
the paper's alpha 1e-4 and 200 steps); GPTQ with MagR; mixed precision at two budgets.
GPTQ, RTN and one-sweep COMQ without MagR are llm_ptq_gemma's runs (same settings and
seed). The points run in the order the study needs them; the first 12 (through COMQ from
GPTQ with MagR at W2 g64) ran, and docs/ptq-study.md quotes their W2 g64 figures. The
last 6 (W3 g128 COMQ with and without MagR on calibration seeds 1 and 2, and
round-to-nearest with MagR) were not run. The whole matrix (every method, with and
without MagR, at 4, 3 and 2 bits, per channel and with groups of 128) comes from
experiments.ptq_study_lm, which captures the Grams once for all its cells.

  python -m experiments.sweep --config=ptq_study_gemma --dataset=text \\
      --workdir=workdirs/sweeps/ptq_study_gemma

18 runs; on 2 CPU cores 2 to 5 minutes each without MagR, 7 to 20 with it. Reduced
(--reduced): W3 g128 COMQ with and without MagR (2 runs).
"""

from configs import llm_ptq_gemma

DATASETS = llm_ptq_gemma.DATASETS
# (name, bits, group size) of each setting.
SETTINGS = (("w3g128", 3, 128), ("w2g64", 2, 64))
BEST_COMQ = {"comq.iters": 3, "comq.scale_update": True}
# (method, extra overrides) run without and with MagR.
METHODS = (("comq", BEST_COMQ), ("comq", {**BEST_COMQ, "comq.init": "gptq"}))
# Mixed precision with the best COMQ option, groups of 128, bits from {2, 3, 4, 8}:
# budgets in bits per weight with the grid parameters as stored (a float32 scale and an
# int32 zero point per group, 0.5 bits per weight at g128): 3.5 is uniform W3 g128's
# storage (3.0 code bits), 3.0 that of uniform W2 g64 (2.5 code bits).
MIXED_BUDGETS = (3.5, 3.0)
# Calibration seeds 1 and 2 of the W3 g128 comparison with and without MagR.
SEEDED = ("w3g128", METHODS[0])


def get_config(dataset="text"):
  config = llm_ptq_gemma.get_config(dataset)
  config.name = "ptq_study_gemma"
  return config


def sweep(add, reduced=False):
  # In order of what the study's conclusions need first (a sweep stopped early leaves
  # the least needed points out): per setting, the best COMQ options without MagR, COMQ
  # and GPTQ with MagR, then COMQ from GPTQ with MagR.
  comq, gptq_start = METHODS
  order = ((*comq, None), (*comq, "magr"), ("gptq", {}, "magr"), (*gptq_start, None),
           (*gptq_start, "magr"))
  if reduced:
    for method, extra, preprocess in order[:2]:
      add(**_point(method, extra, 3, 128, preprocess))
    return
  (_, bits3, group3), (_, bits2, group2) = SETTINGS
  for method, extra, preprocess in order[:4]:
    add(**_point(method, extra, bits3, group3, preprocess))
  for budget in MIXED_BUDGETS:
    add(**_point(*comq, 3, 128, None), **{"comq.bit_budget": budget})
  add(**_point(*order[4][:2], bits3, group3, "magr"))
  for method, extra, preprocess in (order[0], order[3], order[1], order[2], order[4]):
    add(**_point(method, extra, bits2, group2, preprocess))
  name, (method, extra) = SEEDED
  _, bits, group_size = next(setting for setting in SETTINGS if setting[0] == name)
  for seed in (1, 2):
    for preprocess in (None, "magr"):
      add(**_point(method, extra, bits, group_size, preprocess), seed=seed)
  for _, bits, group_size in SETTINGS:
    add(**_point("rtn", {}, bits, group_size, "magr"))


def _point(method, extra, bits, group_size, preprocess):
  point = {"method": method, **extra, f"{method}.bits": bits,
           f"{method}.granularity": "group", f"{method}.group_size": group_size}
  if preprocess:
    point[f"{method}.preprocess"] = preprocess
  return point
