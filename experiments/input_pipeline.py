"""Input pipelines: scikit-learn digits (embedded, no download) and imagenet2012 (TFDS).

Both expose the same interface to the trainer:
  `num_train_examples`, `image_shape`,
  `train_epoch(batch_size, shuffle_seed, skip_batches)` -> iterator of
      {"image": float32 [B, H, W, C], "label": int32 [B]} (remainder dropped), and
  `eval_batches(batch_size)` -> the test/validation set once, the last batch padded,
      with a float32 "mask" marking real examples.
The training order is a pure function of `shuffle_seed` (the trainer passes (seed, phase,
epoch)), so a resumed run can skip to the batch it stopped at and see the same data.

Multi-process runs: a dataset built for process `process_index` of `process_count` yields
only that process's rows of each global batch, the process_index-th of process_count
equal blocks (`process_rows`), which the trainer assembles into the global batch with
`jax.make_array_from_process_local_data`; `batch_size` stays the global batch size, and
every process yields the same number of batches. Digits slices each global batch, so any
process count sees the same global batches; ImageNet reads only the process's share of
each split (`tfds.split_for_jax_process`), so its global batches depend on the count.

ImageNet uses `tfds` + tf.data rather than `tfds.data_source`: TFDS prepares imagenet2012
as TFRecord by default, which only tf.data reads, and tf.data decodes JPEGs in parallel
C++ threads; determinism comes from a fixed file order, a seeded shuffle and stateless
augmentation keyed by (seed, example index). `builder.as_dataset` is called once per split,
in the constructor: it reads dataset files, and under `tfds.testing.mock_data` it swaps the
process-wide epath/gfile backends for a temporary mock file system while it runs, which
would redirect the file writes of Orbax's background checkpoint thread if it ran during
training ("No ArrayMetadata found for process_index=0").

ImageNet preprocessing (resize size, interpolation, mean/std) follows the model's pretrained
weights: `resolve_preprocessing` fills the config's None fields from configs.base.PREPROCESSING
(torchvision's recipe for the ResNets, timm's pretrained configs for ViT, DeiT and Swin).
"""

import itertools
import math
from typing import NamedTuple

from absl import logging
import numpy as np
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection

from configs import base as base_config
from experiments import models

INTERPOLATIONS = ("bilinear", "bicubic")


class Preprocessing(NamedTuple):
  """ImageNet preprocessing: evaluation resizes the shorter side to `resize_size` and
  centre-crops `image_size`; training random-resized-crops `image_size`; both resample with
  `interpolation` and normalise with `mean`/`std` (RGB, in [0, 1] units)."""
  image_size: int
  resize_size: int
  interpolation: str
  mean: tuple
  std: tuple


def resolve_preprocessing(config):
  """config.data's preprocessing, its None fields taken from the model's pretrained config.

  Args:
    config: an ImageNet config (data.image_size, resize_size, interpolation, mean, std;
      model.name).
  Returns:
    A Preprocessing; resize_size defaults to floor(image_size / crop_pct), timm's rule.
  Raises:
    ValueError: a field is None and the model has no entry in configs.base.PREPROCESSING, or
      a value is out of range.
  """
  data = config.data
  fields = {"interpolation": data.interpolation, "mean": data.mean, "std": data.std}
  defaults = base_config.PREPROCESSING.get(models.canonical_name(config.model.name))
  if defaults is None and (data.resize_size is None or None in fields.values()):
    raise ValueError(f"No pretrained preprocessing known for model {config.model.name!r} "
                     f"(known: {sorted(base_config.PREPROCESSING)}); set config.data."
                     "resize_size, interpolation, mean and std.")
  resize_size = data.resize_size
  if resize_size is None:
    resize_size = math.floor(data.image_size / defaults["crop_pct"])
  fields = {k: defaults[k] if v is None else v for k, v in fields.items()}
  preprocessing = Preprocessing(data.image_size, resize_size, fields["interpolation"],
                                tuple(fields["mean"]), tuple(fields["std"]))
  if preprocessing.interpolation not in INTERPOLATIONS:
    raise ValueError(f"config.data.interpolation={preprocessing.interpolation!r}; expected one "
                     f"of {INTERPOLATIONS}.")
  if preprocessing.resize_size < preprocessing.image_size:
    raise ValueError(f"config.data.resize_size={preprocessing.resize_size} is smaller than the "
                     f"{preprocessing.image_size}-pixel crop.")
  for name in ("mean", "std"):
    if len(getattr(preprocessing, name)) != 3:
      raise ValueError(f"config.data.{name} must have 3 (RGB) values, got "
                       f"{getattr(preprocessing, name)}.")
  return preprocessing


