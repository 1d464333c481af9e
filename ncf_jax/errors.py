"""User-facing errors: one clear message, a non-zero exit, no traceback."""

import difflib
import re
import sys

from ncf_jax import config_paths
from ncf_jax.config_paths import MISSING


class UserError(Exception):
  """Bad input or configuration: the message says what, where, and what to do."""


def exit_on_user_error(fn):
  """Wraps a command's main: a UserError prints one line to stderr and exits 2."""

  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(2)

  wrapped.__name__ = getattr(fn, '__name__', 'main')
  wrapped.__doc__ = fn.__doc__
  return wrapped


def define_config_file(default: str, help_string: str) -> None:
  """`config_flags.DEFINE_config_file('config', default, ..., lock_config=True)`.

  Without `--config` on the command line, ml_collections loads `default` and applies the
  `--config.<field>` overrides right here, not in `parse_flags`: a bad override exits
  with the same one line.
  """
  from absl import flags
  from ml_collections import config_flags
  from ml_collections.config_flags import config_flags as parsers

  try:
    config_flags.DEFINE_config_file('config', default, help_string, lock_config=True)
  except SyntaxError as e:
    _fail(_config_code_error(e))
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    load = lambda: parsers.ConfigFileFlagParser('config').parse(default)
    _fail(_flag_error_message(e, sys.argv, flags.FLAGS, load, default))


def parse_flags(argv):
  """absl flags parser for `app.run(main, flags_parser=parse_flags)`.

  A bad `--config` file, a `--config.field=value` override that names no field or has a
  value of the wrong type, or any other bad flag becomes one `error:` line that names it
  (with the closest field for a typo), and exit code 2, instead of a traceback or absl's
  escaped multi-line text.
  """
  from absl import flags

  if any(a in HELP_FLAGS for a in argv[1:]):
    print(command_help(flags.FLAGS), flush=True)
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      config = flags.FLAGS['config'].value
      if config is not None:
        config.keys()  # a config file that failed to load raises here
    return rest
  except OSError as e:
    message = ' '.join(str(e).split())
    _fail(
      f'cannot load the config file ({message}); pass --config=configs/<name>.py '
      'with a file that exists (see configs/).'
    )
  except SyntaxError as e:
    _fail(_config_code_error(e))
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    _fail(_flag_error_message(e, argv, flags.FLAGS))
  except (NameError, ImportError, ArithmeticError, AssertionError, RuntimeError) as e:
    _fail(_config_code_error(e))


HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '--helpfull', '-?')


def command_help(flag_values) -> str:
  """`--help`/`-h`: the command's docstring, its flags, and how to list every config field."""
  main = sys.modules.get('__main__')
  doc = (getattr(main, '__doc__', None) or '').strip()
  rows: list[tuple[str, str, str]] = []
  for module, module_flags in sorted(flag_values.flags_by_module_dict().items()):
    if not module.startswith(('ncf_jax', 'experiments', '__main__')) and not module.endswith('.py'):
      continue  # absl's, orbax's, jax's own flags
    for flag in module_flags:
      if flag.name.startswith('config.') or any(r[0] == flag.name for r in rows):
        continue
      rows.append((flag.name, ' '.join((flag.help or '').split()), flag.default_as_str))
  lines = [doc, '', 'Flags:'] if doc else ['Flags:']
  for name, text, default in sorted(rows):
    lines.append(f'  --{name}: {text}' + (f' (default: {default})' if default else ''))
  return '\n'.join(lines + ['', CONFIG_FIELDS_HELP])


CONFIG_FIELDS_HELP = (
  'Config fields are set with --config.<field>=<value>. To list every field with its value\n'
  'and comment: python -m ncf_jax.config_help [--config=configs/<file>.py]'
)


