"""perijax's zero-shot scores as lm-evaluation-harness (lm-eval) writes them, so lm-eval's tooling reads them.

    path = write(workdir, result, config, split_sizes)
    # WORKDIR/eval/lm_eval/<run>__step_<N>/results_<date>.json

The layout is lm-eval's `EvaluationTracker.save_results_aggregated` (`lm_eval/loggers/evaluation_tracker.py`):
`<output_path>/<model_name_sanitized>/results_<datetime.now().isoformat() with ':' -> '-'>.json`, the model name
being `<run>/step_<N>` ('/' -> '__', as lm-eval's `sanitize_model_name` does). The keys are those of
`lm_eval.evaluator.simple_evaluate`'s return value: `results` (per task `"<metric>,none"`, `"<metric>_stderr,none"`,
`alias`), `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples` (`original`: documents in the split,
`effective`: documents scored), `config`, plus the tracker's model name and times. Each task lists the metrics lm-eval's
own task YAML lists: acc and acc_norm, or only acc for siqa (lm-eval's `social_iqa`) and winogrande.
"""

import datetime
import json
import math
import os
import time

import jax

from perijax import rundir

# perijax task -> (lm-eval task name, version, metrics, dataset_path, dataset_name, split, doc_to_text,
# doc_to_target, doc_to_choice): lm-eval's task YAMLs at 4e7e0d47 (docs/evaluation.md); next_line is perijax's own.
TASKS = {
    'arc_easy': ('arc_easy', 1.0, ('acc', 'acc_norm'), 'allenai/ai2_arc', 'ARC-Easy', 'test',
                 'Question: {{question}}\nAnswer:', '{{choices.label.index(answerKey)}}', '{{choices.text}}'),
    'hellaswag': ('hellaswag', 1.0, ('acc', 'acc_norm'), 'Rowan/hellaswag', None, 'validation',
                  '{{query}}', '{{label}}', 'choices'),
    'piqa': ('piqa', 1.0, ('acc', 'acc_norm'), 'baber/piqa', None, 'validation',
             'Question: {{goal}}\nAnswer:', 'label', '{{[sol1, sol2]}}'),
    'siqa': ('social_iqa', 0.0, ('acc',), 'lighteval/siqa', None, 'validation',
             'Q: {{context}} {{question}}\nA:', '{{ (label|int) - 1 }}', '{{[answerA, answerB, answerC]}}'),
    'winogrande': ('winogrande', 1.0, ('acc',), 'allenai/winogrande', 'winogrande_xl', 'validation',
                   'partial evaluation: the option-filled sentence up to the blank', 'the rest of the sentence',
                   '[option1, option2]'),
    'next_line': ('next_line', 1.0, ('acc', 'acc_norm'), 'shakespeare_milton', None, 'test',
                  'the previous lines of a play or poem', 'the true next line', 'four lines of the same work'),
}


def accuracy_stderr(acc, n):
  """lm-eval's standard error of acc over n documents; "N/A" for one document, as lm-eval writes it.

  lm-eval `lm_eval/api/metrics.py` mean_stderr(scores) = sample_stddev(scores) / sqrt(n), the sample standard deviation
  with n - 1 in its denominator. For n scores of 0 or 1 with mean acc that is sqrt(acc (1 - acc) / (n - 1)).
  """
  if n < 2:
    return 'N/A'
  return math.sqrt(max(acc * (1.0 - acc), 0.0) / (n - 1))


def task_config(name, max_examples):
  lm_eval_name, version, metrics, path, dataset_name, split, text, target, choice = TASKS[name]
  return {
      'task': lm_eval_name, 'dataset_path': path, 'dataset_name': dataset_name,
      ('test_split' if split == 'test' else 'validation_split'): split,
      'doc_to_text': text, 'doc_to_target': target, 'doc_to_choice': choice, 'description': '',
      'target_delimiter': ' ', 'fewshot_delimiter': '\n\n', 'num_fewshot': 0, 'output_type': 'multiple_choice',
      'metric_list': [{'metric': metric, 'aggregation': 'mean', 'higher_is_better': True} for metric in metrics],
      'repeats': 1, 'should_decontaminate': False,
      'metadata': {'version': version, 'scored_by': 'perijax (perijax/tasks, docs/evaluation.md)',
                   'limit': max_examples or None},
  }


def results_file(workdir, result, config, split_sizes, model_name=None):
  """The dict lm-eval would write for `result` (evaluation's step_N.json dict) and return its model name."""
  model_name = model_name or f'{os.path.basename(os.path.abspath(workdir))}/step_{result["step"]}'
  results, configs, versions, higher, samples = {}, {}, {}, {}, {}
  for name, scores in result['tasks'].items():
    lm_eval_name, version, metrics = TASKS[name][:3]
    entry = {'alias': lm_eval_name}
    for metric in metrics:
      entry[f'{metric},none'] = scores[metric]
      entry[f'{metric}_stderr,none'] = accuracy_stderr(scores[metric], scores['n'])
    results[lm_eval_name] = entry
    configs[lm_eval_name] = task_config(name, config.eval.max_examples)
    versions[lm_eval_name] = version
    higher[lm_eval_name] = {metric: True for metric in metrics}
    samples[lm_eval_name] = {'original': split_sizes.get(name, scores['n']), 'effective': scores['n']}
  end = time.time()
  start = end - float(result.get('eval_seconds', 0.0))
  return {
      'results': results, 'group_subtasks': {task: [] for task in results}, 'configs': configs,
      'versions': versions, 'n-shot': {task: 0 for task in results}, 'higher_is_better': higher,
      'n-samples': samples,
      'config': {'model': 'perijax', 'model_args': f'workdir={workdir},step={result["step"]}',
                 'batch_size': config.eval.batch_size, 'batch_sizes': [], 'device': jax.default_backend(),
                 'use_cache': None, 'limit': config.eval.max_examples or None, 'bootstrap_iters': 100000,
                 'gen_kwargs': None, 'random_seed': 0, 'numpy_seed': 1234, 'torch_seed': 1234, 'fewshot_seed': 1234},
      'git_hash': None, 'date': start, 'task_hashes': {},
      'model_source': 'perijax', 'model_name': model_name, 'model_name_sanitized': model_name.replace('/', '__'),
      'system_instruction': None, 'system_instruction_sha': None, 'fewshot_as_multiturn': False,
      'chat_template': None, 'chat_template_sha': None,
      'start_time': start, 'end_time': end, 'total_evaluation_time_seconds': str(end - start),
      'perijax': {'step': result['step'], 'loss': result.get('loss'), 'perplexity': result.get('perplexity'),
                  'bits_per_byte': result.get('bits_per_byte'),
                  'packed_scoring': config.eval.get('packed_scoring', True)},
  }


def write(workdir, result, config, split_sizes):
  """WORKDIR/eval/lm_eval/<run>__step_<N>/results_<date>.json (written whole, then renamed); returns its path.
  Through `perijax.rundir`, so an object-store workdir (gs://) works as for eval/step_N.json."""
  contents = results_file(workdir, result, config, split_sizes)
  directory = rundir.eval_dir(workdir) / 'lm_eval' / contents['model_name_sanitized']
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f'results_{datetime.datetime.now().isoformat().replace(":", "-")}.json'
  temporary = directory / (path.name + '.tmp')
  temporary.write_text(json.dumps(contents, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')
  temporary.replace(path)
  return str(path)
