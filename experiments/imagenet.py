"""`python -m experiments.imagenet --config=inq_5bit --config.init_checkpoint=resnet18.pth`.

Quantizes torchvision ResNet weights on imagenet2012 (TFDS, must be prepared beforehand;
the run fails fast with preparation instructions otherwise) with the config's method:
INQ (inq_5bit, ...), COMQ (comq_4bit, ...; 1024 calibration images from the train split)
or round-to-nearest (rtn_4bit, ...). See experiments.main for the flags and
configs/base.py for the ImageNet defaults.
"""

from experiments import main

if __name__ == "__main__":
  main.run("imagenet")
