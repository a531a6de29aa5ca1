"""`python -m experiments.digits --config=inq_5bit`: INQ on scikit-learn's embedded digits.

Trains the small CNN in full precision, then runs INQ; no download. See experiments.main
for the flags and configs/base.py for the digits defaults.
"""

from experiments import main

if __name__ == "__main__":
  main.run("digits")
