"""The demo's pieces at a small size: planning, bad input, and the demo command (`python -m perijax.demo`, what the
README's experiments/demo.sh runs) run once: train + evaluate each run in its own process, then the report. The slow
tests read what it wrote, and a second start skips the finished runs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from perijax import config as config_lib
from perijax import demo
from perijax import rundir
from perijax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'tiny.py')
SMALL = {'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2, 'train.steps': 4, 'train.batch_size': 8,
         'train.seq_len': 128, 'train.log_every': 1, 'train.stats_every': 2, 'checkpoint.every': 0,
         'data.eval_max_batches': 1, 'eval.batch_size': 8, 'eval.max_examples': 4, 'eval.tasks': ('next_line',)}


@pytest.fixture(scope='module')
def config():
  return config_lib.load_file(TINY)


@pytest.fixture(scope='module')
def fixed(corpus_data_dir):
  return {**SMALL, 'data.data_dir': corpus_data_dir}


@pytest.fixture(scope='module')
def demo_root(fixed, tmp_path_factory):
  """`python -m perijax.demo`, run once at a small size on two placements: (root, what it printed)."""
  root = tmp_path_factory.mktemp('demo')
  args = [sys.executable, '-m', 'perijax.demo', f'--root={root}', '--placements=pre,peri'] + [
      f'--config.{k}={sweep.format_value(v)}' for k, v in fixed.items()]
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, result.stdout


def test_plan_has_one_run_per_placement_with_the_fixed_overrides(config, fixed):
  runs = demo.plan_runs(config, ['pre', 'peri', 'post'], '/r', fixed)
  assert [run.name for run in runs] == ['placement=pre,seed=0', 'placement=peri,seed=0', 'placement=post,seed=0']
  assert runs[1].overrides == {'model.norm.placement': 'peri', 'train.seed': 0}
  assert sweep.resolve(config, {**fixed, **runs[1].overrides}).model.d_model == 32
  assert all(run.steps == 4 for run in runs)


def test_a_fixed_seed_is_the_seed_of_every_run(config):
  runs = demo.plan_runs(config, ['pre', 'peri'], '/r', {'train.seed': 7, 'train.steps': 4})
  assert [run.name for run in runs] == ['placement=pre,seed=7', 'placement=peri,seed=7']
  assert runs[1].overrides == {'model.norm.placement': 'peri', 'train.seed': 7}
  assert '--config.train.seed=7' in sweep.train_command(runs[1], 'c.py', {'train.seed': 7}, 'python')


def test_bad_placements_fail_before_anything_runs(config, tmp_path):
  with pytest.raises(ValueError, match=r"placement = 'peri-ln' is not allowed.*'peri'"):
    demo.plan_runs(config, ['pre', 'peri-ln'], str(tmp_path))
  with pytest.raises(ValueError, match='--placements is empty'):
    demo.plan_runs(config, [], str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_demo_trains_then_evaluates_each_run_with_the_separate_script(demo_root):
  root, _ = demo_root
  for placement in ('pre', 'peri'):
    workdir = root / f'placement={placement},seed=0'
    for command, module in (('train', 'perijax.train'), ('eval', 'perijax.evaluate')):   # each log starts with its argv
      assert f' -m {module} ' in rundir.command_log(workdir, command).read_text().splitlines()[0]
    result = json.loads((workdir / 'eval' / 'step_4.json').read_text())
    assert result['step'] == 4 and result['tokens'] > 0 and 'next_line' in result['tasks']
  assert [run['status'] for run in json.loads((root / 'sweep.json').read_text())['runs']] == ['finished'] * 2


@pytest.mark.slow
def test_demo_report_compares_placements_and_writes_plots(demo_root):
  root, printed = demo_root
  data = json.loads((root / 'report.json').read_text())
  assert [run['name'] for run in data['runs']] == ['pre', 'peri']
  assert all(run['eval_step'] == 4 and run['eval_loss'] > 0 for run in data['runs'])
  assert all(len(run['layer_stats'][-1]['residual_var']) == 2 for run in data['runs'])
  assert sorted(row['group'] for row in data['table1']) == ['placement=peri', 'placement=pre']
  text = (root / 'report.txt').read_text()
  for heading in ('residual variance', 'float16 headroom', 'Growth of residual variance', 'Table 1 (quality)',
                  'Table 1 (stability)'):
    assert heading in text and heading in printed
  names = sorted(os.path.basename(path) for path in data['plots'])
  assert names == ['layer_grad_norm.png', 'loss.png', 'loss_scale.png', 'massive_activations.png',
                   'residual_variance.png', 'residual_variance_heatmap.png'], names
  assert all(os.path.getsize(path) > 1000 and str(root / 'plots') in path for path in data['plots'])


@pytest.mark.slow
def test_demo_again_skips_finished_runs(demo_root, config, fixed):
  root, _ = demo_root
  calls = []
  data = demo.run_demo(TINY, config, fixed, ['pre', 'peri'], str(root),
                       run_command=lambda argv, log_path: calls.append(argv) or 0, log=lambda message: None)
  assert calls == []
  assert [run['status'] for run in json.loads((root / 'sweep.json').read_text())['runs']] == ['skipped'] * 2
  assert len(data['runs']) == 2


def test_a_failing_training_is_reported_not_compared(config, fixed, tmp_path):
  with pytest.raises(RuntimeError, match='no run of the demo finished'):
    demo.run_demo(TINY, config, fixed, ['pre'], str(tmp_path), run_command=lambda argv, log_path: 1,
                  log=lambda message: None)
