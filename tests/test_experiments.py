"""The experiments' pieces: scale handling, grid planning, the at-init variance law on a small model, each
experiment's analysis on small recorded metrics with known answers (no training, except the two slow end-to-end
tests), and bad input to the scripts."""

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
from experiments import lr_sensitivity
from experiments import pre_post_vs_peri
from experiments import variance_law
from perijax import config as config_lib
from perijax import errors
from perijax import sweep
from perijax import train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'tiny.py')
PAPER = str(REPO / 'configs' / 'paper_400m.py')
SMALL_MODEL = {'model.d_model': 32, 'model.num_layers': 3, 'model.num_heads': 2, 'train.seq_len': 16}


@pytest.fixture(scope='module')
def tiny_config():
  return config_lib.load_file(TINY)


def test_small_overrides_apply_to_tiny_only_and_user_overrides_win(tiny_config):
  small = {'train.steps': 7, 'model.num_layers': 2}
  setup = common.make_setup(TINY, tiny_config, {'train.steps': 11}, small)
  assert setup.small_scale and setup.fixed == {'model.num_layers': 2, 'train.steps': 11}
  assert setup.resolved().train.steps == 11 and setup.resolved().model.num_layers == 2
  paper = common.make_setup(PAPER, config_lib.load_file(PAPER), {}, small)
  assert not paper.small_scale and paper.fixed == {}
  assert paper.resolved().model.num_layers == 24   # the paper config's own depth


def test_a_typo_in_small_overrides_is_a_clear_error(tiny_config):
  with pytest.raises(ValueError, match=r"no field 'model.num_layer'.*model.num_layers"):
    common.make_setup(TINY, tiny_config, {}, {'model.num_layer': 2})


def test_plan_expands_grid_times_seeds_and_validates(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, fp16_stability.SMALL)
  grid = fp16_stability.grid_from(setup, ['pre', 'peri'], [], [])
  assert grid == [('model.norm.placement', ['pre', 'peri']), ('optimizer.lr', [3e-3, 1e-2, 3e-2, 1e-1]),
                  ('model.num_layers', [2, 16])]
  runs = common.plan(setup, grid, 3, str(tmp_path))
  assert len(runs) == 48 and len({run.workdir for run in runs}) == 48
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


@pytest.mark.slow
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
              'initial_scale_backoffs': 6 if pre else 5,
              'max_abs': [1.0, 2.0], 'fp16_headroom': [1e-4, 0.5 if pre else 1e-3],
              'fp16_overflow': [0, 3 if pre else 0],
              'residual_var': [1.0, 2.0]},
             {'step': 100, 'loss': final_loss, 'spikes': 2 if pre else 0, 'skipped_steps': 4 if pre else 1,
              'forward_overflows': 0, 'initial_scale_backoffs': 6 if pre else 5}]
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
  assert checks['initial_scale_backoffs'] == {'pre': 6, 'peri': 5}   # the scale's search, apart from skipped steps
  point = checks['per_point'][0]['pre_vs_peri']
  assert point['skipped_steps']['difference'] == 3 and point['skipped_steps']['exceeds_seed_spread']   # 4 vs 1, std 0
  assert point['final_loss']['a']['n_finite'] == 1 and point['final_loss']['exceeds_seed_spread'] is None
  assert 'pre' in fp16_stability.table(rows) and '1/2' in fp16_stability.table(rows)


def test_a_nan_maximum_is_an_overflow_whatever_its_position(tiny_config, tmp_path):
  # A NaN headroom or attention logit comes from inf - inf: it counts as +inf, first or not in its list.
  for index, values in enumerate(([math.nan, 1.0, 2.0], [1.0, math.nan, 2.0])):
    setup = common.make_setup(TINY, tiny_config, {}, fp16_stability.SMALL)
    runs = common.plan(setup, fp16_stability.grid_from(setup, ['pre'], [0.01], [2]), 1, str(tmp_path / f'fp16_{index}'))
    write_run(runs[0].workdir, runs[0].overrides, [{'step': 0, 'loss': 5.0, 'fp16_headroom': values},
                                                   {'step': 10, 'loss': 4.0}], steps=10)
    assert fp16_stability.summarize(runs, common.load_records(runs))[0]['worst_fp16_headroom'] == math.inf
    setup = common.make_setup(TINY, tiny_config, {}, lr_sensitivity.SMALL)
    runs = common.plan(setup, lr_sensitivity.grids(['pre'], [], [], [1e-3], [4])[0], 1, str(tmp_path / f'lr_{index}'))
    write_run(runs[0].workdir, runs[0].overrides, [{'step': 1, 'loss': 5.0},
                                                   {'step': 10, 'loss': 4.0, 'attn_logit_max': values}], steps=10)
    assert lr_sensitivity.summarize(runs, common.load_records(runs))[0]['largest_attn_logit'] == math.inf


