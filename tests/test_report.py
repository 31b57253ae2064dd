"""perijax.report on small recorded workdirs (written here; no training): tables, fits, Table 1, plots, CLI."""

import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from perijax import growth
from perijax import report as report_lib
from perijax import runs as runs_lib
from perijax import tables

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_LAYERS = 4
STEPS = 40
# Per (placement, seed): the final training loss and the eval task accuracies, so group stats have known answers.
FINAL_LOSS = {('pre', 0): 3.0, ('pre', 1): 3.4, ('pre', 2): float('nan'), ('peri', 0): 2.9, ('peri', 1): 3.1,
              ('peri', 2): 3.2}
ACC = {('pre', 0): 0.30, ('pre', 1): 0.34, ('pre', 2): 0.25, ('peri', 0): 0.40, ('peri', 1): 0.41, ('peri', 2): 0.45}


def residual_var(placement, step):
  layers = np.arange(1, NUM_LAYERS + 1)
  if placement == 'peri':
    return list(1.0 + 0.5 * layers)                      # linear in depth, constant over training
  return list(0.1 * np.exp((0.3 + step / 100) * layers))  # exponential, steeper as training goes on


def increments(layer):
  """(Var(Δ), Cov(x, Δ)) of the attention and the MLP sub-layer of a layer (1-based), a known answer per layer."""
  return {'attn': (0.5 * layer, -0.1 * layer), 'mlp': (1.5 * layer, 0.2)}


def massive(placement, layer, where):
  """Pre-LN: from layer 3 on, the stream holds one massive value at the first token (the document boundary, id 1),
  channel 5; its sub-layer outputs and every Peri-LN tensor stay small."""
  big = placement == 'pre' and layer >= 3 and where == 'residual'
  value = 500.0 * layer if big else 5.0
  return {'abs': [value, 2.0], 'median': 0.1, 'ratio': [value / 0.1, 20.0], 'token': [1, 40], 'position': [0, 7],
          'channel': [5, 9]}


