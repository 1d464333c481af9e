"""`python -m ncf_jax.selfcheck`: does this install reproduce what the package documents?

Runs the machine-independent parts in under a minute on a laptop CPU and compares them
with values recorded in this file: the pipeline hashes (first batch and all batches of
epoch 0) and the evaluation candidates hash of a shrunk default config, the negative
sampler's exactness on a small dataset, and, when several devices are visible, the same
pipeline hashes on all of them. Prints PASS or FAIL per check (a FAIL says what it
means) and exits 0 when every check passes, 1 otherwise. Losses, metrics and
`[params_hash]` depend on the machine (floating point) and are not checked.
"""

from collections.abc import Callable
import dataclasses
import json
import os
import sys
import tempfile

# Recorded with this package (seed 0, 1 device or several: the same integers).
EXPECTED_PIPELINE_HASH_FIRST = '6957becea54c92ce'
EXPECTED_PIPELINE_HASH_ALL = '3335fcc7a9f0e0ff'
EXPECTED_EVAL_CANDIDATES_HASH = '37aa1e8996e26a5c'

# The default config, shrunk: 300 users, 200 items, ~8k positives, 40 steps of 1024.
SHRUNK = {
  'dataset.name': 'synthetic',
  'dataset.synthetic_num_users': 300,
  'dataset.synthetic_num_items': 200,
  'dataset.synthetic_mean_interactions': 30,
  'batch_size': 1024,
  'eval_batch_size': 128,
  'eval_num_neg': 50,
  'num_epochs': 1,
  'hash_pipeline': True,
  'seed': 0,
  'steps_per_call': 1,
}

_RANDOM_BITS = (
  "this install's JAX/XLA generates different random bits (or batches) than the one this "
  'package was recorded with; results will not reproduce the documented hashes'
)


@dataclasses.dataclass
class Check:
  name: str
  ok: bool
  detail: str  # what was seen; for a FAIL, what it means


def shrunk_config(data_dir: str, num_devices: int = 1):
  """configs/default.py with SHRUNK's fields, its data in `data_dir`."""
  from configs import default
  from ncf_jax import config_paths

  values = {**SHRUNK, 'dataset.data_dir': data_dir, 'num_devices': num_devices}
  return config_paths.override(default.get_config(), values)


def run_hashes(num_devices: int = 1) -> dict[str, str]:
  """One epoch of the shrunk config: its pipeline and eval candidates hashes."""
  from absl import logging

  from ncf_jax import train

  with tempfile.TemporaryDirectory(prefix='ncf_jax_selfcheck_') as tmp:
    level = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
      train.train_and_evaluate(shrunk_config(tmp, num_devices), os.path.join(tmp, 'run'))
    finally:
      logging.set_verbosity(level)
    with open(os.path.join(tmp, 'run', 'metrics.jsonl')) as f:
      record = json.loads(f.readline())
    with open(os.path.join(tmp, 'run', 'summary.json')) as f:
      summary = json.load(f)
  return {
    'first': record['pipeline_hash_first'],
    'all': record['pipeline_hash_all'],
    'eval': summary['eval_candidates_hash'],
  }


def check_hashes(got: dict[str, str]) -> list[Check]:
  """The hashes of `run_hashes` against the recorded ones."""
  out = []
  for key, name, want in (
    ('first', 'pipeline hash, first batch of epoch 0', EXPECTED_PIPELINE_HASH_FIRST),
    ('all', 'pipeline hash, all batches of epoch 0', EXPECTED_PIPELINE_HASH_ALL),
    ('eval', 'evaluation candidates hash', EXPECTED_EVAL_CANDIDATES_HASH),
  ):
    if got[key] == want:
      out.append(Check(name, True, got[key]))
    else:
      out.append(Check(name, False, f'{got[key]}, recorded {want}: {_RANDOM_BITS}.'))
  return out


