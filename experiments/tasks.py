"""What a run learns and is scored on: the plug of `experiments.train.train_and_evaluate`.

A task owns the data, the model, the loss and the metric. The job (phases, checkpoints,
resumption, logging, the methods of `experiments.methods`, results.json, sweeps) is the
same for every task:

* :class:`ImageClassification`: a linen CNN or vision transformer on digits or ImageNet;
  softmax cross-entropy, test accuracy.
* :class:`LanguageModeling`: a decoder language model in NNX (`experiments.models.llm`) on
  fixed token windows of a text (`experiments.text_data`); next-token cross-entropy,
  perplexity on held-out windows.

The methods see a model only through :meth:`bound` (what `comq_jax.quantize_model`,
`inq_jax.pack_model` and `quant_core.deploy` take: a linen module and its variables, or an
NNX module) and :attr:`apply_kwargs` (the evaluation-mode keyword arguments of its call).
Variables are always ``{"params": ..., other collections}`` with plain nested dicts, so
that optimizers, INQ masks and Orbax checkpoints treat both tasks alike.
"""

import math

from absl import logging
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments import input_pipeline
from experiments import llm_export
from experiments import models
from experiments import text_data
from experiments import timm_import
from experiments import torchvision_import
import quant_core


class ImageClassification:
  """Images to class logits (a linen model): cross-entropy, accuracy."""

  metric = "accuracy"
  # results.json keys of the FP, final and packed-model metric, and of INQ's portions.
  result_keys = ("fp_accuracy", "final_accuracy", "packed_accuracy", "portion_accuracies")
  apply_kwargs = {"train": False}

  def __init__(self, config, dataset):
    self.config, self.dataset = config, dataset
    # The transformers are built for the data's image size (CNNs take any).
    self.model = models.create_model(config.model.name, config.model.num_classes,
                                     image_size=dataset.image_shape[0],
                                     window_size=config.model.get("window_size"))
    self.example = jnp.zeros((1,) + dataset.image_shape, jnp.float32)
    self.trains_fp = True

  @staticmethod
  def inputs(batch):
    return batch["image"]

  def init_variables(self, rng):
    return jax.jit(lambda key: self.model.init(key, self.example, train=False))(rng)

  def import_weights(self, variables):
    """``variables`` with config.init_checkpoint's weights (timm weights for the
    transformers, torchvision's otherwise), or None without a checkpoint; the importer
    converts every variable or raises naming the key."""
    if not self.config.init_checkpoint:
      return None
    if isinstance(self.model, (models.VisionTransformer, models.SwinTransformer)):
      source, importer = "timm", timm_import.import_timm
    else:
      source, importer = "torchvision", torchvision_import.import_torchvision
    logging.info("Importing %s weights from %s", source, self.config.init_checkpoint)
    return importer(self.config.init_checkpoint, variables)

  def forward(self, variables, inputs, *, train, mutable=()):
    """(logits, updated collections) of the model on ``inputs``."""
    if mutable:
      return self.model.apply(variables, inputs, train=train, mutable=list(mutable))
    return self.model.apply(variables, inputs, train=train), {}

  @staticmethod
  def loss(logits, batch):
    """(mean cross-entropy, accuracy) of a training batch."""
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels, dtype=jnp.float32)

  @staticmethod
  def eval_sums(logits, batch):
    """(correct predictions, examples) of an evaluation batch, padding masked out."""
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(correct * batch["mask"]), jnp.sum(batch["mask"])

  @staticmethod
  def summarize(sums):
    return float(sums[0] / sums[1])

  def bound(self, variables):
    """(model, variables) as the quantization libraries take them."""
    return self.model, variables

  def float_rules(self):
    """Rules (pattern, None) of layers the post-training methods keep in float by
    default: none (skip_first_last adds the recipe's first and last layers)."""
    return []

  # Why the post-training methods' skip_first_last does not apply (None: it does).
  skip_first_last_error = None

  def skips_first_last(self):
    """The recipe's skip_first_last when the config leaves it None: the official COMQ
    code leaves the timm transformers' patch embedding and head in float; the CNN
    recipes quantize every layer."""
    return models.canonical_name(self.config.model.name) in models.TIMM_NAMES.values()


class LanguageModeling:
  """A decoder language model on token windows: next-token cross-entropy, perplexity.

  A batch is ``{"tokens": int32 (B, L)}`` (evaluation adds ``"mask"``); the model reads
  ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``, so each window scores ``L - 1`` tokens
  and the perplexity is that of `experiments.text.perplexity` on the same windows. The
  model's parameters are the pure dict of its ``nnx.Param`` state (integer keys for its
  list of blocks).
  """

  metric = "perplexity"
  result_keys = ("fp_perplexity", "perplexity", "packed_perplexity", "portion_perplexities")
  apply_kwargs = {}

  def __init__(self, config, process_index=0, process_count=1):
    llm_export.check_export(config)
    self.config = config
    self.source = text_data.model_source(config)
    self.trains_fp = self.source.weights is None
    self.model = self.source.build_model(config.seed)
    self.tokenizer = self.source.tokenizer(self.model)
    self.dataset = text_data.create_text_dataset(config, self.tokenizer,
                                                 self.model.config.vocab_size,
                                                 process_index, process_count)
    self._split = quant_core.nnx_params.NNXParams(self.model)
    self.example = jnp.zeros((1, self.dataset.window_length - 1), jnp.int32)

  @staticmethod
  def inputs(batch):
    return batch["tokens"][:, :-1]

  def init_variables(self, rng):
    del rng  # the model is built (initialized from config.seed, or imported) with the task
    return {"params": nnx.to_pure_dict(nnx.state(self.model, nnx.Param))}

  def import_weights(self, variables):
    """The checkpoint's weights as variables, or None for a model trained here."""
    if self.source.weights is None:
      return None
    logging.info("Imported %s weights from %s", self.source.name, self.source.weights)
    return self.init_variables(variables)  # the model was built with them

  def module(self, params):
    """The NNX model with ``params`` (a pure dict) as its ``nnx.Param`` state."""
    return self._split.with_params(params)

  def forward(self, variables, inputs, *, train, mutable=()):
    del train, mutable  # no dropout and no state besides the parameters
    return self.module(variables["params"])(inputs), {}

  @staticmethod
  def loss(logits, batch):
    """(mean next-token cross-entropy, next-token accuracy) of a training batch."""
    targets = batch["tokens"][:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == targets, dtype=jnp.float32)

  @staticmethod
  def eval_sums(logits, batch):
    """(summed next-token NLL, predicted tokens) of an evaluation batch."""
    targets = batch["tokens"][:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                          targets)
    mask = batch["mask"][:, None]
    return jnp.sum(nll * mask), jnp.sum(mask) * targets.shape[1]

  @staticmethod
  def summarize(sums):
    return math.exp(float(sums[0] / sums[1]))

  def bound(self, variables):
    """(the NNX model holding ``variables["params"]``, None), as the quantization
    libraries take an NNX model."""
    return self.module(variables["params"]), None

  def float_rules(self):
    """An untied output head stays in float, as in GPTQ's and most LLM recipes (a tied
    head is the embedding table, which no method quantizes); named in the skipped list."""
    if self.model.lm_head is None:
      return []
    return [("lm_head", None)]

  skip_first_last_error = ("is for image models; a language model's embedding (and tied "
                           "head) always stays in float, and an untied lm_head too.")

  @staticmethod
  def skips_first_last():
    return False


def create_task(config, process_index=0, process_count=1):
  """The task of ``config.dataset``: language modelling for "text", else image
  classification on the dataset of `experiments.input_pipeline`."""
  if config.dataset == "text":
    return LanguageModeling(config, process_index, process_count)
  dataset = input_pipeline.create_dataset(config, process_index, process_count)
  return ImageClassification(config, dataset)

