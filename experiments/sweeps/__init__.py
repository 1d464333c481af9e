"""Sweep files: each defines `get_sweep()`, a list of {'config.<field>': value} points.

Run one with `python -m experiments.sweep --config=... --sweep=experiments/sweeps/<f>.py`.
"""