def local_batch_size(batch_size, process_count):
  """Rows of a global batch of `batch_size` that each of `process_count` processes feeds."""
  if batch_size % process_count:
    raise ValueError(f"Batch size {batch_size} must be divisible by the {process_count} "
                     "processes that feed it.")
  return batch_size // process_count


def process_rows(batch_size, process_index, process_count):
  """The rows of a global batch that process `process_index` of `process_count` feeds."""
  rows = local_batch_size(batch_size, process_count)
  return slice(process_index * rows, (process_index + 1) * rows)


def process_block(num_examples, process_index, process_count):
  """(start, stop) of a process's examples in a split: tfds.even_splits' division (the
  first num_examples % process_count processes get one example more)."""
  size, remainder = divmod(num_examples, process_count)
  start = process_index * size + min(process_index, remainder)
  return start, start + size + (process_index < remainder)


def pad_batch(batch, batch_size):
  """Pads every array of `batch` to `batch_size` rows and adds a float32 "mask"."""
  num_real = len(next(iter(batch.values())))
  pad = batch_size - num_real
  padded = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded["mask"] = (np.arange(batch_size) < num_real).astype(np.float32)
  return padded


def in_memory_train_epoch(arrays, batch_size, shuffle_seed, skip_batches=0, process_index=0,
                          process_count=1):
  """One epoch of full batches of ``arrays`` (a dict of arrays with one row per example),
  shuffled by ``shuffle_seed``, from batch ``skip_batches`` on; each process gets its rows
  of every global batch (the remainder that does not fill a batch is dropped)."""
  num_examples = len(next(iter(arrays.values())))
  order = np.random.default_rng(shuffle_seed).permutation(num_examples)
  rows = process_rows(batch_size, process_index, process_count)
  for start in range(skip_batches * batch_size, num_examples - batch_size + 1, batch_size):
    indices = order[start:start + batch_size][rows]
    yield {key: value[indices] for key, value in arrays.items()}


def in_memory_eval_batches(arrays, batch_size, process_index=0, process_count=1):
  """``arrays`` in order, in batches padded to ``batch_size`` with a "mask"; each process
  gets its rows of every global batch."""
  num_examples = len(next(iter(arrays.values())))
  rows = process_rows(batch_size, process_index, process_count)
  for start in range(0, num_examples, batch_size):
    batch = pad_batch({key: value[start:start + batch_size] for key, value in arrays.items()},
                      batch_size)
    yield {key: value[rows] for key, value in batch.items()}


class DigitsData:
  """sklearn `load_digits` (1797 8x8 grayscale images shipped with scikit-learn).

  Split: `train_test_split(stratify=labels, random_state=split_seed, test_size=test_size)`;
  with the defaults (0.25, 0) that is 1347 training and 450 test images. Pixels (0..16)
  are scaled to [0, 1]. Every process holds the whole set and yields its rows of each
  global batch.
  """

  def __init__(self, test_size, split_seed, process_index=0, process_count=1):
    digits = sklearn_datasets.load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    (self.train_images, self.test_images, self.train_labels,
     self.test_labels) = model_selection.train_test_split(
         images, labels, test_size=test_size, random_state=split_seed,
         stratify=labels)
    self.num_train_examples = len(self.train_labels)
    self.image_shape = self.train_images.shape[1:]
    self.process_index, self.process_count = process_index, process_count

  def train_epoch(self, batch_size, shuffle_seed, skip_batches=0):
    return in_memory_train_epoch({"image": self.train_images, "label": self.train_labels},
                                 batch_size, shuffle_seed, skip_batches, self.process_index,
                                 self.process_count)

  def eval_batches(self, batch_size):
    return in_memory_eval_batches({"image": self.test_images, "label": self.test_labels},
                                  batch_size, self.process_index, self.process_count)


class ImageNetNotPreparedError(RuntimeError):
  """imagenet2012 is not prepared in the configured TFDS data_dir."""


def check_prepared(builder, manual_dir):
  """Raises ImageNetNotPreparedError with preparation instructions; never downloads."""
  if builder.is_prepared():
    return
  manual_dir = manual_dir or f"{builder._data_dir_root}/downloads/manual"  # pylint: disable=protected-access
  raise ImageNetNotPreparedError(
      f"{builder.name} is not prepared: no version {builder.version} under data_dir "
      f"{builder.data_dir!r}; looked for the manual download in manual_dir {manual_dir!r}.\n"
      f"ImageNet cannot be downloaded automatically. To prepare it:\n"
      f"  1. place ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual_dir}\n"
      f"  2. run  tfds build {builder.name} --data_dir={builder._data_dir_root} "  # pylint: disable=protected-access
      f"--manual_dir={manual_dir}\n"
      f"     or, in Python, tfds.builder('{builder.name}', data_dir=...).download_and_prepare("
      f"download_config=tfds.download.DownloadConfig(manual_dir='{manual_dir}'))\n"
      f"then set --config.data.data_dir (and --config.data.manual_dir) accordingly.")


class ImageNetData:
  """imagenet2012 from TFDS: Inception-style random resized crop + flip for training;
  resize (shorter side `resize_size`), centre crop `image_size` for evaluation, both with
  `preprocessing.interpolation` (antialiased, like PIL's resampling in torchvision) and
  normalised with its mean/std. Resize and crop offsets round as torchvision's `Resize(int)`
  and `CenterCrop` do. Each process reads its share of the examples used
  (`tfds.split_for_jax_process`).
  """

  def __init__(self, name, data_dir, manual_dir, preprocessing, shuffle_buffer,
               num_train_examples, num_eval_examples, process_index=0, process_count=1):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    # TF only decodes images; keep it off any GPU that JAX uses.
    tf.config.set_visible_devices([], "GPU")
    self.tf = tf
    self.builder = tfds.builder(name, data_dir=data_dir)
    check_prepared(self.builder, manual_dir)
    self.preprocessing = preprocessing
    self.image_size = image_size = preprocessing.image_size
    self.resize_size = preprocessing.resize_size
    self.shuffle_buffer = shuffle_buffer
    self.num_train_examples = (
        num_train_examples or self.builder.info.splits["train"].num_examples)
    self.num_eval_examples = (
        num_eval_examples or self.builder.info.splits["validation"].num_examples)
    self.image_shape = (image_size, image_size, 3)
    self.process_count = process_count
    # Training examples keep their index in the whole split: it keys their augmentation.
    self.first_train_index, _ = process_block(self.num_train_examples, process_index,
                                              process_count)

    def process_split(split, num_examples):
      return tfds.split_for_jax_process(f"{split}[:{num_examples}]",
                                        process_index=process_index,
                                        process_count=process_count)

    # Opened once, here, before any checkpoint is written (see the module docstring).
    self.train_split = self.builder.as_dataset(
        split=process_split("train", self.num_train_examples), shuffle_files=False)
    self.eval_split = self.builder.as_dataset(
        split=process_split("validation", self.num_eval_examples), shuffle_files=False)

  def resize(self, image, size):
    """`image` resampled to `size` (height, width) with the configured interpolation.

    Bicubic can overshoot; clipped to [0, 255] like PIL's 8-bit output.
    """
    tf = self.tf
    image = tf.image.resize(image, size, method=self.preprocessing.interpolation,
                            antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)

  def normalize(self, image):
    tf = self.tf
    mean = tf.constant(self.preprocessing.mean, tf.float32) * 255.0
    std = tf.constant(self.preprocessing.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std

  def train_example(self, index, example, seed):
    tf = self.tf
    crop_seed = tf.stack([seed, tf.cast(index, tf.int32)])
    image = example["image"]
    box_begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=crop_seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, box_begin, box_size)
    image = self.resize(image, (self.image_size, self.image_size))
    image = tf.image.stateless_random_flip_left_right(image, seed=crop_seed + 1)
    return {"image": self.normalize(image), "label": tf.cast(example["label"], tf.int32)}

  def eval_example(self, example):
    tf = self.tf
    image = example["image"]
    shape = tf.shape(image)[:2]
    # torchvision Resize(int): the shorter side becomes resize_size, the longer one
    # int(resize_size * long / short).
    resized = (self.resize_size * shape) // tf.reduce_min(shape)
    image = self.resize(image, resized)
    # torchvision CenterCrop: offset int(round((size - crop) / 2)), half to even as tf.round.
    top, left = tf.unstack(tf.cast(
        tf.round(tf.cast(resized - self.image_size, tf.float32) / 2), tf.int32))
    image = image[top:top + self.image_size, left:left + self.image_size]
    return {"image": self.normalize(image), "label": tf.cast(example["label"], tf.int32)}

  def train_epoch(self, batch_size, shuffle_seed, skip_batches=0):
    tf = self.tf
    # One int32 seed from (seed, phase, epoch), the same on every run and host.
    seed = int(np.random.SeedSequence(shuffle_seed).generate_state(1)[0] >> 1)
    ds = self.train_split.enumerate(start=self.first_train_index)
    ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.map(lambda i, ex: self.train_example(i, ex, tf.constant(seed, tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # As many batches in every process (shares differ by up to one example): each
    # training step is a collective over all of them.
    ds = ds.batch(local_batch_size(batch_size, self.process_count), drop_remainder=True)
    ds = ds.take(self.num_train_examples // batch_size).skip(skip_batches)
    yield from ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

  def eval_batches(self, batch_size):
    tf = self.tf
    rows = local_batch_size(batch_size, self.process_count)
    # Every process yields the batches of the largest share, padding once its own ends.
    largest_share = math.ceil(self.num_eval_examples / self.process_count)
    empty = {"image": np.zeros((0,) + self.image_shape, np.float32),
             "label": np.zeros((0,), np.int32)}
    ds = self.eval_split.map(self.eval_example, num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)
    batches = itertools.chain(ds.batch(rows).prefetch(tf.data.AUTOTUNE).as_numpy_iterator(),
                              itertools.repeat(empty))
    for batch in itertools.islice(batches, math.ceil(largest_share / rows)):
      yield pad_batch(batch, rows)


def create_dataset(config, process_index=0, process_count=1):
  """Builds the dataset named by `config.data.name` from its config fields, yielding the
  rows of process `process_index` of `process_count` (module docstring)."""
  if config.data.name == "digits":
    return DigitsData(config.data.test_size, config.data.split_seed, process_index,
                      process_count)
  if config.data.name == "imagenet2012":
    preprocessing = resolve_preprocessing(config)
    logging.info("ImageNet preprocessing for %s: %s", config.model.name, preprocessing)
    return ImageNetData(
        config.data.name, config.data.data_dir, config.data.manual_dir, preprocessing,
        config.data.shuffle_buffer, config.data.num_train_examples,
        config.data.num_eval_examples, process_index, process_count)
  raise ValueError(f"Unknown dataset {config.data.name!r}; expected digits or imagenet2012.")
