"""The in-flight bound that keeps multi-device CPU runs from deadlocking, and the watchdog."""

import os
import subprocess
import sys
import textwrap

import _train_helpers as h
import jax
import jax.numpy as jnp
import pytest

from ncf_jax import dispatch

CHAIN = os.path.join(h.REPO, 'tests', '_collective_chain.py')


def test_in_flight_waits_for_the_launch_limit_places_back():
  waits = []
  in_flight = dispatch.InFlight(3, on_wait=lambda: waits.append(len(in_flight)))
  tokens = [jnp.full((4,), i) for i in range(10)]
  for t in tokens:
    in_flight.add(t)
    assert len(in_flight) <= 3
  assert len(waits) == 7 and all(n == 3 for n in waits)


def test_in_flight_without_a_limit_keeps_nothing():
  in_flight = dispatch.InFlight(None, on_wait=lambda: pytest.fail('waited'))
  for i in range(100):
    in_flight.add(jnp.zeros(()) + i)
  assert len(in_flight) == 0


def test_the_limit_applies_to_several_cpu_devices_only_and_stays_below_xla_s_queue():
  devices = jax.devices()
  assert len(devices) >= 2 and devices[0].platform == 'cpu'
  assert dispatch.in_flight_limit(devices[:1]) is None
  assert dispatch.in_flight_limit(devices) == dispatch.CPU_MAX_IN_FLIGHT
  assert 1 <= dispatch.CPU_MAX_IN_FLIGHT < 32  # XLA:CPU queues 32 programs per device


def _chain(limit, devices=4, timeout=120):
  return subprocess.run(
    [sys.executable, CHAIN, str(limit)],
    cwd=h.REPO,
    env=h.env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize('devices', [2, 4, 8])
def test_a_long_chain_of_all_reduces_finishes_with_the_bound(devices):
  out = _chain(dispatch.CPU_MAX_IN_FLIGHT, devices)
  assert out.returncode == 0 and 'done' in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_without_the_bound_xla_cpu_aborts_in_a_rendezvous():
  """The root cause, kept as a test: if XLA lifts the limit, this fails and says so."""
  out = _chain('none', 4)
  assert out.returncode != 0, 'unbounded dispatch finished: XLA:CPU may no longer need the bound'
  assert 'rendezvous' in out.stderr


def _watchdog_script(body):
  return subprocess.run(
    [sys.executable, '-c', textwrap.dedent(body)],
    cwd=h.REPO,
    env=h.env(1),
    capture_output=True,
    text=True,
    timeout=60,
  )


def test_watchdog_ends_a_stalled_run_with_one_line_and_exit_3():
  out = _watchdog_script('''
      import time
      from ncf_jax import dispatch
      with dispatch.Watchdog(0.5, lambda idle: f'stalled for {idle:.1f} s') as w:
        w.beat()
        time.sleep(30)
      ''')
  assert out.returncode == dispatch.EXIT_STALLED, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: stalled for '), out.stderr


def test_watchdog_waits_for_the_first_beat_and_can_be_disabled():
  out = _watchdog_script('''
      import time
      from ncf_jax import dispatch
      with dispatch.Watchdog(0.3, lambda idle: 'x'):   # compiling: no beat yet
        time.sleep(1.5)
      with dispatch.Watchdog(0, lambda idle: 'x') as w:
        w.beat()
        time.sleep(1.0)
      with dispatch.Watchdog(0.5, lambda idle: 'x') as w:
        for _ in range(15):
          w.beat()
          time.sleep(0.1)
      print('ok')
      ''')
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr
