"""Imports between ncf_jax modules run one way: no module imports one that imports it back.

Reads the sources with `ast` (no import, no jax), function-level imports included, since a
deferred import is still a dependency.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'ncf_jax'


def module_sources(root=REPO, package=PACKAGE):
  """{dotted module name: source path} of every module under `package` (packages too)."""
  found = {}
  for folder, _, files in os.walk(os.path.join(root, package)):
    for f in files:
      if not f.endswith('.py'):
        continue
      rel = os.path.relpath(os.path.join(folder, f), root)[: -len('.py')].split(os.sep)
      if rel[-1] == '__init__':
        rel = rel[:-1]
      found['.'.join(rel)] = os.path.join(folder, f)
  return found


def imports_of(source, modules):
  """The modules of `modules` that `source` imports (`from a import b` counts a.b if it is one)."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      out.update(f'{node.module}.{a.name}' for a in node.names)
  return out & set(modules)


def find_cycle(graph):
  """One import cycle of `graph` ({module: set of modules}) as a list, or None."""
  done, path = set(), []

  def visit(m):
    if m in path:
      return path[path.index(m) :] + [m]
    if m in done:
      return None
    path.append(m)
    for n in sorted(graph.get(m, ())):
      cycle = visit(n)
      if cycle:
        return cycle
    path.pop()
    done.add(m)
    return None

  for m in sorted(graph):
    cycle = visit(m)
    if cycle:
      return cycle
  return None


def import_graph():
  modules = module_sources()
  graph = {}
  for name, path in modules.items():
    with open(path, encoding='utf-8') as f:
      deps = imports_of(f.read(), modules)
    # A module's own package, and the root package, are where it lives, not what it uses.
    parents = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 1)}
    graph[name] = deps - parents - {name}
  return graph


def test_no_ncf_jax_module_imports_one_that_imports_it_back():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_synthetic_generator_sits_below_the_dataset_layer():
  graph = import_graph()
  assert 'ncf_jax.data.synthetic' in graph['ncf_jax.data']
  assert 'ncf_jax.data' not in graph['ncf_jax.data.synthetic']


def test_cycle_finder_flags_a_function_level_import_back():
  modules = {'p.a': '', 'p.b': ''}
  graph = {
    'p.a': imports_of('from p import b\n', modules),
    'p.b': imports_of('def f():\n  from p import a\n', modules),
  }
  assert find_cycle(graph) == ['p.a', 'p.b', 'p.a']
  assert find_cycle({'p.a': {'p.b'}, 'p.b': set()}) is None


def mode_reads(source):
  """Line numbers where `source` reads the sharding mode or tests the data's layout type:
  `<x>.sharding` of a name `config`, a `.get('sharding', ...)`, an `is_sharded`, or
  `isinstance(_, *.Split)`."""
  lines = []
  for node in ast.walk(ast.parse(source)):
    text = ast.unparse(node) if isinstance(node, (ast.Attribute, ast.Name, ast.Call)) else ''
    config_field = (
      isinstance(node, ast.Attribute)
      and node.attr == 'sharding'
      and isinstance(node.value, ast.Name)
      and 'config' in node.value.id
    )
    call = node.func if isinstance(node, ast.Call) else None
    name = call.attr if isinstance(call, ast.Attribute) else getattr(call, 'id', '')
    args = [a.value for a in (node.args if call else ()) if isinstance(a, ast.Constant)]
    if (
      config_field
      or (isinstance(node, (ast.Attribute, ast.Name)) and 'is_sharded' in text)
      or (name in ('get', 'getattr') and 'sharding' in args)
      or (name == 'isinstance' and 'Split' in text)
    ):
      lines.append(node.lineno)
  return lines


def test_only_the_layout_package_reads_the_sharding_mode():
  # The mode is chosen once (`parallel.make_layout`); everything else asks the layout.
  found = {}
  for name, path in module_sources().items():
    if name == 'ncf_jax.parallel' or name.startswith('ncf_jax.parallel.'):
      continue
    with open(path, encoding='utf-8') as f:
      lines = mode_reads(f.read())
    if lines:
      found[name] = lines
  # The benchmark's modes section sets the mode it measures (config.update), reading none.
  assert found == {}, found
  assert mode_reads("if config.sharding == 'sharded':\n  pass\n") == [1]
  assert mode_reads("m = config.get('sharding', 'replicated')\n") == [1]
  assert mode_reads('ok = isinstance(data, data_shards.Split)\n') == [1]
  assert mode_reads('if sharding.is_sharded(config):\n  pass\n') == [1]
