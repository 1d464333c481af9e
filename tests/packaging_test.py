"""pyproject.toml installs ncf_jax (ncf_jax.benchmark included) and configs, importable anywhere.

Offline and in about 2 s: setuptools' own `egg_info` and `build_py` commands (what a wheel
of this pure-Python project is built from) write the metadata and the installed tree into a
temporary folder, with no build isolation and no `wheel` package (the venv's setuptools 65
has no `bdist_wheel`). Nothing is written into the checkout.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(lib, egg_info): the installed tree and the metadata folder, built from the checkout."""
  out = tmp_path_factory.mktemp('build')
  subprocess.run(
    [
      sys.executable,
      '-c',
      'from setuptools import setup; setup()',
      '-q',
      'egg_info',
      '--egg-base',
      str(out),
      'build',
      '--build-base',
      str(out),
      'build_py',
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  return out / 'lib', out / 'ncf_jax.egg-info'


def _canonical(requirement: str) -> str:
  from packaging.requirements import Requirement  # pylint: disable=import-outside-toplevel

  r = Requirement(requirement)
  return f'{r.name.lower()}{r.specifier}' + (f'; {r.marker}' if r.marker else '')


def _requires(path) -> list:
  """requires.txt's requirements; a `[:marker]` section puts its marker on its lines."""
  out, marker = [], None
  for line in path.read_text().splitlines():
    line = line.strip()
    if line.startswith('[:') and line.endswith(']'):
      marker = line[2:-1]
    elif line:
      out.append(_canonical(line + (f'; {marker}' if marker else '')))
  return sorted(out)


def _py_files(root, package):
  return {
    os.path.relpath(os.path.join(d, n), root)
    for d, _, names in os.walk(os.path.join(root, package))
    for n in names
    if n.endswith('.py')
  }


def test_the_build_holds_every_module_of_ncf_jax_and_configs_and_nothing_else(built):
  lib, _ = built
  assert sorted(os.listdir(lib)) == ['configs', 'ncf_jax']  # not experiments/ or tests/
  for package in ('ncf_jax', 'configs'):
    assert _py_files(lib, package) == _py_files(REPO, package)
  assert 'ncf_jax/benchmark/cli.py' in _py_files(lib, 'ncf_jax')


def test_the_metadata_has_requirements_txt_as_dependencies_and_python_3_11(built):
  _, egg_info = built
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert _requires(egg_info / 'requires.txt') == sorted(map(_canonical, requirements))
  info = (egg_info / 'PKG-INFO').read_text()
  assert 'Requires-Python: >=3.11' in info.splitlines()
  import ncf_jax  # pylint: disable=import-outside-toplevel

  assert f'Version: {ncf_jax.__version__}' in info.splitlines()


def test_the_installed_packages_import_from_another_directory(built, tmp_path):
  lib, _ = built
  code = (
    'import configs, ncf_jax, ncf_jax.benchmark\n'
    'from configs import default, mlperf\n'
    "assert mlperf.get_config('runlocal').dataset.name == 'synthetic'\n"
    "assert os.path.isfile(os.path.join(configs.DIR, 'mlperf.py'))\n"
    'print(ncf_jax.__file__, configs.__file__)'
  )
  env = dict(os.environ, PYTHONPATH=str(lib))
  run = subprocess.run(
    [sys.executable, '-c', 'import os\n' + code],
    cwd=tmp_path,
    env=env,
    check=True,
    capture_output=True,
    text=True,
  )
  files = run.stdout.split()
  assert files == [str(lib / 'ncf_jax' / '__init__.py'), str(lib / 'configs' / '__init__.py')]
