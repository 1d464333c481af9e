"""User-facing errors: one clear message, a non-zero exit, no traceback."""
import sys


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


def parse_flags(argv):
  """absl flags parser for `app.run(main, flags_parser=parse_flags)`.

  A bad `--config` file or `--config.field=value` override (unknown field, wrong type)
  becomes one line naming it and exit code 2, instead of a traceback from flag parsing.
  """
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      config = flags.FLAGS['config'].value
      if config is not None:
        config.keys()   # a config file that failed to load raises here
    return rest
  except flags.Error as e:
    message = str(e)
  except OSError as e:
    message = ' '.join(str(e).split())
    print(f'error: cannot load the config file ({message}); pass '
          '--config=configs/<name>.py with a file that exists (see configs/).',
          file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    message = str(e).strip('"\'')
  if 'Traceback' in message:   # config_flags embeds the config file's own traceback
    message = [line for line in message.splitlines() if line.strip(' )')][-1].strip()
  bad = [a for a in argv[1:] if a.startswith('--config')]
  print(f'error: invalid command-line flags ({message}); check {" ".join(bad) or "the flags"}: '
        'every --config.<field> must name a field of the config file (see configs/default.py '
        'for all fields and their types).', file=sys.stderr)
  sys.exit(2)
