r"""The popularity baseline of a model comparison: no training, the same candidates.

  python -m experiments.popularity --config=configs/ncf_paper.py --seeds=0,1,2 \
      --workdir=runs/compare/popularity

Scores every candidate by its number of training positives (`ncf_jax.baselines`) and
evaluates those scores on exactly the candidates a trained run of the same config and
seed evaluates: the run's data key (`steps.make_keys(seed)`) draws the same negatives for
the validation and the test split. Seed s writes WORKDIR/seed=<s>/summary.json with
valid_* and test_* (HR@K, NDCG@K, MRR@K), in summary.json's own keys, so that
experiments.compare reads it like a trained run's. It runs as its own process so that
the comparison itself never starts a JAX backend.
"""

import json
import os

from absl import app, flags

from ncf_jax import baselines, config_checks, launch, steps, writers
from ncf_jax import data as data_lib
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags

FLAGS = flags.FLAGS


def evaluate_seed(config, dataset: data_lib.Dataset, seed: int) -> dict:
  """valid_* (with a validation split) and test_* metrics of popularity for `seed`."""
  _, data_key, _ = steps.make_keys(seed, steps.make_mesh(1))
  scorer = baselines.popularity_scorer(dataset)
  splits = ['test'] if config.validation == 'none' else ['valid', 'test']
  out: dict = {'seed': seed, 'model': 'popularity', 'validation': config.validation}
  for split in splits:
    result = baselines.evaluate_scorer(
      dataset,
      data_key,
      scorer,
      num_neg=int(config.eval_num_neg),
      top_k=int(config.top_k),
      match_mlperf=bool(config.match_mlperf),
      split=split,
    )
    out.update({f'{split}_{k}': v for k, v in result.items()})
  return out


def define_flags() -> None:
  launch.define_run_flags()
  flags.DEFINE_list('seeds', ['0'], 'Seeds whose candidates are evaluated.')


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.workdir:
    raise UserError('pass --workdir=DIR: each seed gets DIR/seed=<s>/summary.json.')
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise UserError(f'--seeds={",".join(FLAGS.seeds)}: use integers, e.g. --seeds=0,1,2.') from None
  writers.quiet_library_logs()
  config = config_checks.resolve_model_defaults(FLAGS.config)
  config_checks.validate_config(config, 1)
  dataset = data_lib.load(config.dataset, config.validation)
  for seed in seeds:
    result = evaluate_seed(config, dataset, seed)
    folder = os.path.join(FLAGS.workdir, f'seed={seed}')
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, 'summary.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, 'summary.json'))
    print(
      f'popularity, seed {seed}: '
      + ', '.join(f'{k} {v:.4f}' for k, v in result.items() if k.startswith(('valid_', 'test_'))),
      flush=True,
    )


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
