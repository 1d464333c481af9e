"""Runs experiments/colab_tpu.ipynb top to bottom on the CPU at a tiny size, so it cannot rot.

The parameters are injected papermill-style: a cell after the one tagged `parameters`
sets tiny sizes and temporary folders. The kernel is this test's own interpreter
(sys.executable), through a kernelspec written to a temporary JUPYTER_PATH, so a fresh CI
virtualenv needs no `ipykernel install`.
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
TINY = {'dataset.synthetic_num_users': 300, 'dataset.synthetic_num_items': 200,
        'dataset.synthetic_mean_interactions': 30.0, 'num_epochs': 2, 'batch_size': 1024,
        'eval_batch_size': 128, 'eval_num_neg': 50}


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec running this interpreter; the kernel inherits this environment."""
  name = 'ncf_jax_test'
  spec = tmp_path / 'jupyter' / 'kernels' / name
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'ncf_jax tests', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')  # compiling is most of the time
  monkeypatch.setenv('XLA_FLAGS', re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                                         os.environ.get('XLA_FLAGS', '')).strip())
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
  index = next(i for i, c in enumerate(notebook.cells)
               if 'parameters' in c.metadata.get('tags', []))
  workdir = str(tmp_path / 'run')
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      '# Injected by tests/notebook_test.py\n'
      f"CONFIG = 'default'\nDATA_DIR = {str(tmp_path / 'data')!r}\n"
      f'WORKDIR = {workdir!r}\nOVERRIDES = {TINY!r}',
      metadata={'tags': ['injected-parameters']}))
  client = nbclient.NotebookClient(notebook, kernel_name=kernel_name, timeout=600,
                                   resources={'metadata': {'path': REPO}})
  client.execute()

  text = '\n'.join(_text(c) for c in notebook.cells if c.cell_type == 'code')
  assert f'ncf_jax from {REPO}' in text  # the checkout: nothing was installed
  assert 'CPU device(s)' in text
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert [r['epoch'] for r in history] == [0, 1, 2]  # 2 epochs, then 1 more on resume
  assert f'pipeline hash, all batches of the epoch: {history[1]["pipeline_hash_all"]}' in text
  assert 'Resuming from checkpoint' in text
  assert any('image/png' in o.get('data', {})
             for c in notebook.cells for o in c.get('outputs', []))
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['epochs_done'] == 3 and f"params hash: {summary['params_hash']}" in text
