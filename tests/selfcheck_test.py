"""`python -m ncf_jax.selfcheck`: passes on this install; a changed recorded hash FAILs."""

import pytest

from ncf_jax import selfcheck


@pytest.fixture(scope='module')
def hashes():
  return selfcheck.run_hashes(1)


def test_the_recorded_hashes_pass_here_and_an_altered_one_fails(hashes, monkeypatch, capsys):
  checks = selfcheck.check_hashes(hashes) + [selfcheck.check_sampler()]
  assert [c.ok for c in checks] == [True] * 4, checks
  assert selfcheck.report(checks) == 0
  out = capsys.readouterr().out
  assert out.count('PASS  ') == 4 and 'All 4 checks passed.' in out

  # An altered recorded hash (as on an install whose JAX draws other bits) FAILs.
  monkeypatch.setattr(selfcheck, 'EXPECTED_PIPELINE_HASH_ALL', '0123456789abcdef')
  checks = selfcheck.check_hashes(hashes)
  assert [c.ok for c in checks] == [True, False, True]
  assert selfcheck.report(checks) == 1
  out = capsys.readouterr().out
  assert 'FAIL  pipeline hash, all batches of epoch 0' in out
  assert 'generates different random bits' in out and 'will not reproduce' in out
  assert '1 of 3 checks failed.' in out


@pytest.mark.slow  # a second epoch on 8 devices
def test_several_devices_give_the_same_hashes(hashes):
  check = selfcheck.check_devices(hashes, selfcheck.run_hashes)
  assert check is not None and check.ok, check
