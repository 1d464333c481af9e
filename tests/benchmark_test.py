"""`python -m ncf_jax.benchmark` runs its JAX sections end to end and prints stable keys."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STABLE_KEYS = (
  'backend',
  'sampler_negatives_per_sec',
  'random_draws_per_sec',
  'sampler_vs_random_ratio',
  'numpy_bisection_negatives_per_sec',
  'sampler_vs_numpy_ratio',
  'epoch_batches_sec',
  'epoch_vs_random_ratio',
  'eval_candidates_vs_random_ratio',
  'device_data_vs_int32_ratio',
  'hash_overhead_fraction_of_batches',
  'matmul_flops_per_sec',
  'train_samples_per_sec',
  'compute_ceiling_fraction',
  'hash_overhead_fraction_of_train',
  'breakdown_sampling_ms',
  'breakdown_forward_backward_ms',
  'breakdown_adam_update_ms',
  'eval_users_per_sec',
  'peak_host_rss_gb',
)


def test_sampler_and_train_sections_print_one_json_object_with_the_stable_keys(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'ncf_jax.benchmark',
      '--sections=sampler,train',
      '--scale=0.002',
      '--batch_sizes=1024',
      '--torch_variants=eager',
      f'--workdir={tmp_path}',
      '--json',
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  for key in STABLE_KEYS:
    assert key in figures, key
  assert figures['train_samples_per_sec'] == figures['train_samples_per_sec_b1024']
  assert 'peer_ratio_torch' in figures or 'torch_note' in figures
  if 'peer_ratio_torch' in figures:  # torch installed: the peer was timed next to ours
    assert figures['peer_best_b1024'] == 'torch_eager'
    assert figures['peer_ratio_torch'] == (
      figures['train_samples_per_sec_b1024'] / figures['torch_eager_samples_per_sec_b1024']
    )
  # The reference arithmetic is timed in the same rounds (the config projects the tables).
  assert figures['train_samples_per_sec_b1024_concat'] > 0
  # Bytes one device holds, as summary.json's bytes_per_device: the tables dominate.
  assert (
    figures['bytes_per_device_params'] > 0
    and figures['bytes_per_device_epoch'] > 0
    and figures['bytes_per_device_data'] > 0
  )
  assert figures['bytes_per_device_opt_state'] >= 2 * figures['bytes_per_device_params']
  for key in ('sampler_negatives_per_sec', 'train_samples_per_sec', 'eval_users_per_sec'):
    assert figures[key] > 0


def test_unknown_torch_variant_is_one_line_error():
  out = subprocess.run(
    [sys.executable, '-m', 'ncf_jax.benchmark', '--torch_variants=jit'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2
  assert 'unknown --torch_variants jit' in out.stderr and 'Traceback' not in out.stderr


def test_unknown_section_is_one_line_error():
  out = subprocess.run(
    [sys.executable, '-m', 'ncf_jax.benchmark', '--sections=nope'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2
  assert 'unknown --sections nope' in out.stderr and 'Traceback' not in out.stderr