def test_grad_norm_analysis_snapshots_at_init_and_end_with_seed_spread(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, grad_norms.SMALL)
  runs = common.plan(setup, [('model.norm.placement', ['post', 'pre', 'peri'])], 3, str(tmp_path))
  profiles = {'post': [8.0, 4.0, 2.0, 1.0], 'pre': [3.0, 2.0, 1.0, 1.0], 'peri': [1.0, 1.0, 1.0, 1.0]}
  for run in runs:
    profile = np.asarray(profiles[run.overrides['model.norm.placement']])
    jitter = 1 + 0.01 * run.overrides['train.seed']
    # Step 1 (init): the profile x 2, except post's step 1 is not finite (then its first finite line counts);
    # the end (step 90): the profile x 0.5; in between x 1.
    lines = [{'step': step, 'loss': 3.0, 'layer_grad_norm': (profile * jitter * factor).tolist()}
             for step, factor in ((1, 2.0), (10, 2.0), (50, 1.0), (90, 0.5))]
    if run.overrides['model.norm.placement'] == 'post':
      lines[0]['layer_grad_norm'][0] = None
    write_run(run.workdir, run.overrides, lines, steps=90)
  rows = grad_norms.summarize(runs, common.load_records(runs))
  post = next(row for row in rows if row['placement'] == 'post')
  peri = next(row for row in rows if row['placement'] == 'peri')
  assert post['at_init']['profile'] == pytest.approx(np.array([16, 8, 4, 2]) * 1.01)    # mean jitter over 3 seeds
  assert post['at_end']['profile'] == pytest.approx(np.array([4, 2, 1, 0.5]) * 1.01)
  assert peri['at_init']['level_per_seed'] == pytest.approx([2.0, 2.02, 2.04])
  assert post['at_end']['max_over_min'] == pytest.approx(8.0)
  checks = grad_norms.checks(rows)
  for label in ('at_init', 'at_end', 'whole_run'):
    assert checks[label]['order_by_level'] == ['post', 'pre', 'peri']
    assert checks[label]['post_gt_pre_gt_peri'] and checks[label]['peri_flattest']
    assert checks[label]['pre_vs_peri_level']['exceeds_seed_spread'] is True
  # cv is the same for every seed of a placement (the jitter is a common factor): no spread, a clear difference.
  assert checks['at_end']['pre_vs_peri_cv']['b']['mean'] == pytest.approx(0.0)


def test_pre_post_analysis_of_a_run_without_statistics_yet_is_one_line(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, pre_post_vs_peri.SMALL)
  runs = common.plan(setup, [('model.norm.placement', list(pre_post_vs_peri.PLACEMENTS))], 1, str(tmp_path))
  for run in runs:   # logged losses, but no statistics step reached yet
    write_run(run.workdir, run.overrides, [{'step': 1, 'loss': 5.0}, {'step': 10, 'loss': 4.0}], steps=150)
  with pytest.raises(errors.NotFoundError, match=r'2 run\(s\) have no per-layer statistics yet, e.g. .*peri'):
    pre_post_vs_peri.summarize(runs, common.load_records(runs))


