"""lm-evaluation-harness's results file: its keys and layout, and standard errors by lm-eval's formula."""

import datetime
import json
import math
import os

import numpy as np
import pytest

from configs import default
from perijax.tasks import lm_eval_results
from perijax.tasks import scoring
from perijax.tasks.scoring import MultipleChoiceItem


class ByteTokenizer:
  eos_id = 1

  def encode(self, text):
    return [byte + 2 for byte in text.encode('utf-8')]


def uniform_model(inputs, positions, segment_ids):
  return np.full(inputs.shape + (258,), -math.log(258), np.float32)


def known_task():
  """Five documents scored by a model that ties every choice: lm-eval's argmax picks choice 0, right for the gold-0
  documents only -> acc = acc_norm = 3/5, the per-document scores being [1, 1, 1, 0, 0]."""
  items = [MultipleChoiceItem(requests=tuple(('Q:', ' ' + c) for c in 'abc'), choice_texts=tuple('abc'), gold=gold)
           for gold in (0, 0, 0, 1, 2)]
  return scoring.score_multiple_choice(items, ByteTokenizer(), uniform_model, batch_size=4, seq_len=16)


def test_stderr_is_the_sample_standard_deviation_over_root_n():
  scores = known_task()
  assert scores == {'acc': pytest.approx(0.6), 'acc_norm': pytest.approx(0.6), 'n': 5}
  # By hand: mean 0.6, squared deviations 3 x 0.16 + 2 x 0.36 = 1.2, sample variance 1.2 / 4 = 0.3,
  # stderr sqrt(0.3) / sqrt(5) = sqrt(0.06) = 0.244949 (lm-eval's mean_stderr; NumPy's ddof=1 agrees).
  assert lm_eval_results.accuracy_stderr(scores['acc'], 5) == pytest.approx(math.sqrt(0.06), rel=1e-12)
  assert math.sqrt(0.06) == pytest.approx(np.std([1, 1, 1, 0, 0], ddof=1) / math.sqrt(5), rel=1e-12)
  for n in (2, 7, 100):
    for correct in (0, 1, n // 2, n):
      values = [1.0] * correct + [0.0] * (n - correct)
      assert lm_eval_results.accuracy_stderr(correct / n, n) == pytest.approx(
          np.std(values, ddof=1) / math.sqrt(n), rel=1e-9, abs=1e-15)
  assert lm_eval_results.accuracy_stderr(1.0, 1) == 'N/A'  # lm-eval writes "N/A" for a single document


def test_results_file_has_lm_eval_keys_layout_and_numbers(tmp_path):
  config = default.get_config()
  config.eval.update(max_examples=5, batch_size=4)
  scores = known_task()
  result = {'step': 7, 'loss': 2.5, 'perplexity': math.exp(2.5), 'bits_per_byte': 1.0, 'eval_seconds': 3.0,
            'tasks': {'arc_easy': scores, 'siqa': dict(scores), 'next_line': {'acc': 1.0, 'acc_norm': 0.0, 'n': 1}}}
  workdir = tmp_path / 'peri_run'
  path = lm_eval_results.write(str(workdir), result, config, {'arc_easy': 2376, 'siqa': 1954})
  # lm-eval's layout: <output>/<model name, '/' -> '__'>/results_<isoformat, ':' -> '-'>.json
  directory, name = os.path.split(path)
  assert directory == str(workdir / 'eval' / 'lm_eval' / 'peri_run__step_7')
  assert name.startswith('results_') and name.endswith('.json') and ':' not in name
  stamp = name[len('results_'):-len('.json')]
  date, time_of_day = stamp.split('T')
  datetime.datetime.fromisoformat(date + 'T' + time_of_day.replace('-', ':'))
  assert os.listdir(directory) == [name]  # no temporary file left behind
  with open(path) as f:
    written = json.load(f)
  assert {'results', 'configs', 'versions', 'n-shot', 'higher_is_better', 'n-samples', 'config', 'date',
          'model_name', 'model_name_sanitized', 'total_evaluation_time_seconds'} <= set(written)
  stderr = math.sqrt(0.06)
  assert written['results']['arc_easy'] == {'alias': 'arc_easy', 'acc,none': pytest.approx(0.6),
                                            'acc_stderr,none': pytest.approx(stderr),
                                            'acc_norm,none': pytest.approx(0.6),
                                            'acc_norm_stderr,none': pytest.approx(stderr)}
  # SIQA is lm-eval's `social_iqa`, which reports acc only (so does winogrande).
  assert written['results']['social_iqa'] == {'alias': 'social_iqa', 'acc,none': pytest.approx(0.6),
                                              'acc_stderr,none': pytest.approx(stderr)}
  assert written['results']['next_line']['acc_stderr,none'] == 'N/A'
  assert written['n-samples'] == {'arc_easy': {'original': 2376, 'effective': 5},
                                  'social_iqa': {'original': 1954, 'effective': 5},
                                  'next_line': {'original': 1, 'effective': 1}}
  assert written['versions'] == {'arc_easy': 1.0, 'social_iqa': 0.0, 'next_line': 1.0}
  assert written['n-shot'] == {'arc_easy': 0, 'social_iqa': 0, 'next_line': 0}
  assert written['configs']['arc_easy']['test_split'] == 'test'
  assert written['configs']['social_iqa']['validation_split'] == 'validation'
  assert [m['metric'] for m in written['configs']['social_iqa']['metric_list']] == ['acc']
  assert written['config']['limit'] == 5 and written['config']['batch_size'] == 4
  assert written['model_name'] == 'peri_run/step_7' and written['perijax']['loss'] == 2.5
  assert float(written['total_evaluation_time_seconds']) == pytest.approx(3.0)
