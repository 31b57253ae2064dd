"""The demo's pieces at a small size: planning, train + evaluate + report (in this process, through the same run
commands the demo hands to subprocesses), resumption, and bad input; the tests that train, here or through the real
subprocess demo, are marked slow."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from perijax import config as config_lib
from perijax import demo
from perijax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'tiny.py')
SMALL = {'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2, 'train.steps': 4, 'train.batch_size': 8,
         'train.seq_len': 128, 'train.log_every': 1, 'train.stats_every': 2, 'checkpoint.every': 0,
         'data.eval_max_batches': 1, 'eval.batch_size': 8, 'eval.max_examples': 4, 'eval.tasks': ('next_line',)}


def in_process_command(calls):
  """A RunCommand that runs `perijax.train` / `perijax.evaluate` argv in this process (no JAX start-up per run)."""
  def run_command(argv, log_path):
    del log_path
    calls.append(argv)
    module = argv[argv.index('-m') + 1]
    args = dict(arg[2:].split('=', 1) for arg in argv[argv.index('-m') + 2:])
    if module == 'perijax.train':
      from perijax import train  # pylint: disable=g-import-not-at-top
      config = config_lib.load_file(args.pop('config'))
      workdir = args.pop('workdir')
      overrides = {k[len('config.'):]: config_lib.parse_value(config, k[len('config.'):], v) for k, v in args.items()}
      train.train(sweep.resolve(config, overrides), workdir)
    elif module == 'perijax.evaluate':
      from perijax import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.run(args['workdir'], step=int(args['step']))
    else:
      raise AssertionError(f'unexpected command {argv}')
    return 0
  return run_command


@pytest.fixture(scope='module')
def config():
  return config_lib.load_file(TINY)


@pytest.fixture(scope='module')
def fixed(corpus_data_dir):
  return {**SMALL, 'data.data_dir': corpus_data_dir}


@pytest.fixture(scope='module')
def demo_root(config, fixed, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('demo'))
  calls = []
  data = demo.run_demo(TINY, config, fixed, demo.PLACEMENTS, root, run_command=in_process_command(calls),
                       log=lambda message: None)
  return root, data, calls


def test_plan_has_one_run_per_placement_with_the_fixed_overrides(config, fixed):
  runs = demo.plan_runs(config, ['pre', 'peri', 'post'], '/r', fixed)
  assert [run.name for run in runs] == ['placement=pre,seed=0', 'placement=peri,seed=0', 'placement=post,seed=0']
  assert runs[1].overrides == {'model.norm.placement': 'peri', 'train.seed': 0}
  assert sweep.resolve(config, {**fixed, **runs[1].overrides}).model.d_model == 32
  assert all(run.steps == 4 for run in runs)


def test_bad_placements_fail_before_anything_runs(config, tmp_path):
  with pytest.raises(ValueError, match=r"placement = 'peri-ln' is not allowed.*'peri'"):
    demo.plan_runs(config, ['pre', 'peri-ln'], str(tmp_path))
  with pytest.raises(ValueError, match='--placements is empty'):
    demo.plan_runs(config, [], str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_demo_trains_then_evaluates_each_run_with_the_separate_script(demo_root):
  root, _, calls = demo_root
  modules = [argv[argv.index('-m') + 1] for argv in calls]
  assert modules == ['perijax.train', 'perijax.evaluate'] * 3
  for placement in demo.PLACEMENTS:
    workdir = os.path.join(root, f'placement={placement},seed=0')
    result = json.loads(pathlib.Path(workdir, 'eval', 'step_4.json').read_text())
    assert result['step'] == 4 and result['tokens'] > 0 and 'next_line' in result['tasks']
  statuses = [run['status'] for run in json.loads(pathlib.Path(root, 'sweep.json').read_text())['runs']]
  assert statuses == ['finished'] * 3


@pytest.mark.slow
def test_demo_report_compares_placements_and_writes_plots(demo_root):
  root, data, _ = demo_root
  assert [run['name'] for run in data['runs']] == ['pre', 'peri', 'post']
  assert all(run['eval_step'] == 4 and run['eval_loss'] > 0 for run in data['runs'])
  assert all(len(run['layer_stats'][-1]['residual_var']) == 2 for run in data['runs'])
  assert sorted(row['group'] for row in data['table1']) == ['placement=peri', 'placement=post', 'placement=pre']
  text = pathlib.Path(root, 'report.txt').read_text()
  for heading in ('residual variance', 'float16 headroom', 'Growth of residual variance', 'Table 1 (quality)'):
    assert heading in text
  assert json.loads(pathlib.Path(root, 'report.json').read_text())['plots'] == data['plots']
  names = sorted(os.path.basename(path) for path in data['plots'])
  assert names == ['layer_grad_norm.png', 'loss.png', 'loss_scale.png', 'massive_activations.png',
                   'residual_variance.png', 'residual_variance_heatmap.png'], names
  assert all(os.path.getsize(path) > 1000 for path in data['plots'])


@pytest.mark.slow
def test_demo_again_skips_finished_runs(demo_root, config, fixed):
  root, _, _ = demo_root
  calls = []
  data = demo.run_demo(TINY, config, fixed, demo.PLACEMENTS, root, run_command=in_process_command(calls),
                       log=lambda message: None)
  assert calls == []
  assert [run['status'] for run in json.loads(pathlib.Path(root, 'sweep.json').read_text())['runs']] == ['skipped'] * 3
  assert len(data['runs']) == 3


def test_a_failing_training_is_reported_not_compared(config, fixed, tmp_path):
  with pytest.raises(RuntimeError, match='no run of the demo finished'):
    demo.run_demo(TINY, config, fixed, ['pre'], str(tmp_path), run_command=lambda argv, log_path: 1,
                  log=lambda message: None)


@pytest.mark.slow
def test_demo_command_end_to_end(corpus_data_dir, tmp_path):
  args = [sys.executable, '-m', 'perijax.demo', f'--root={tmp_path}', '--placements=pre,peri',
          f'--config.data.data_dir={corpus_data_dir}'] + [
              f'--config.{k}={sweep.format_value(v)}' for k, v in SMALL.items()]
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Table 1 (stability)' in result.stdout and 'float16 headroom' in result.stdout
  assert (tmp_path / 'plots' / 'residual_variance.png').exists()
  assert (tmp_path / 'placement=peri,seed=0' / 'eval' / 'step_4.json').exists()
