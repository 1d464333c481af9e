"""Experiments on top of ncf_jax: sweeps, seed studies, the Colab notebook, reports.

Each command launches `python -m ncf_jax.train` runs and reads back what they write
(config.json, metrics.jsonl, summary.json); nothing here changes how a run trains.
"""
