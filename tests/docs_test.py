"""README.md and docs/*.md name only what exists: files, links, config fields, commands.

Reads the Markdown as text (no JAX compile): every relative link (and its #anchor) and
every repo path (`configs/...`, `ncf_jax/...`, `experiments/...`, `tests/...`, `docs/...`,
`.ci/...`, a pytest node id's test included) must exist; every `--config.<field>` must be a
field of configs/default.py; every `python -m <module>` must import and have a `main`;
every name of the package (`ncf_jax.data.load`, or short, `pipeline.train_batch`) exists.
"""

import collections
import glob
import importlib
import os
import re

from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(
  os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md'))
)

# A repo path starts at a top-level folder, not inside a URL, ~/ or another path.
_PATH = re.compile(
  r'(?<![\w./~-])((?:configs|ncf_jax|experiments|tests|docs|\.ci)/[\w./-]*)'
  r'(?:::(\w+))?'
)
_PLACEHOLDER_NEXT = ('<', '{', '*')  # configs/<name>.py, sweeps/*.py: not a file name
_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
_FLAG = re.compile(r'--config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)')
_COMMAND = re.compile(r'python -m ((?:ncf_jax|experiments)(?:\.\w+)+)')
_DOTTED = re.compile(r'(?<![\w./~-])ncf_jax(?:\.[A-Za-z_]\w*)+')
_SUFFIXES = ('.json', '.jsonl', '.py', '.md', '.csv', '.png', '.txt', '.ipynb', '.log')


def _read(rel):
  with open(os.path.join(REPO, rel), encoding='utf-8') as f:
    return f.read()


def _package_modules():
  """Names of ncf_jax's modules and sub-packages (`data`, `benchmark`, ...)."""
  folder = os.path.join(REPO, 'ncf_jax')
  return sorted(
    n[: -len('.py')] if n.endswith('.py') else n
    for n in os.listdir(folder)
    if n != '__init__.py'
    and (n.endswith('.py') or os.path.isfile(os.path.join(folder, n, '__init__.py')))
  )


# `pipeline.train_batch`: an ncf_jax module, then a name (not a file suffix: metrics.jsonl).
_SHORT = re.compile(r'(?<![\w./~-])(?:' + '|'.join(_package_modules()) + r')\.[A-Za-z_]\w*')


def anchors(text):
  """GitHub's anchor of every heading outside code blocks (repeats get -1, -2, ...)."""
  seen, out, fenced = collections.Counter(), set(), False
  for line in text.splitlines():
    if line.lstrip().startswith('```'):
      fenced = not fenced
    elif not fenced and re.match(r'#{1,6} ', line):
      slug = re.sub(r'[^\w\- ]', '', line.lstrip('#').strip().lower()).replace(' ', '-')
      out.add(f'{slug}-{seen[slug]}' if seen[slug] else slug)
      seen[slug] += 1
  return out


def link_problems(text, where):
  """Relative links of `text` (a file at repo-relative `where`) that do not resolve."""
  problems = []
  for target in _LINK.findall(text):
    if re.match(r'[a-z]+:', target):  # https:, mailto:
      continue
    path, _, anchor = target.partition('#')
    rel = os.path.normpath(os.path.join(os.path.dirname(where), path)) if path else where
    if not os.path.exists(os.path.join(REPO, rel)):
      problems.append(f'{where}: link {target} -> no such file')
    elif anchor and rel.endswith('.md') and anchor not in anchors(_read(rel) if path else text):
      problems.append(f'{where}: link {target} -> no heading #{anchor}')
  return problems


def path_problems(text, where):
  """Repo paths (and pytest node ids) named in `text` that do not exist."""
  problems = []
  for m in _PATH.finditer(text):
    if text[m.end(1) : m.end(1) + 1] in _PLACEHOLDER_NEXT:
      continue
    path, test = m.group(1).rstrip('.'), m.group(2)
    if not os.path.exists(os.path.join(REPO, path)):
      problems.append(f'{where}: {path} does not exist')
    elif test and not re.search(rf'^def {test}\(', _read(path), re.M):
      problems.append(f'{where}: {path} has no test {test}')
  return problems