def write_run(workdir, placement, seed):
  (workdir / 'eval').mkdir(parents=True)
  (workdir / 'tokenizer.json').write_text(json.dumps({'name': 'byte', 'vocab_size': 258, 'pad_id': 0, 'eos_id': 1}))
  (workdir / 'config.json').write_text(json.dumps(
      {'model': {'norm': {'placement': placement}, 'num_layers': NUM_LAYERS},
       'train': {'steps': STEPS, 'seed': seed}}))
  lines = []
  for step in range(0, STEPS + 1, 10):
    loss = 5.0 - (5.0 - FINAL_LOSS[placement, seed]) * step / STEPS
    line = {'step': step, 'loss': loss, 'lr': 1e-3, 'grad_norm': 1.0, 'loss_scale': 2.0 ** (16 - seed),
            'skipped_steps': seed, 'spike': False, 'spikes': seed + (placement == 'pre'), 'forward_overflows': 0,
            'layer_grad_norm': [1.0, 0.8, 0.6, 0.4]}
    if step % 20 == 0:
      variance = residual_var(placement, step)
      line.update(residual_var=variance, max_abs=[30 * math.sqrt(v) for v in variance],
                  fp16_headroom=[30 * math.sqrt(v) / 65504 for v in variance],
                  fp16_overflow=[0, 0, 0, 2 if placement == 'pre' else 0])
      for sublayer in ('attn', 'mlp'):
        terms = [increments(layer)[sublayer] for layer in range(1, NUM_LAYERS + 1)]
        line.update({f'{sublayer}_delta_var': [d for d, _ in terms], f'{sublayer}_cross_cov': [c for _, c in terms],
                     f'{sublayer}_increment_var': [d + 2 * c for d, c in terms]})
      for where in ('residual', 'attn_out', 'mlp_out'):
        line[f'massive_{where}'] = [massive(placement, layer, where) for layer in range(1, NUM_LAYERS + 1)]
    lines.append(json.dumps(line))
  if (placement, seed) == ('pre', 1):   # resumed from step 20: steps 30 and 40 logged again, the later lines win
    lines.insert(3, json.dumps({'step': 30, 'loss': 99.0}))   # the first attempt's step 30
    lines.append('{"step": 50, "loss": 1.0, "truncat')   # and killed mid-write
  (workdir / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')
  (workdir / 'eval' / f'step_{STEPS}.json').write_text(json.dumps(
      {'step': STEPS, 'loss': FINAL_LOSS[placement, seed] + 0.5,
       'tasks': {'next_line': {'acc': ACC[placement, seed], 'acc_norm': ACC[placement, seed] + 0.1, 'n': 100},
                 'winogrande': {'acc': 0.5, 'n': 40}}}))


@pytest.fixture(scope='module')
def sweep_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('sweep')
  names = []
  for placement in ('pre', 'peri'):
    for seed in range(3):
      names.append(f'placement={placement},seed={seed}')
      write_run(root / names[-1], placement, seed)
  (root / 'sweep.json').write_text(json.dumps({'runs': [{'name': n} for n in names]}))
  return root


@pytest.fixture(scope='module')
def runs(sweep_root):
  return runs_lib.load_runs([str(sweep_root)])


def test_sweep_root_expands_to_its_runs_and_single_workdirs_work_too(sweep_root, runs):
  assert [r.name for r in runs] == [f'placement={p},seed={s}' for p in ('pre', 'peri') for s in range(3)]
  single = runs_lib.load_runs([str(sweep_root / 'placement=peri,seed=0')])
  assert [r.name for r in single] == ['placement=peri,seed=0']


def test_sweep_root_lists_its_grid_first_then_other_runs(tmp_path):
  for name in ('a', 'b', 'c'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'metrics.jsonl').write_text('{"step": 0, "loss": 1.0}\n')
  (tmp_path / 'not_a_run').mkdir()
  (tmp_path / 'sweep.json').write_text(json.dumps({'runs': [{'name': 'c'}, {'name': 'b'}, {'name': 'unstarted'}]}))
  found = runs_lib.find_workdirs([str(tmp_path)])
  assert [pathlib.Path(p).name for p in found] == ['c', 'b', 'a']


def test_a_path_that_is_not_a_run_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    runs_lib.find_workdirs([str(tmp_path / 'missing')])
  with pytest.raises(FileNotFoundError, match='expected a run workdir or a sweep root'):
    runs_lib.find_workdirs([str(tmp_path)])


def test_resumed_duplicates_keep_the_later_line_and_a_torn_line_is_skipped(runs):
  resumed = runs[1]
  assert [line['step'] for line in resumed.metrics] == [0, 10, 20, 30, 40]
  assert resumed.metrics[3]['loss'] == pytest.approx(5.0 - 1.6 * 30 / 40)


def test_layer_table_shows_first_and_last_stats_steps_layer_by_run(runs):
  text = tables.layer_tables(runs[:1] + runs[3:4])
  variance_block = text.split('residual variance')[1].split('max |x|')[0]
  rows = {line.split()[0]: line.split() for line in variance_block.strip().splitlines()[3:]}
  assert '#1 = placement=pre,seed=0' in text and '#2 = placement=peri,seed=0' in text
  assert 'step 0' in variance_block and 'step 40' in variance_block
  # Layer 4: pre at step 0 and 40, then peri at step 0 and 40.
  expected = [residual_var('pre', 0)[3], residual_var('pre', 40)[3], residual_var('peri', 0)[3],
              residual_var('peri', 40)[3]]
  assert [float(v) for v in rows['4'][1:]] == pytest.approx(expected, rel=1e-3)
  headroom_block = text.split('float16 headroom')[1]
  assert f'{30 * math.sqrt(residual_var("pre", 40)[3]) / 65504:.2e}' in headroom_block


def test_requested_steps_use_the_last_stats_at_or_before_each(runs):
  chosen = runs_lib.chosen_stats(runs[0], [10, 39, 1000])
  assert [line['step'] for line in chosen] == [0, 20, 40]
  assert runs_lib.chosen_stats(runs[0], [-5]) == [None]


def test_growth_fit_per_run_matches_the_pure_fit(runs):
  fits = report_lib.growth_fits(runs[0])
  assert [f['step'] for f in fits] == [0, 40]
  reference = growth.fit_growth(residual_var('pre', 40)).to_dict()
  assert fits[1] == {'step': 40, **reference}
  assert fits[1]['verdict'] == 'exponential'
  assert fits[1]['laws']['exponential']['params'] == pytest.approx({'a': 0.1, 'r': 0.7})
  peri_fit = report_lib.growth_fits(runs[3])[1]
  assert peri_fit['verdict'] == 'linear' and peri_fit['laws']['linear']['params'] == pytest.approx({'a': 1, 'b': 0.5})


def test_growth_fit_across_seeds_uses_every_seed_of_a_configuration(runs):
  fits = report_lib.group_growth_fits(runs[3:])   # peri, seeds 0-2
  assert [f['steps'] for f in fits] == [[0, 0, 0], [40, 40, 40]]
  reference = growth.fit_growth([residual_var('peri', 40)] * 3).to_dict()
  assert fits[1] == {'steps': [40, 40, 40], **reference} and reference['num_seeds'] == 3


def table_cells(table):
  """{(run, step): {header: cell}} of a table cut into blocks that each repeat the run and step columns."""
  cells = {}
  for block in table.split('\n\n'):
    header, _, *rows = block.splitlines()
    names = re.split(r'\s{2,}', header.strip())
    for row in rows:
      values = re.split(r'\s{2,}', row.strip())
      cells.setdefault(tuple(values[:2]), {}).update(zip(names[2:], values[2:]))
  return cells


def test_growth_table_shows_each_law_its_delta_aic_and_the_verdict(runs):
  cells = table_cells(report_lib.growth_table(runs[:1] + runs[3:]))
  pre_last = cells['placement=pre,seed=0', '40']
  fit = growth.fit_growth(residual_var('pre', 40))
  assert pre_last['verdict'] == 'exponential' and pre_last['ΔAIC exp'] == '0.0'
  assert float(pre_last['ΔAIC lin']) == pytest.approx(fit.laws['linear'].delta_aic, abs=0.06)
  assert float(pre_last['ΔAIC pow']) == pytest.approx(fit.laws['power'].delta_aic, abs=0.06)
  assert pre_last['exponential'] == '0.1·e^(0.7·l)'
  assert float(pre_last['Var L/Var 1']) == pytest.approx(math.exp(0.7 * 3), rel=1e-3)
  peri_seeds = cells['placement=peri (3 seeds)', '40']
  assert peri_seeds['verdict'] == 'linear' and peri_seeds['linear'] == '1 + 0.5·l' and peri_seeds['layers'] == '4'
  tied = report_lib._growth_row('flat', '0', growth.fit_growth([2.0] * 4).to_dict())
  assert tied[3] == 'inconclusive (linear, power, exponential)'
  unfit = report_lib._growth_row('diverged', '0', growth.fit_growth([1.0, math.inf, 2.0]).to_dict())
  assert unfit[3] == '- (1 non-finite value(s) (overflow or divergence); no fit)'


def test_run_summary_counts_and_divergence_rule(runs, tmp_path):
  healthy = report_lib.summarize_run(runs[0])
  assert healthy['final_loss'] == pytest.approx(3.0)
  assert healthy['diverged'] is False and healthy['finished'] is True
  assert healthy['spikes'] == 1 and healthy['skipped_steps'] == 0
  assert healthy['fp16_overflows'] == 2 * 3          # 2 per stats line at steps 0, 20, 40
  assert healthy['eval_loss'] == pytest.approx(3.5)
  assert healthy['avg'] == pytest.approx((0.40 + 0.5) / 2)       # acc_norm where reported, acc for winogrande
  assert healthy['avg_acc'] == pytest.approx((0.30 + 0.5) / 2)
  assert report_lib.summarize_run(runs[2])['diverged'] is True   # final loss NaN

  def record(losses, planned):
    metrics = [{'step': 10 * i, 'loss': loss} for i, loss in enumerate(losses)]
    return runs_lib.RunRecord('r', str(tmp_path), {'train': {'steps': planned}}, metrics, {})

  # perijax/instability.py's rule (tested there on curves of known answer): any non-finite loss, or a smoothed loss
  # held above its running minimum; not "final above first".
  assert report_lib.summarize_run(record([5.0, math.inf, 4.0], planned=20))['diverged'] is True   # non-finite
  assert report_lib.summarize_run(record([5.0, 6.0, 5.5], planned=20))['diverged'] is False   # too short
  assert report_lib.summarize_run(record([5.0, 2.0] + [4.9] * 8, planned=100))['diverged'] is True   # lost it
  assert report_lib.summarize_run(record([5.0, 4.0], planned=100))['diverged'] is False   # still running


def test_avg_and_table1_take_each_task_s_metrics_as_lm_eval_reports_them(tmp_path):
  # perijax scores acc_norm for every task; lm-eval reports it for piqa but not for winogrande or siqa.
  tasks = {'piqa': {'acc': 0.60, 'acc_norm': 0.62, 'n': 10}, 'winogrande': {'acc': 0.52, 'acc_norm': 0.40, 'n': 10},
           'siqa': {'acc': 0.40, 'acc_norm': 0.30, 'n': 10}}
  record = runs_lib.RunRecord('r', str(tmp_path), {'train': {'steps': 10}}, [{'step': 10, 'loss': 2.0}],
                              {10: {'step': 10, 'loss': 2.5, 'tasks': tasks}})
  summary = report_lib.summarize_run(record)
  assert summary['avg'] == pytest.approx(np.mean([0.62, 0.52, 0.40]))
  assert summary['avg_acc'] == pytest.approx(np.mean([0.60, 0.52, 0.40]))
  assert summary['tasks'] == {'piqa': {'acc': 0.60, 'acc_norm': 0.62}, 'winogrande': {'acc': 0.52},
                              'siqa': {'acc': 0.40}}
  rows = report_lib.aggregate(report_lib.group_runs([record]))
  assert sorted(key for key in rows[0]['columns'] if '/' in key) == ['piqa/acc', 'piqa/acc_norm', 'siqa/acc',
                                                                     'winogrande/acc']
  assert rows[0]['columns']['avg']['mean'] == pytest.approx(np.mean([0.62, 0.52, 0.40]))
  headers = report_lib.table1(rows).splitlines()[2].split()
  assert [h for h in headers if '/' in h] == ['piqa/acc', 'piqa/acc_norm', 'siqa/acc', 'winogrande/acc']


def test_a_nan_headroom_is_an_overflow_whatever_its_position(tmp_path):
  # NaN comes from inf - inf: no headroom, whether it is first or not (Python's max() keeps it only when first).
  for headroom in ([math.nan, 1e-3, 2e-3], [1e-3, math.nan, 2e-3]):
    record = runs_lib.RunRecord('r', str(tmp_path), {'train': {'steps': 10}},
                                [{'step': 0, 'loss': 5.0, 'fp16_headroom': headroom}, {'step': 10, 'loss': 4.0}], {})
    assert report_lib.summarize_run(record)['max_fp16_headroom'] == math.inf


def test_seeds_are_grouped_and_mean_std_match_numpy(runs):
  groups = report_lib.group_runs(runs)
  assert [(label, len(members)) for label, members in groups] == [('placement=pre', 3), ('placement=peri', 3)]
  rows = report_lib.aggregate(groups)
  pre, peri = rows
  peri_losses = [FINAL_LOSS['peri', s] for s in range(3)]
  assert peri['columns']['final_loss']['mean'] == pytest.approx(np.mean(peri_losses))
  assert peri['columns']['final_loss']['std'] == pytest.approx(np.std(peri_losses, ddof=1))
  # pre seed 2 diverged (NaN): the mean and std are over the two finite seeds, and that is said.
  assert pre['columns']['final_loss']['mean'] == pytest.approx(np.mean([3.0, 3.4]))
  assert pre['columns']['final_loss']['std'] == pytest.approx(np.std([3.0, 3.4], ddof=1))
  assert (pre['columns']['final_loss']['n'], pre['columns']['final_loss']['n_finite']) == (3, 2)
  pre_acc = [ACC['pre', s] for s in range(3)]
  assert pre['columns']['next_line/acc']['mean'] == pytest.approx(np.mean(pre_acc))
  assert pre['columns']['next_line/acc']['std'] == pytest.approx(np.std(pre_acc, ddof=1))
  assert pre['columns']['spikes']['mean'] == pytest.approx(2.0)   # seeds 0..2 plus one each for pre
  assert (pre['diverged'], peri['diverged'], pre['n_seeds']) == (1, 0, 3)

  text = report_lib.table1(rows)
  peri_line = next(line for line in text.splitlines() if line.startswith('placement=peri '))
  assert f'{np.mean(peri_losses):.4g} ± {np.std(peri_losses, ddof=1):.4g}' in peri_line
  pre_line = next(line for line in text.splitlines() if line.startswith('placement=pre ') and '/3' in line)
  assert pre_line.split()[-2:] == ['1/3', '3/3']   # diverged 1/3, finished 3/3
  assert '3.2 ± 0.2828*' in text
  assert 'winogrande/acc_norm' not in text   # no run reports it


def test_runs_without_config_group_by_name_without_seed(tmp_path):
  records = [runs_lib.RunRecord(f'lr=0.001,seed={s}', str(tmp_path), {}, [{'step': 0, 'loss': 1.0 + s}], {})
             for s in range(2)]
  groups = report_lib.group_runs(records)
  assert [(label, len(m)) for label, m in groups] == [('lr=0.001', 2)]


def test_number_format_is_fixed_point_or_scientific():
  assert tables.format_number(1.5) == '1.5'
  assert tables.format_number(12345.6) == '1.23e+04'
  assert tables.format_number(0.00056) == '5.60e-04'
  assert tables.format_number(float('nan')) == 'nan'
  assert tables.format_number(None) == '-'
  assert tables.format_number(7) == '7'


def test_increment_table_shows_each_sub_layer_term(runs):
  text = tables.increment_table(runs[:1])
  lines = text.splitlines()
  assert [re.split(r'\s{2,}', line.strip()) for line in lines if 'ΔVar' in line] == [
      ['attn ΔVar', 'attn Var(Δ)', 'attn 2Cov', 'mlp ΔVar', 'mlp Var(Δ)', 'mlp 2Cov']] * 2   # steps 0 and 40
  row = next(line for line in lines if line.startswith('3 ')).split()
  (attn_delta, attn_cov), (mlp_delta, mlp_cov) = increments(3)['attn'], increments(3)['mlp']
  expected = [attn_delta + 2 * attn_cov, attn_delta, 2 * attn_cov, mlp_delta + 2 * mlp_cov, mlp_delta, 2 * mlp_cov]
  assert row[0] == '3' and [float(v) for v in row[1:7]] == pytest.approx(expected, rel=1e-3)
  old = runs_lib.RunRecord('old', '.', {}, [{'step': 0, 'residual_var': [1.0]}], {})
  assert tables.increment_table([old]).startswith('no increment statistics')


def test_massive_table_marks_massive_layers_and_where_they_sit(runs):
  pre = tables.massive_table(runs[0])
  assert len(pre.split('\n\n')) == 1   # one block: fits a terminal
  rows = {line.split()[0]: line for line in pre.splitlines()[3:]}
  assert 'step 40' in pre.splitlines()[0] and '> 100 and > 1000 x median' in pre.splitlines()[0]
  assert rows['4'].split()[1:4] == ['2000*', '2.00e+04', '0/5']        # 500 x 4 = 20000 x the median 0.1
  assert '0/5 <doc>' in rows['4']
  assert '*' not in rows['2'] and rows['2'].split()[1] == '5'
  assert '*' not in tables.massive_table(runs[3]).split('\n', 1)[1]    # peri: below the title
  pre_summary, peri_summary = tables.massive_summary(runs[0]), tables.massive_summary(runs[3])
  assert pre_summary['residual_layers'] == [3, 4] and pre_summary['attn_out_layers'] == []
  assert pre_summary['channels'] == [5] and pre_summary['massive_entries'] == 2
  assert pre_summary['first_token_share'] == 1.0 and pre_summary['delimiter_share'] == 1.0
  assert peri_summary['residual_layers'] == [] and peri_summary['first_token_share'] is None
  comparison = tables.massive_placements(runs[:1] + runs[3:4])
  assert len(comparison.split('\n\n')) == 1
  pre_row = next(line for line in comparison.splitlines() if line.startswith('placement=pre'))
  assert re.split(r'\s{2,}', pre_row.strip())[1:9] == ['pre', '40', '3-4', 'none', 'none', '5', '100%', '100%']


def test_massive_thresholds_come_from_the_run_config(runs):
  strict = runs_lib.RunRecord('strict', runs[0].workdir, {'train': {'massive_abs_threshold': 1800.0}},
                                     runs[0].metrics, {})
  assert tables.massive_summary(strict)['residual_layers'] == [4]   # 2000 > 1800, 1500 is not


def test_plots_are_valid_pngs(runs, tmp_path):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  from perijax import plots  # pylint: disable=g-import-not-at-top
  paths = plots.write_plots(runs, str(tmp_path / 'plots'))
  assert sorted(pathlib.Path(p).name for p in paths) == [
      'layer_grad_norm.png', 'loss.png', 'loss_scale.png', 'massive_activations.png', 'residual_variance.png',
      'residual_variance_heatmap.png']
  for path in paths:
    assert pathlib.Path(path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_cli_prints_tables_and_writes_json(sweep_root, tmp_path):
  out = tmp_path / 'report.json'
  result = subprocess.run([sys.executable, '-m', 'perijax.report', str(sweep_root), f'--json={out}'],
                          cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
  assert 'Table 1 (quality)' in result.stdout and 'Growth of residual variance' in result.stdout
  data = json.loads(out.read_text())
  assert [r['name'] for r in data['runs']][:2] == ['placement=pre,seed=0', 'placement=pre,seed=1']
  assert data['runs'][0]['growth'][1]['laws']['exponential']['params']['r'] == pytest.approx(0.7)
  assert [(g['group'], g['fits'][1]['verdict']) for g in data['growth_groups']] == [
      ('placement=pre', 'exponential'), ('placement=peri', 'linear')]
  assert data['runs'][0]['layer_stats'][1]['step'] == 40
  assert [row['group'] for row in data['table1']] == ['placement=pre', 'placement=peri']


def test_every_line_is_labelled_and_a_placement_has_one_colour_in_every_figure(runs, tmp_path, monkeypatch):
  import matplotlib.colors  # pylint: disable=g-import-not-at-top
  from perijax import plots  # pylint: disable=g-import-not-at-top
  figures, save = [], plots.save_figure

  def keep_lines(fig, path):
    figures.append((pathlib.Path(path).name, [(line.get_label(), line.get_color()) for ax in fig.axes
                                              for line in ax.get_lines()]))
    return save(fig, path)
  monkeypatch.setattr(plots, 'save_figure', keep_lines)
  plots.write_plots(runs, str(tmp_path / 'plots'))
  by_name = dict(figures)
  assert len(by_name['residual_variance.png']) == 6 * 3   # 6 runs x stats steps 0, 20, 40: all labelled
  for name, lines in figures:
    assert all(not label.startswith('_') for label, _ in lines), name
    for label, color in lines:
      for placement in ('pre', 'peri'):
        if label.startswith(f'placement={placement},') and name != 'residual_variance.png':   # that one: by step
          assert matplotlib.colors.to_hex(color) == plots.PLACEMENT_COLORS[placement], (name, label)
  massive_labels = [label for label, _ in by_name['massive_activations.png']]
  assert 'placement=pre,seed=0 attn_out (step 40)' in massive_labels and 'massive above 1000' in massive_labels


def test_cli_prints_increments_and_massive_activations(sweep_root):
  result = subprocess.run([sys.executable, '-m', 'perijax.report', str(sweep_root / 'placement=pre,seed=0')],
                          cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
  assert 'What drives the growth' in result.stdout and 'attn Var(Δ)' in result.stdout
  assert 'Massive activations' in result.stdout and '0/5 <doc>' in result.stdout
