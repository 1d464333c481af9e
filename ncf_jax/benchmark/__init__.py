"""Benchmarks (`python -m ncf_jax.benchmark`, see __main__.py): one module per section.

cli.py              flags, the section registry, `main`
data_section.py     parse + preprocess an ml-20m-sized ratings.csv, the cache, peak RSS
sampler_section.py  training negatives, epoch batches and eval candidates vs raw draws
train_section.py    train-step samples/s of the MLPerf NeuMF, its breakdown, eval users/s
common.py           the sections' arguments, ml-20m's sizes, the scaled dataset
timing.py           best-of timing on the JAX backend
peers.py            the NumPy sampler and PyTorch NeuMF compared against
"""

from ncf_jax.benchmark.cli import main as main
