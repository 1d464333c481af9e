"""`python -m ncf_jax.evaluate --workdir=DIR [--step=N] [--split=valid] [--best]`.

Parses the flags and calls `ncf_jax.evaluate.evaluate_checkpoint`; prints one readable
line, then one JSON line for scripts. A user error becomes one `error:` line, exit 2.
"""

import json

from absl import app, flags

from ncf_jax import evaluate, pipeline, writers
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags


def define_flags() -> None:
  """Defines the evaluate command's flags (only when run as a command)."""
  flags.DEFINE_string('workdir', None, 'Run directory of the checkpoints to evaluate.')
  flags.DEFINE_integer('step', None, 'Global step of the checkpoint (default: latest).')
  flags.DEFINE_string(
    'data_dir',
    None,
    'Dataset folder, if it moved since training (default: the saved config.dataset.data_dir).',
  )
  flags.DEFINE_enum(
    'split',
    'test',
    list(pipeline.SPLITS),
    'Split to evaluate: test, or valid for a run with a validation split.',
  )
  flags.DEFINE_bool(
    'best',
    False,
    'Evaluate the best checkpoint (the selected epoch of a '
    'run with a validation split) instead of the latest.',
  )


def describe_epoch(epoch: int | None, batch: int | None) -> str:
  """`end of epoch 3` or `epoch 3, batch 17`: epochs counted from 1, as in the logs (the
  JSON line's `epoch` counts from 0, as metrics.jsonl does)."""
  if epoch is None:
    return 'before training'
  return f'end of epoch {epoch + 1}' if batch is None else f'epoch {epoch + 1}, batch {batch}'


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  writers.quiet_library_logs()
  result = evaluate.evaluate_checkpoint(
    flags.FLAGS.workdir, flags.FLAGS.step, flags.FLAGS.data_dir, flags.FLAGS.split, flags.FLAGS.best
  )
  k = result['top_k']
  split = '' if result['split'] == 'test' else f' ({result["split"]} split)'
  when = describe_epoch(result['epoch'], result['batch'])
  print(
    f'checkpoint step {result["step"]} ({when}) of {result["workdir"]}'
    f'{split}: HR@{k} = {result["hr"]:.4f}, NDCG@{k} = {result["ndcg"]:.4f}, '
    f'MRR@{k} = {result["mrr"]:.4f} over {result["num_users"]} users',
    flush=True,
  )
  print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
