r"""`python -m ncf_jax.config_help [--config=configs/<file>.py[:variant]] [--config.<field>=<value>]`.

Prints every config field, its value in that config (default: configs/default.py) and the
comment above it in configs/default.py, where every field is defined once. A value that
differs from configs/default.py's says so. Every command's --help points here.
"""

import ast
import inspect

from absl import app, flags

from ncf_jax import config_paths, errors
from ncf_jax.errors import UserError, exit_on_user_error, parse_flags

# The name each function of configs/default.py gives the block it fills.
_BLOCKS = {'config': '', 'd': 'dataset.'}


def field_comments(source: str | None = None) -> dict[str, str]:
  """{'a.b': the comment lines right above `a.b = ...` in configs/default.py, joined}."""
  if source is None:
    from configs import default

    source = inspect.getsource(default)
  lines = source.splitlines()
  out = {}
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    target, names = node.targets[0], list[str]()
    while isinstance(target, ast.Attribute):
      names.insert(0, target.attr)
      target = target.value
    if not (isinstance(target, ast.Name) and target.id in _BLOCKS and names):
      continue
    comment, i = list[str](), node.lineno - 2
    while i >= 0 and lines[i].strip().startswith('#'):
      comment.insert(0, lines[i].strip().lstrip('#').strip())
      i -= 1
    out[_BLOCKS[target.id] + '.'.join(names)] = ' '.join(comment)
  return out


def describe(config) -> str:
  """Every field of `config`: `name = value`, then its comment, indented."""
  from configs import default

  defaults = config_paths.flatten(default.get_config())
  comments = field_comments()
  out = []
  for path, value in config_paths.flatten(config).items():
    differs = path in defaults and defaults[path] != value
    note = f'  (configs/default.py: {defaults[path]!r})' if differs else ''
    out.append(f'{path} = {value!r}{note}')
    if comments.get(path):
      out.append(f'    {comments[path]}')
  return '\n'.join(out)


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  print(describe(flags.FLAGS.config), flush=True)


if __name__ == '__main__':
  errors.define_config_file('configs/default.py', 'Config file whose fields to print.')
  app.run(main, flags_parser=parse_flags)
