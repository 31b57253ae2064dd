"""The experiments' pieces: scale handling, grid planning, the at-init variance law on a small model, and each
experiment's analysis on small recorded metrics with known answers (no training, except the slow end-to-end test)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import common
from experiments import fp16_stability
from experiments import grad_norms
from experiments import pre_post_vs_peri
from experiments import variance_law
from perijax import sweep
from perijax import train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'tiny.py')
PAPER = str(REPO / 'configs' / 'paper_400m.py')
SMALL_MODEL = {'model.d_model': 32, 'model.num_layers': 3, 'model.num_heads': 2, 'train.seq_len': 16}


@pytest.fixture(scope='module')
def tiny_config():
  return sweep.load_config(TINY)


def test_small_overrides_apply_to_tiny_only_and_user_overrides_win(tiny_config):
  small = {'train.steps': 7, 'model.num_layers': 2}
  setup = common.make_setup(TINY, tiny_config, {'train.steps': 11}, small)
  assert setup.small_scale and setup.fixed == {'model.num_layers': 2, 'train.steps': 11}
  assert setup.resolved().train.steps == 11 and setup.resolved().model.num_layers == 2
  paper = common.make_setup(PAPER, sweep.load_config(PAPER), {}, small)
  assert not paper.small_scale and paper.fixed == {}
  assert paper.resolved().model.num_layers == 24   # the paper config's own depth


def test_a_typo_in_small_overrides_is_a_clear_error(tiny_config):
  with pytest.raises(ValueError, match=r"no field 'model.num_layer'.*model.num_layers"):
    common.make_setup(TINY, tiny_config, {}, {'model.num_layer': 2})


def test_plan_expands_grid_times_seeds_and_validates(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, fp16_stability.SMALL)
  grid = fp16_stability.grid_from(setup, ['pre', 'peri'], [], [])
  assert grid == [('model.norm.placement', ['pre', 'peri']), ('optimizer.lr', [3e-3, 3e-2]),
                  ('model.num_layers', [2, 8])]
  runs = common.plan(setup, grid, 3, str(tmp_path))
  assert len(runs) == 24 and len({run.workdir for run in runs}) == 24
  assert runs[0].name == 'placement=pre,lr=0.003,num_layers=2,seed=0'
  assert all(run.steps == fp16_stability.SMALL['train.steps'] for run in runs)
  assert setup.resolved(runs[-1].overrides).model.compute_dtype == 'float16'
  with pytest.raises(ValueError, match='placement'):
    common.plan(setup, [('model.norm.placement', ['pre', 'perii'])], 1, str(tmp_path))


def test_scale_output_projections_touches_only_attention_out_and_mlp_down(tiny_config):
  config = sweep.resolve(tiny_config, SMALL_MODEL)
  model = train_step.make_model(config)
  params = train_step.unboxed(model.init(jax.random.key(0), np.zeros((1, 16), np.int32)))['params']
  scaled = common.scale_output_projections(params, 3.0)
  flat = dict(jax.tree_util.tree_leaves_with_path(params))
  flat_scaled = dict(jax.tree_util.tree_leaves_with_path(scaled))
  changed = set()
  for path, leaf in flat.items():
    if not np.allclose(leaf, flat_scaled[path]):
      np.testing.assert_allclose(flat_scaled[path], 3.0 * leaf, rtol=1e-6)
      changed.add(jax.tree_util.keystr(path))
  assert changed and all(("'out'" in p and "'attention'" in p) or ("'down'" in p and "'mlp'" in p) for p in changed)
  assert len(changed) == 2   # scanned layers: one stacked kernel each


def test_at_init_pre_increment_scales_as_s_squared_and_peri_does_not_move(tiny_config):
  setup = common.make_setup(TINY, tiny_config, SMALL_MODEL, {})
  rows = {row['placement']: row for row in variance_law.scale_test(setup, ['pre', 'peri'], [1.0, 4.0, 16.0], 2)}
  assert rows['pre']['exponent'] == pytest.approx(2.0, abs=0.2)
  assert rows['peri']['exponent'] == pytest.approx(0.0, abs=0.05)
  checks = variance_law.verdict(list(rows.values()), [])
  assert checks['pre_increment_scales_as_s2'] and checks['peri_increment_ignores_s']


def test_init_layer_stats_peri_adds_about_unit_variance_per_sublayer(tiny_config):
  overrides = {**SMALL_MODEL, 'model.d_model': 64, 'train.seq_len': 32, 'model.norm.placement': 'peri'}
  summary, = common.init_layer_stats(sweep.resolve(tiny_config, overrides), seed=0, batch_size=2)
  assert len(summary['residual_var']) == 3 and len(summary['sublayer_var']) == 6
  assert summary['sublayer_var'][1::2] == pytest.approx(summary['residual_var'])
  # Peri-LN at init: each sub-layer adds a unit-RMS (normalized) term to an embedding of variance init.std² = 4e-4,
  # so the first sub-layer's variance is about 1 and later ones add about 1 each (up to Cov(x, N(F)) noise).
  increments = np.diff([0.0] + summary['sublayer_var'])
  assert increments[0] == pytest.approx(1.0, abs=0.1)
  assert increments.mean() == pytest.approx(1.0, abs=0.2)


def write_run(workdir, overrides, metrics, steps):
  os.makedirs(workdir, exist_ok=True)
  config = {'train': {'steps': steps, 'seed': overrides.get('train.seed', 0)}}
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write('\n'.join(json.dumps(line) for line in metrics) + '\n')


def test_fp16_analysis_counts_overflows_spikes_and_divergence(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, fp16_stability.SMALL)
  grid = fp16_stability.grid_from(setup, ['pre', 'peri'], ['0.01'], ['2'])
  runs = common.plan(setup, grid, 2, str(tmp_path))
  for run in runs:
    pre, seed = run.overrides['model.norm.placement'] == 'pre', run.overrides['train.seed']
    final_loss = float('nan') if (pre and seed == 1) else 3.0 + seed
    lines = [{'step': 50, 'loss': 5.0, 'spikes': 0, 'skipped_steps': 0, 'forward_overflows': 0,
              'max_abs': [1.0, 2.0], 'fp16_headroom': [1e-4, 0.5 if pre else 1e-3],
              'fp16_overflow': [0, 3 if pre else 0],
              'residual_var': [1.0, 2.0]},
             {'step': 100, 'loss': final_loss, 'spikes': 2 if pre else 0, 'skipped_steps': 4 if pre else 1,
              'forward_overflows': 0}]
    write_run(run.workdir, run.overrides, lines, steps=100)
  rows = fp16_stability.summarize(runs, common.load_records(runs))
  pre = next(row for row in rows if row['placement'] == 'pre')
  peri = next(row for row in rows if row['placement'] == 'peri')
  assert (pre['diverged'], peri['diverged']) == (1, 0)
  assert pre['fp16_overflows']['mean'] == 3 and peri['fp16_overflows']['mean'] == 0
  assert pre['final_loss']['mean'] == 3.0 and pre['final_loss']['n_finite'] == 1
  assert peri['final_loss']['mean'] == 3.5 and peri['final_loss']['std'] == pytest.approx(math.sqrt(0.5))
  assert pre['worst_fp16_headroom'] == 0.5 and peri['worst_fp16_headroom'] == 1e-3
  checks = fp16_stability.checks(rows)
  assert checks['pre_headroom_larger_everywhere']
  assert checks['spikes'] == {'pre': 4, 'peri': 0} and checks['skipped_steps'] == {'pre': 8, 'peri': 2}
  assert checks['diverged'] == {'pre': 1, 'peri': 0}
  assert 'pre' in fp16_stability.table(rows) and '1/2' in fp16_stability.table(rows)


def test_grad_norm_analysis_orders_levels_and_finds_the_flattest(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, grad_norms.SMALL)
  runs = common.plan(setup, [('model.norm.placement', ['post', 'pre', 'peri'])], 1, str(tmp_path))
  profiles = {'post': [8.0, 4.0, 2.0, 1.0], 'pre': [3.0, 2.0, 1.0, 1.0], 'peri': [1.0, 1.0, 1.0, 1.0]}
  for run in runs:
    profile = profiles[run.overrides['model.norm.placement']]
    lines = [{'step': step, 'loss': 3.0, 'layer_grad_norm': [v * (2 if step <= 30 else 1) for v in profile]}
             for step in (10, 20, 30, 40, 50, 60, 70, 80, 90)]
    write_run(run.workdir, run.overrides, lines, steps=90)
  rows = grad_norms.summarize(runs, common.load_records(runs))
  post = next(row for row in rows if row['placement'] == 'post')
  assert post['first_third']['profile'] == pytest.approx([16, 8, 4, 2])
  assert post['whole_run']['profile'] == pytest.approx(np.array([8, 4, 2, 1]) * 12 / 9)
  assert post['whole_run']['max_over_min'] == pytest.approx(8.0)
  checks = grad_norms.checks(rows)
  assert checks['whole_run']['order_by_level'] == ['post', 'pre', 'peri']
  assert checks['whole_run']['post_gt_pre_gt_peri'] and checks['whole_run']['peri_flattest']


def test_the_summarys_toy_example_is_recomputed():
  toy = pre_post_vs_peri.toy_example()
  assert toy['layernorm_of_input'] == pytest.approx([math.sqrt(1.5), 0, -math.sqrt(1.5)], abs=1e-4)
  assert toy['residual_sum'] == pytest.approx([3.2247, 0, -3.2247], abs=1e-4)
  assert toy['layernorm_of_sum'] == pytest.approx([1.2247, 0, -1.2247], abs=1e-4)   # not the summary's 1.37


def test_print_emits_one_command_per_run_and_trains_nothing(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.grad_norms', '--print', f'--root={tmp_path}/r', '--seeds=2'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if 'perijax.train' in line]
  assert len(lines) == 6
  assert all('--config.model.num_layers=8' in line and 'perijax.evaluate' in line for line in lines)
  assert not os.path.exists(tmp_path / 'r')


@pytest.mark.slow
def test_grad_norms_end_to_end_on_the_fixture_corpus(corpus_data_dir, tmp_path):
  """Trains post/pre/peri for a few steps in one process, then resumes: finished runs are skipped."""
  args = [sys.executable, '-m', 'experiments.grad_norms', f'--root={tmp_path}/runs', f'--results={tmp_path}/res',
          f'--config.data.data_dir={corpus_data_dir}', '--seeds=1', '--config.train.steps=4',
          '--config.train.log_every=1', '--config.model.d_model=32', '--config.model.num_layers=2',
          '--config.train.seq_len=32']
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((tmp_path / 'res' / 'grad_norms.json').read_text())
  assert [row['placement'] for row in data['placements']] == ['post', 'pre', 'peri']
  assert all(len(row['whole_run']['profile']) == 2 for row in data['placements'])
  assert (tmp_path / 'res' / 'grad_norms.png').stat().st_size > 0
  again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count(': skipped') == 3