def check_sampler() -> Check:
  """Training negatives on a small dataset: never a positive, every non-positive drawn, and
  the map onto the non-positives is a bijection."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ncf_jax import data as data_lib
  from ncf_jax import sampling

  rng = np.random.default_rng(1)
  num_users, num_items = 12, 40
  positives = [np.sort(rng.choice(num_items, int(rng.integers(1, 30)), False)) for _ in range(12)]
  degrees = np.asarray([p.size for p in positives])
  dataset = data_lib.Dataset(
    name='selfcheck',
    num_users=num_users,
    num_items=num_items,
    train_users=np.repeat(np.arange(num_users), degrees).astype(np.int32),
    train_items=np.concatenate(positives).astype(np.int32),
    user_offsets=np.concatenate([[0], np.cumsum(degrees)]).astype(np.int32),
    test_items=np.asarray([np.setdiff1d(np.arange(num_items), p)[0] for p in positives], np.int32),
  )
  data = sampling.to_device(dataset)
  key = sampling.keypair(jax.random.key(0, impl='threefry2x32'))
  n = 4000
  users = jnp.repeat(jnp.arange(num_users, dtype=jnp.int32), n)
  drawn = np.asarray(sampling.sample_negatives(data, key, users, jnp.arange(users.size)))
  r = np.tile(np.arange(num_items, dtype=np.int32), num_users)
  m = np.repeat(num_items - degrees, num_items)
  user_rows = np.repeat(np.arange(num_users, dtype=np.int32), num_items)
  mapped = np.asarray(
    sampling.nonpositive_at(data, jnp.asarray(user_rows), jnp.asarray(np.minimum(r, m - 1)))
  )
  for u, pos in enumerate(positives):
    nonpos = np.setdiff1d(np.arange(num_items), pos)
    if np.isin(drawn[u * n : (u + 1) * n], pos).any():
      return Check('sampler', False, f'user {u} drew a positive as a negative: {_SAMPLER}')
    if set(drawn[u * n : (u + 1) * n].tolist()) != set(nonpos.tolist()):
      return Check('sampler', False, f'user {u} never drew some non-positive: {_SAMPLER}')
    row = mapped[u * num_items : u * num_items + nonpos.size]
    if not np.array_equal(np.sort(row), nonpos):
      return Check(
        'sampler', False, f'user {u}: not a bijection onto the non-positives: {_SAMPLER}'
      )
  return Check('sampler', True, f'exact on {num_users} users x {num_items} items')


_SAMPLER = 'the negative sampler is not exact on this install (a JAX/XLA bug or a broken build)'


def check_devices(one: dict[str, str], runner: Callable[[int], dict[str, str]]) -> Check | None:
  """The same hashes on every visible device as on one; None with one device."""
  import jax

  n = jax.device_count()
  if n < 2:
    return None
  got = runner(n)
  name = f'same batches on {n} devices as on 1'
  if got == one:
    return Check(name, True, 'pipeline and candidates hashes equal')
  return Check(
    name,
    False,
    f'{got} on {n} devices, {one} on 1: a multi-device run would train on other batches; '
    "this install's collectives or sharding are broken.",
  )


def run_checks(runner: Callable[[int], dict[str, str]] = run_hashes) -> list[Check]:
  """Every check, in order."""
  one = runner(1)
  checks = check_hashes(one) + [check_sampler()]
  multi = check_devices(one, runner)
  return checks + ([multi] if multi is not None else [])


def report(checks: list[Check]) -> int:
  """Prints one line per check; the exit code (0: all passed)."""
  for c in checks:
    print(f'{"PASS" if c.ok else "FAIL"}  {c.name}: {c.detail}', flush=True)
  failed = sum(not c.ok for c in checks)
  if failed:
    print(f'{failed} of {len(checks)} checks failed.', flush=True)
    return 1
  print(f'All {len(checks)} checks passed.', flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] in ('-h', '--help', '-help', '--helpfull'):
    from ncf_jax.errors import CONFIG_FIELDS_HELP

    print(f'{__doc__.strip()}\n\nFlags: none.\n\n{CONFIG_FIELDS_HELP}')
    return 0
  if argv:
    print(f'error: unexpected arguments: {" ".join(argv)} (--help says what this does)')
    return 2
  from ncf_jax import writers

  writers.quiet_library_logs()
  print('Self-check: one shrunk training epoch and the sampler (under a minute on a CPU)...')
  return report(run_checks())


if __name__ == '__main__':
  sys.exit(main())
