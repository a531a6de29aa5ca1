"""`python -m experiments.digits --config=inq_5bit`: quantization on scikit-learn's digits.

Trains the small CNN in full precision, then quantizes it with the config's method (INQ
retraining, or COMQ / round-to-nearest post-training: --config=comq_4bit, rtn_4bit);
no download. See experiments.main for the flags and configs/base.py for the digits
defaults; each config's docstring gives its expected result.
"""

from experiments import main

if __name__ == "__main__":
  main.run("digits")
