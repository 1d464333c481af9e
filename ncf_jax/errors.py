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
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  wrapped.__name__ = getattr(fn, '__name__', 'main')
  wrapped.__doc__ = fn.__doc__
  return wrapped