def flag_problems(text, where):
  """`--config.<field>` flags of `text` that name no field of configs/default.py."""
  config, problems = default.get_config(), []
  for field in _FLAG.findall(text):
    node = config
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        problems.append(f'{where}: --config.{field} is not a field of configs/default.py')
        break
      node = node[part]
  return problems


def _resolve(dotted):
  """The object a dotted name names: its longest importable module, then attributes."""
  parts = dotted.split('.')
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module('.'.join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(dotted)


def module_problems(text, where):
  """`python -m` modules without a `main`, and names of the package that do not exist."""
  problems, commands = [], set(_COMMAND.findall(text))
  for module in sorted(commands):
    try:
      imported = importlib.import_module(module)
      main_py = os.path.join(*getattr(imported, '__path__', ['']), '__main__.py')
      # A package: `python -m` runs its __main__.py (read, not imported: it runs).
      if (
        hasattr(imported, '__path__')
        and os.path.exists(main_py)
        and re.search(r'^def main\(', _read(os.path.relpath(main_py, REPO)), re.M)
      ):
        continue
      if not hasattr(imported, 'main'):
        problems.append(f'{where}: python -m {module}: the module has no main')
    except ImportError as e:
      problems.append(f'{where}: python -m {module}: {e}')
  short = {f'ncf_jax.{n}' for n in _SHORT.findall(text) if not n.endswith(_SUFFIXES)}
  for dotted in sorted((set(_DOTTED.findall(text)) | short) - commands):
    try:
      _resolve(dotted)
    except (ImportError, AttributeError):
      problems.append(f'{where}: {dotted} does not exist')
  return problems


def test_every_link_in_the_readme_and_docs_resolves():
  assert [p for d in DOCS for p in link_problems(_read(d), d)] == []


def test_every_repo_path_in_the_readme_and_docs_exists():
  assert [p for d in DOCS for p in path_problems(_read(d), d)] == []


def test_every_config_flag_in_the_readme_and_docs_is_a_default_config_field():
  assert [p for d in DOCS for p in flag_problems(_read(d), d)] == []


def test_every_command_module_has_a_main_and_every_ncf_jax_name_exists():
  assert [p for d in DOCS for p in module_problems(_read(d), d)] == []


def test_the_readme_links_every_docs_page():
  readme = _read('README.md')
  assert len(DOCS) > 1
  assert [d for d in DOCS[1:] if f'({d})' not in readme] == []


def test_the_checkers_flag_a_broken_example():
  broken = '\n'.join(
    [
      '# Title',
      'See [the guide](docs/no_such_page.md), [a section](#no-such-heading),',
      '[another](docs/data.md#no-such-heading), [one](docs/data.md#the-cache) and',
      '[the title](#title), then run `python -m ncf_jax.no_such_command` and',
      '`python -m ncf_jax.errors` (no main) with `--config.no_such_field=1`,',
      '`--config.dataset.no_such_field=2` and `--config.num_epochs.deeper=3`; read',
      '`configs/no_such_config.py`, `tests/layout_test.py::test_no_such_test` and',
      '`ncf_jax.data.no_such_function`, `pipeline.no_such_function`; `configs/<name>.py`,',
      '`ncf_jax/`, `metrics.jsonl` and `pipeline.train_batch` are fine.',
    ]
  )
  assert link_problems(broken, 'README.md') == [
    'README.md: link docs/no_such_page.md -> no such file',
    'README.md: link #no-such-heading -> no heading #no-such-heading',
    'README.md: link docs/data.md#no-such-heading -> no heading #no-such-heading',
  ]
  assert path_problems(broken, 'README.md') == [
    'README.md: docs/no_such_page.md does not exist',
    'README.md: configs/no_such_config.py does not exist',
    'README.md: tests/layout_test.py has no test test_no_such_test',
  ]
  assert flag_problems(broken, 'README.md') == [
    f'README.md: --config.{f} is not a field of configs/default.py'
    for f in ('no_such_field', 'dataset.no_such_field', 'num_epochs.deeper')
  ]
  problems = module_problems(broken, 'README.md')
  assert problems[0] == 'README.md: python -m ncf_jax.errors: the module has no main'
  assert problems[1].startswith('README.md: python -m ncf_jax.no_such_command: ')
  assert problems[2:] == [
    'README.md: ncf_jax.data.no_such_function does not exist',
    'README.md: ncf_jax.pipeline.no_such_function does not exist',
  ]
