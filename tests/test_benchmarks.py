"""The benchmark entry's smallest setting runs end to end and writes JSON whose figures agree with each other."""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from perijax import hardware

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def smoke(tmp_path_factory, corpus_data_dir):
  out = tmp_path_factory.mktemp('bench') / 'results.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device, as the benchmark is meant to run
  process = subprocess.run([sys.executable, 'benchmarks/run.py', '--smoke', f'--out={out}',
                            f'--data_dir={corpus_data_dir}'], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  return process, json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_writes_every_section(smoke):
  _, results = smoke
  assert results['meta']['mode'] == 'smoke'
  if platform.system() == 'Linux':  # the CPU run restarts itself with the malloc tunables unless some are already set
    assert results['meta']['glibc_tunables'] == os.environ.get('GLIBC_TUNABLES', hardware.CPU_GLIBC_TUNABLES)
  assert {'matmul_flops', 'train', 'compile_s', 'pipeline', 'pipeline_stall', 'checkpoint_stall', 'stats_cost',
          'targets'} <= set(results)
  assert {(r['placement'], r['dtype']) for r in results['train']} == {('pre', 'float32'), ('peri', 'float32')}
  assert 'error' not in results['pipeline'] and results['pipeline']['tokens_per_s'] > 0
  assert set(results['targets']) == {'peri_over_pre_step_time', 'mfu_d512_float32', 'compile_48_over_4_with_scan',
                                     'pipeline_stall', 'checkpoint_stall'}


@pytest.mark.slow
def test_smoke_figures_are_consistent(smoke):
  _, results = smoke
  d_model, seq_len, batch = 32, 32, 4
  for row in results['train']:
    assert row['tokens_per_s'] == pytest.approx(batch * seq_len / row['step_s'])
    assert row['mfu'] == pytest.approx(row['model_flops_per_s'] / results['matmul_flops']['float32'])
    assert row['d_model'] == d_model
  train = {r['placement']: r for r in results['train']}
  ratio = results['targets']['peri_over_pre_step_time']
  assert ratio['value'] == pytest.approx(train['peri']['step_s'] / train['pre']['step_s'])
  assert ratio['met'] == (ratio['value'] <= 1.03)
  assert results['targets']['mfu_d512_float32']['met'] is None  # not measured at d_model 512 in smoke mode
  stall = results['checkpoint_stall']
  assert stall['stall'] == pytest.approx(stall['checkpoint_step_s'] / stall['no_checkpoint_step_s'] - 1)
  assert all(r['seconds'] > 0 for r in results['compile_s'])


@pytest.mark.slow
def test_smoke_prints_the_table(smoke):
  process, _ = smoke
  assert '| measurement | value |' in process.stdout
  assert 'target peri_over_pre_step_time' in process.stdout and 'Peri / Pre step time, median rounds' in process.stdout


def test_gpu_mode_refuses_without_a_gpu(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  process = subprocess.run([sys.executable, 'benchmarks/run.py', '--gpu', f'--out={tmp_path / "r.json"}'],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert process.returncode != 0 and 'no GPU here' in process.stderr
  assert not (tmp_path / 'r.json').exists()


@pytest.mark.slow
def test_gpu_section_runs_its_two_dtypes_on_a_toy_config():
  """GPU mode's code path on the CPU, with a toy config in place of paper_400m (the real figures need a GPU)."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import run  # pylint: disable=import-outside-toplevel
  args = argparse.Namespace(accelerator='h100', gpu_steps=1, gpu_rounds=1, gpu_batch=2,
                           remat='minimal', attention_impl='xla')

  def toy_config(dtype, args):
    config = run.gpu_config(dtype, args)
    config.model.update(d_model=32, num_layers=1, num_heads=2, vocab_size=64, mlp_dim=64)
    config.train.update(seq_len=16)
    return config

  results = run.gpu_sections(args, log=lambda message: None, make_config=toy_config)
  rows = {r['dtype']: r for r in results['train']}
  assert set(rows) == {'bfloat16', 'float16'}
  assert rows['float16']['loss_scaling'] and not rows['bfloat16']['loss_scaling']
  assert results['peak_flops'] == 989e12 and results['accelerator'] == 'h100'
  for row in rows.values():
    assert row['tokens_per_s'] == pytest.approx(2 * 16 / row['step_s'])
    assert row['mfu'] == pytest.approx(row['model_flops_per_s'] / 989e12)
  assert set(results['targets']) == {'mfu_400m_bfloat16', 'mfu_400m_float16'}


@pytest.mark.slow
def test_stats_cost_compares_the_plain_step_with_the_statistics_step():
  """The plain step's program has none of the statistics: fewer FLOPs, no top_k, no op kind more often than the
  statistics step; the timing fields agree with each other and reach the printed table."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import run  # pylint: disable=import-outside-toplevel
  import train_speed  # pylint: disable=import-outside-toplevel
  config = run.bench_config(d_model=32, layers=1, seq_len=16, batch=2)
  config.model.update(vocab_size=64, mlp_dim=64)
  config.train.stats_every = 25
  cost = json.loads(json.dumps(train_speed.stats_cost(config, steps=1, rounds=2, warmup=1)))  # what the JSON holds
  plain, stats = cost['plain'], cost['stats']
  assert plain['top_k'] == 0 and stats['top_k'] >= 1 and cost['ops_added']['chlo.top_k'] == stats['top_k']
  assert 0 < plain['flops'] < stats['flops'] and cost['flops_ratio'] == pytest.approx(stats['flops'] / plain['flops'])
  assert plain['ops'] < stats['ops'] and cost['plain_ops_beyond_stats'] == 0
  assert plain['ops'] + sum(cost['ops_added'].values()) == stats['ops']
  assert cost['extra'] == pytest.approx(cost['stats_step_s'] / cost['plain_step_s'] - 1)
  assert cost['stats_every'] == 25 and cost['amortised'] == pytest.approx(cost['extra'] / 25)
  assert cost['rounds'] == 2 and cost['plain_step_s'] > 0 and cost['stats_step_s'] > 0
  assert 'statistics amortised over stats_every=25 steps' in run.table({'stats_cost': cost})
