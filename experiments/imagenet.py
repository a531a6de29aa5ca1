"""`python -m experiments.imagenet --config=inq_5bit --config.init_checkpoint=resnet18.pth`.

INQ on imagenet2012 (TFDS, must be prepared beforehand) from torchvision ResNet weights.
See experiments.main for the flags and configs/base.py for the ImageNet defaults.
"""

from experiments import main

if __name__ == "__main__":
  main.run("imagenet")