def test_compare_says_whether_a_difference_exceeds_the_seed_spread():
  apart = common.compare([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
  assert apart['difference'] == pytest.approx(-1.0) and apart['exceeds_seed_spread'] is True
  assert apart['a']['std'] == pytest.approx(np.std([1.0, 1.1, 0.9], ddof=1))
  overlapping = common.compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
  assert overlapping['exceeds_seed_spread'] is False
  assert common.compare([1.0], [2.0, 3.0])['exceeds_seed_spread'] is None   # one seed: no spread to compare with
  assert common.compare([math.nan, 1.0, 1.2], [2.0, 2.1])['a']['n_finite'] == 2
  assert 'exceeds the seed spread' in common.compare_text('pre', 'peri', apart)


def fabricate_lr_runs(setup, tmp_path, attn_logits=True):
  """Final losses with a known LR sensitivity: pre [3, 2, NaN] (diverges at the top lr), peri [2.5, 2, 2.5];
  L_init = 5. Seeds add ±0.01."""
  grid = lr_sensitivity.grids(['pre', 'peri'], [], [], [1e-3, 1e-2, 1e-1], [4])
  runs = [run for sub in grid for run in common.plan(setup, sub, 3, str(tmp_path))]
  finals = {'pre': [3.0, 2.0, math.nan], 'peri': [2.5, 2.0, 2.5]}
  for run in runs:
    placement, seed = run.overrides['model.norm.placement'], run.overrides['train.seed']
    final = finals[placement][[1e-3, 1e-2, 1e-1].index(run.overrides['optimizer.lr'])] + 0.01 * (seed - 1)
    losses = np.linspace(5.0, 2.0 if math.isnan(final) else final, 30)
    if math.isnan(final):
      losses[20:] = math.nan
    lines = [{'step': step, 'loss': float(loss)} for step, loss in zip([1] + list(range(10, 300, 10)), losses)]
    if attn_logits and placement == 'pre':
      lines[-1]['attn_logit_max'] = [10.0, 40.0 * run.overrides['optimizer.lr'] / 1e-3, 5.0, 1.0]
    write_run(run.workdir, run.overrides, lines, steps=290)
  return runs


def test_lr_sensitivity_analysis_on_known_curves(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, lr_sensitivity.SMALL)
  runs = fabricate_lr_runs(setup, tmp_path)
  rows = {row['variant']: row for row in lr_sensitivity.summarize(runs, common.load_records(runs))}
  pre, peri = rows['pre'], rows['peri']
  assert pre['l_init'] == pytest.approx(5.0) and pre['lrs'] == [1e-3, 1e-2, 1e-1]
  # Final loss = the mean over the last 10% of the run (steps >= 261 of 290: the last 3 logged losses).
  tail = lambda end: np.linspace(5.0, end, 30)[-3:].mean()
  seeds = [tail(2.5 + 0.01 * (seed - 1)) for seed in range(3)]
  assert peri['final_loss'][0]['mean'] == pytest.approx(np.mean(seeds), abs=1e-9)
  assert peri['final_loss'][0]['std'] == pytest.approx(np.std(seeds, ddof=1), abs=1e-9)
  # Wortsman et al.'s sensitivity: mean over lrs of min(L, L_init) minus the best L; the diverged lr counts as L_init.
  for row, curve in ((pre, [tail(3.0), tail(2.0), 5.0]), (peri, [tail(2.5), tail(2.0), tail(2.5)])):
    assert row['sensitivity']['mean'] == pytest.approx(np.mean(curve) - min(curve), abs=1e-3)
  assert pre['diverged'] == [0, 0, 3] and peri['diverged'] == [0, 0, 0]
  assert pre['best_lr'] == 1e-2
  assert pre['largest_attn_logit'] == pytest.approx(4000.0) and peri['largest_attn_logit'] is None   # peri: not logged
  assert pre['attn_logit_max'][0] == pytest.approx([10.0, 40.0, 5.0, 1.0])
  checks = lr_sensitivity.checks(list(rows.values()))['4_layers']
  assert checks['ranked_by_sensitivity'] == ['peri', 'pre']
  assert checks['pre_vs_peri']['exceeds_seed_spread'] is True and checks['divergences'] == {'pre': 3, 'peri': 0}
  assert 'pre' in lr_sensitivity.table(list(rows.values()))
  assert lr_sensitivity.plot(list(rows.values()), str(tmp_path / 'lr.png'))
  assert (tmp_path / 'lr.png').stat().st_size > 0
  # Without any attention-logit record the analysis and plot still work.
  runs = fabricate_lr_runs(setup, tmp_path / 'no_logits', attn_logits=False)
  rows = lr_sensitivity.summarize(runs, common.load_records(runs))
  assert all(row['largest_attn_logit'] is None for row in rows)
  lr_sensitivity.plot(rows, str(tmp_path / 'lr2.png'))


def test_lr_sensitivity_grid_covers_the_issue(tiny_config, tmp_path):
  setup = common.make_setup(TINY, tiny_config, {}, lr_sensitivity.SMALL)
  lrs = [float(v) for v in np.logspace(-4, -1, 7)]
  grid = lr_sensitivity.grids(['post', 'pre', 'peri', 'output'], ['pre'], ['pre', 'peri'], lrs, [4, 16])
  runs = [run for sub in grid for run in common.plan(setup, sub, 3, str(tmp_path))]
  assert len(runs) == (4 + 1 + 2) * 7 * 2 * 3 and len({run.workdir for run in runs}) == len(runs)
  variants = {lr_sensitivity.variant_name(*(run.overrides[f] for f in lr_sensitivity.FIELDS)) for run in runs}
  assert variants == {'post', 'pre', 'peri', 'output', 'pre+qk_norm', 'pre/float16', 'peri/float16'}
  assert min(lrs) == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-1)


def test_variance_law_training_analysis_on_known_growth(tiny_config, tmp_path, monkeypatch):
  setup = common.make_setup(TINY, tiny_config, {**SMALL_MODEL, 'model.num_layers': 12}, {})
  # At init (step 0) both placements are linear in depth; measuring it needs a model (tested above), not this test.
  fake_init = lambda config, seed, batch_size: [{'residual_var': (1.0 + 2.0 * np.arange(1, 13)).tolist(),
                                                 'max_abs': [1.0] * 12}]
  monkeypatch.setattr(common, 'init_layer_stats', fake_init)
  runs = common.plan(setup, [('model.norm.placement', ['pre', 'peri'])], 3, str(tmp_path))
  layers = np.arange(1, 13)
  rng = np.random.default_rng(0)
  for run in runs:
    pre = run.overrides['model.norm.placement'] == 'pre'
    lines = []
    for step in (100, 200):
      law = 0.1 * np.exp(0.6 * layers) * step if pre else 1.0 + 2.0 * layers   # pre grows in training, peri does not
      noise = np.exp(0.03 * rng.standard_normal(12))
      line = {'step': step, 'loss': 3.0, 'residual_var': (law * noise).tolist(), 'max_abs': [1.0] * 12,
              'attn_delta_var': [0.5] * 12}
      if step == 200:
        line['massive_residual'] = [[1.0, 2.0]]
      lines.append(line)
    write_run(run.workdir, run.overrides, lines, steps=200)
  rows = variance_law.training_profiles(setup, runs, common.load_records(runs), batch_size=2)
  assert [row['steps'] for row in rows] == [[0, 100, 200]] * 6   # step 0: at init
  fits = variance_law.group_fits(rows)
  assert fits['pre'][-1]['verdict'] == 'exponential' and fits['peri'][-1]['verdict'] == 'linear'
  assert fits['pre'][-1]['num_seeds'] == 3 and [f['step'] for f in fits['pre']] == [0, 100, 200]
  assert rows[0]['extra_layer_stats']['attn_delta_var'][1:] == [[0.5] * 12] * 2
  assert rows[0]['massive_activations_at_end'] == {'massive_residual': [[1.0, 2.0]]}
  checks = variance_law.verdict([], rows)
  assert checks['verdict_across_seeds']['pre']['end'] == 'exponential'
  assert checks['pre_vs_peri_log10_growth']['exceeds_seed_spread'] is True
  assert checks['pre_variance_grows_more_than_peri_in_training'] and checks['pre_growth_over_100x']
  assert variance_law.plot([], [], rows, str(tmp_path / 'v.png'))


@pytest.mark.slow
def test_init_analysis_runs_sharded_and_matches_one_device(tiny_config):
  config = sweep.resolve(tiny_config, {**SMALL_MODEL, 'model.norm.placement': 'pre', 'mesh.data': 2, 'mesh.fsdp': 2,
                                       'mesh.tensor': 2})
  mesh = common.sharding_lib.make_mesh(config.mesh)
  _, params = common.init_params(config, 0, mesh)
  leaves = jax.tree_util.tree_leaves(params)
  assert any(leaf.addressable_shards[0].data.size < leaf.size for leaf in leaves)   # sharded, not whole anywhere
  sharded, = common.init_layer_stats(config, 0, 3, devices=jax.devices())            # batch 3 -> 4 (data x fsdp)
  one = sweep.resolve(config, {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1})
  single, = common.init_layer_stats(one, 0, 4, devices=jax.devices()[:1])
  np.testing.assert_allclose(sharded['sublayer_var'], single['sublayer_var'], rtol=1e-4)


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


@pytest.mark.parametrize('name, args, message', [
    ('grad_norms', ['--config.model.d_modle=64'], "config has no field 'model.d_modle'; did you mean model.d_model?"),
    ('lr_sensitivity', ['--placements=', '--qk_placements=', '--fp16_placements='],
     '--placements, --qk_placements and --fp16_placements are all empty; give at least one'),
    ('variance_law', ['extra'], 'unexpected arguments: extra; flags take the form --name=value'),
    ('grad_norms', ['--analyze_only'], '9 run(s) have no metrics.jsonl yet, e.g. '),
    ('lr_sensitivity', ['--lrs=1e-3,abc', '--print'],
     'flag --lrs=1e-3,abc: expected comma-separated positive numbers, e.g. --lrs=0.0001,0.000316'),
    ('lr_sensitivity', ['--depths=4,x', '--print'],
     'flag --depths=4,x: expected comma-separated positive integers, e.g. --depths=4,16'),
    ('fp16_stability', ['--lrs=0.01,-1', '--print'],
     'flag --lrs=0.01,-1: expected comma-separated positive numbers, e.g. --lrs=0.001,0.01'),
    ('fp16_stability', ['--depths=2.5', '--print'],
     'flag --depths=2.5: expected comma-separated positive integers, e.g. --depths=4,16'),
    ('variance_law', ['--scales=1,two', '--print'],
     'flag --scales=1,two: expected comma-separated positive numbers, e.g. --scales=1,2')])
def test_bad_input_to_an_experiment_is_one_line_before_anything_runs(name, args, message, tmp_path):
  result = subprocess.run([sys.executable, '-m', f'experiments.{name}', f'--root={tmp_path}/r', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.stderr.rstrip().splitlines()[-1].startswith(f'experiments.{name}: error: {message}')
  assert not os.path.exists(tmp_path / 'r')


PAPER_RUNS = {'lr_sensitivity': 294, 'variance_law': 6, 'fp16_stability': 24, 'grad_norms': 9, 'pre_post_vs_peri': 6}


@pytest.mark.parametrize('name', [pytest.param(name, marks=() if name == 'lr_sensitivity' else pytest.mark.slow)
                                  for name in PAPER_RUNS])
def test_paper_scale_print_gives_a_400m_grid(name, tmp_path):
  result = subprocess.run([sys.executable, '-m', f'experiments.{name}', f'--config={PAPER}', '--print',
                           f'--root={tmp_path}/r'], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if 'perijax.train' in line]
  assert len(lines) == PAPER_RUNS[name]
  depths = {int(part.split('=')[1]) for line in lines for part in line.split() if 'model.num_layers=' in part}
  assert depths <= {12, 24}   # the 400M shape at half and full depth, never 96 or 192 layers
  assert all('--config=' + PAPER in line and 'perijax.evaluate' in line for line in lines)
  assert not os.path.exists(tmp_path / 'r')


@pytest.mark.slow
def test_lr_sensitivity_end_to_end_on_the_fixture_corpus(corpus_data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.lr_sensitivity', f'--root={tmp_path}/runs', f'--results={tmp_path}/res',
       f'--config.data.data_dir={corpus_data_dir}', '--seeds=1', '--placements=', '--qk_placements=',
       '--fp16_placements=peri', '--lrs=0.001,0.01', '--depths=2', '--config.train.steps=4',
       '--config.train.stats_every=4', '--config.model.d_model=32', '--config.train.seq_len=32'],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((tmp_path / 'res' / 'lr_sensitivity.json').read_text())
  assert [(row['variant'], row['lrs']) for row in data['rows']] == [('peri/float16', [1e-3, 1e-2])]
  assert all(row['sensitivity']['n'] == 1 for row in data['rows'])
  assert (tmp_path / 'res' / 'lr_sensitivity.png').stat().st_size > 0


@pytest.mark.slow
def test_grad_norms_end_to_end_on_the_fixture_corpus(corpus_data_dir, tmp_path):
  """Trains post and peri for a few steps, a process each, then starts again: finished runs are skipped."""
  args = [sys.executable, '-m', 'experiments.grad_norms', f'--root={tmp_path}/runs', f'--results={tmp_path}/res',
          f'--config.data.data_dir={corpus_data_dir}', '--seeds=1', '--placements=post,peri', '--config.train.steps=4',
          '--config.train.log_every=1', '--config.model.d_model=32', '--config.model.num_layers=2',
          '--config.train.seq_len=32']
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((tmp_path / 'res' / 'grad_norms.json').read_text())
  assert [row['placement'] for row in data['placements']] == ['post', 'peri']
  assert all(len(row[label]['profile']) == 2 for row in data['placements'] for label in grad_norms.SNAPSHOTS)
  assert (tmp_path / 'res' / 'grad_norms.png').stat().st_size > 0
  again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count(': skipped') == 2