def _config_code_error(e: Exception) -> str:
  """One line for a config file whose Python fails: where, and what Python said."""
  if isinstance(e, SyntaxError):
    where = f'{e.filename}, line {e.lineno}' if e.filename else 'the config file'
    return f'cannot load the config file: {where}: {e.msg}; fix the file, or pass another --config.'
  text = ' '.join(str(e).split())[:300]
  return (
    f'the config file failed while running ({type(e).__name__}: {text}); fix the file, or '
    'pass another --config.'
  )


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _loaded_config(flag_values, config_arg, load):
  """The config that the command line names, loaded again if parsing stopped early."""
  try:
    if load is not None:
      return load()
    if 'config' not in flag_values:
      return None
    flag = flag_values['config']
    config = flag.value  # None after an override that names no field
    if config is None:
      config = flag.parser.parse(config_arg or flag.default_as_str.strip('\'"'))
    config.keys()
    return config
  except Exception:  # pylint: disable=broad-except
    return None


# What a `--config.<field>` of each type takes, for the wrong-type message.
_TYPE_WORDS = {
  'int': 'an integer',
  'float': 'a number',
  'bool': 'true or false',
  'string': 'a string',
  'str': 'a string',
}


def _flag_error_message(
  error: Exception, argv, flag_values, load=None, default_file: str = 'the config file'
) -> str:
  """One line for an error from absl flag parsing (see `parse_flags`)."""
  from absl import flags

  config_arg = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
  if config_arg is None and 'config' in flag_values:
    default_file = flag_values['config'].default_as_str.strip('\'"')
  config_file = config_arg.split(':')[0] if config_arg else default_file
  config = _loaded_config(flag_values, config_arg, load)
  text = str(error.args[0]) if error.args else str(error)

  # `--config.field=value` whose value does not parse as the field's type.
  bad_value = re.match(r'flag --(config\.[^=]+)=(.*?): (.*)$', text, re.DOTALL)
  if bad_value and bad_value.group(1) in flag_values:
    name, value = bad_value.group(1), bad_value.group(2)
    path = name[len('config.') :]
    current = config_paths.get(config, path, MISSING) if config is not None else MISSING
    if config_paths.is_group(current):
      fields = ', '.join(sorted(current.keys()))
      return (
        f'--{name}={value}: {name} is a group of fields ({fields}); set them one by '
        f'one, e.g. --{name}.{sorted(current.keys())[0]}=...'
      )
    kind = 'bool' if isinstance(current, bool) else flag_values[name].flag_type()
    if isinstance(current, (tuple, list)):
      kind = 'tuple'
    expects = _TYPE_WORDS.get(kind, f'a value of type {kind}')
    now = '' if current is MISSING else f' ({current!r} in {config_file})'
    return f'{name} takes {expects}{now}, not {value!r} (from --{name}={value}).'

  # `--config.<path>` that names no field: the first missing part, and the closest field.
  if isinstance(error, (KeyError, AttributeError)) and config is not None:
    for arg in argv[1:]:
      match = re.match(r'--(config\.[^=]+)', arg)
      if not match:
        continue
      parts = config_paths.parts(match.group(1))[1:]
      i = config_paths.first_unknown(config, parts)
      if i is not None:
        node = config_paths.get(config, parts[:i])
        name = '.'.join(['config'] + parts[: i + 1])
        close = difflib.get_close_matches(parts[i], list(node.keys()), n=1, cutoff=0.6)
        hint = f': did you mean {".".join(["config"] + parts[:i] + close)}?' if close else '.'
        return (
          f'unknown config field {name} (from {arg}){hint} Every field is defined, '
          'with a comment, in configs/default.py.'
        )

  if isinstance(error, flags.UnrecognizedFlagError):
    suggested = re.search(r'Did you mean: (\S+)', text)
    hint = f'; did you mean --{suggested.group(1)}?' if suggested else ''
    return f'unknown flag --{error.flagname}{hint} (--help lists the flags).'
  if 'Traceback' in text:  # config_flags embeds the config file's own traceback
    lines = [line for line in text.splitlines() if line.strip(' )^~')]
    return f'cannot load {config_file}: {lines[-1].strip()}'
  if isinstance(error, flags.Error):
    return ' '.join(text.split())
  return ' '.join(text.strip('"\'').split())
