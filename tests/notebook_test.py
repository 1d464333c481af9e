"""Runs experiments/colab_tpu.ipynb top to bottom on the CPU at a tiny size, so it cannot rot.

The parameters are injected papermill-style: a cell after the one tagged `parameters`
sets tiny sizes and temporary folders. The kernel is this test's own interpreter
(sys.executable), through a kernelspec written to a temporary JUPYTER_PATH, so a fresh CI
virtualenv needs no `ipykernel install`. The cell tagged `helpers` (config names, Drive
paths) is also run on its own, with no kernel and a fake Drive folder.
"""

import json
import os
import re
import sys

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'experiments', 'colab_tpu.ipynb')
TINY = {
  'dataset.synthetic_num_users': 300,
  'dataset.synthetic_num_items': 200,
  'dataset.synthetic_mean_interactions': 30.0,
  'num_epochs': 2,
  'batch_size': 1024,
  'eval_batch_size': 128,
  'eval_num_neg': 50,
}


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec running this interpreter; the kernel inherits this environment."""
  name = 'ncf_jax_test'
  spec = tmp_path / 'jupyter' / 'kernels' / name
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(
    json.dumps(
      {
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'ncf_jax tests',
        'language': 'python',
      }
    )
  )
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')  # compiling is most of the time
  monkeypatch.setenv(
    'XLA_FLAGS',
    re.sub(
      r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', '')
    ).strip(),
  )
  return name


def _text(cell) -> str:
  parts = []
  for output in cell.get('outputs', []):
    if output.get('output_type') == 'stream':
      parts.append(output['text'])
    elif 'data' in output and 'text/plain' in output['data']:
      parts.append(output['data']['text/plain'])
  return ''.join(parts)


def test_notebook_trains_plots_hashes_and_resumes_on_cpu(tmp_path, kernel_name):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  index = next(
    i for i, c in enumerate(notebook.cells) if 'parameters' in c.metadata.get('tags', [])
  )
  workdir = str(tmp_path / 'run')
  notebook.cells.insert(
    index + 1,
    nbformat.v4.new_code_cell(
      '# Injected by tests/notebook_test.py\n'
      f"CONFIG = 'default'\nDATA_DIR = {str(tmp_path / 'data')!r}\n"
      f'WORKDIR = {workdir!r}\nOVERRIDES = {TINY!r}',
      metadata={'tags': ['injected-parameters']},
    ),
  )
  client = nbclient.NotebookClient(
    notebook, kernel_name=kernel_name, timeout=600, resources={'metadata': {'path': REPO}}
  )
  client.execute()

  text = '\n'.join(_text(c) for c in notebook.cells if c.cell_type == 'code')
  assert f'ncf_jax from {REPO}' in text  # the checkout: nothing was installed
  assert 'CPU device(s)' in text
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [r['epoch'] for r in history] == [0, 1, 2]  # 2 epochs, then 1 more on resume
  assert f'pipeline hash, all batches of the epoch: {history[1]["pipeline_hash_all"]}' in text
  assert 'Resuming from checkpoint' in text
  assert any('image/png' in o.get('data', {}) for c in notebook.cells for o in c.get('outputs', []))
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['epochs_done'] == 3 and f"params hash: {summary['params_hash']}" in text


def _helpers(monkeypatch):
  """The names the notebook's `helpers` cell defines, executed here with configs importable."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [c for c in notebook.cells if 'helpers' in c.metadata.get('tags', [])]
  assert 'load_config(CONFIG)' in ''.join(c.source for c in notebook.cells)
  monkeypatch.syspath_prepend(REPO)  # as in the notebook, which runs from the checkout
  namespace = {'os': os}
  exec(compile(cell.source, NOTEBOOK, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


@pytest.mark.parametrize(
  'name, dataset, batch_size',
  [
    ('default', 'synthetic', 8192),
    ('mlperf', 'ml-20m', 1048576),
    ('mlperf:runlocal', 'synthetic', 8192),
    ('mlperf:reference', 'ml-20m', 2048),
    ('configs/mlperf.py:runlocal', 'synthetic', 8192),
  ],
)
def test_config_takes_a_file_and_variant_as_the_command_line_does(
  name, dataset, batch_size, monkeypatch
):
  config = _helpers(monkeypatch)['load_config'](name)
  assert (config.dataset.name, config.batch_size) == (dataset, batch_size)


def test_an_unknown_config_variant_is_the_config_files_own_error(monkeypatch):
  with pytest.raises(ValueError, match='use reference or runlocal'):
    _helpers(monkeypatch)['load_config']('mlperf:nosuch')


def test_with_drive_the_data_and_the_workdir_go_on_drive(tmp_path, monkeypatch):
  resolve_paths = _helpers(monkeypatch)['resolve_paths']
  drive = str(tmp_path / 'MyDrive' / 'ncf_jax')  # stands in for the mounted folder
  assert resolve_paths(None, 'runs/colab') == ('~/.cache/ncf_jax', 'runs/colab')
  assert resolve_paths(None, 'runs/colab', drive) == (
    os.path.join(drive, 'data'),
    os.path.join(drive, 'runs/colab'),
  )
  assert resolve_paths('movielens', 'runs/colab', drive)[0] == os.path.join(drive, 'movielens')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert resolve_paths('~/data', 'runs/colab', drive)[0] == str(tmp_path / 'home' / 'data')
  data_dir, workdir = resolve_paths(None, 'runs/colab', drive)
  assert resolve_paths(data_dir, workdir, drive) == (data_dir, workdir)  # running it again


def test_the_install_cell_keeps_the_runtime_s_jax(tmp_path):
  """pip never replaces the runtime's accelerator jax/jaxlib; ncf_jax goes in with --no-deps."""
  import ast

  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c for c in notebook.cells if 'def pip_commands' in c.source)
  tree = ast.parse(cell.source)
  (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'pip_commands']
  namespace = {'sys': sys}
  exec(compile(ast.Module([fn], []), NOTEBOOK, 'exec'), namespace)  # pylint: disable=exec-used
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    requirements, ncf = namespace['pip_commands']('repo', f.read().splitlines())
  assert requirements[:4] == [sys.executable, '-m', 'pip', 'install']
  names = [re.split(r'[<>=!~\[; ]', r)[0].lower() for r in requirements[5:]]
  assert 'jax' not in names and 'jaxlib' not in names and {'flax', 'optax'} <= set(names)
  assert ncf[-3:] == ['--no-deps', '-e', 'repo']
  assert 'RESTART NEEDED' in cell.source and 'USE_DRIVE = True to keep it' in ''.join(
    c.source for c in notebook.cells
  )
