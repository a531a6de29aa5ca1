"""Gemma 3 270M on the grids of GGUF's block formats, exported as GGUF files.

Q4_0's grid (``grid="signed"``: 16 levels ``d (q - 8)``, d the block's largest-magnitude
weight over -8, groups of 32, float16 scales) with round-to-nearest (llama.cpp's own Q4_0
rounding), GPTQ and COMQ (3 greedy sweeps with scale updates), and Q8_0's grid
(``grid="symmetric"`` at 8 bits) with round-to-nearest; every run writes
``model.gguf`` (`--config.export=gguf`), whose weights read back equal the run's, so the
perplexity reported is the exported file's. Calibration and evaluation windows are
llm_ptq_gemma's.

GPTQ and COMQ, whose difference is small, also run with calibration seeds 1 and 2.

  python -m experiments.sweep --config=gguf_export_gemma --dataset=text \\
      --workdir=workdirs/sweeps/gguf_export_gemma

8 runs, 3 to 4 minutes each on 2 CPU cores. Reduced (--reduced): the Q4_0 RTN run.
"""

from configs import llm_ptq_gemma

DATASETS = llm_ptq_gemma.DATASETS
Q4_0 = {"grid": "signed", "bits": 4}
# (method, grid settings, extra overrides) of each run.
RUNS = (("rtn", Q4_0, {}), ("gptq", Q4_0, {}),
        ("comq", Q4_0, {"comq.iters": 3, "comq.scale_update": True}),
        ("rtn", {"grid": "symmetric", "bits": 8}, {}))


def get_config(dataset="text"):
  config = llm_ptq_gemma.get_config(dataset)
  config.name = "gguf_export_gemma"
  config.export = "gguf"
  for method in ("comq", "gptq", "rtn"):
    config[method].granularity = "group"
    config[method].group_size = 32
    config[method].scale_dtype = "float16"
  return config


# Runs (by index in RUNS) repeated with calibration seeds 1 and 2.
SEEDED = (1, 2)


def _point(method, grid, extra):
  return {"method": method, **{f"{method}.{key}": value for key, value in grid.items()},
          **extra}


def sweep(add, reduced=False):
  for run in RUNS[:1] if reduced else RUNS:
    add(**_point(*run))
  if not reduced:
    for seed in (1, 2):
      for index in SEEDED:
        add(**_point(*RUNS[index]), seed=seed)
