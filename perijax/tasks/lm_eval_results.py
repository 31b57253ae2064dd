"""perijax's zero-shot scores as lm-evaluation-harness (lm-eval) writes them, so lm-eval's tooling reads them:
WORKDIR/eval/lm_eval/<run>__step_<N>/results_<date>.json.

The layout is lm-eval's `EvaluationTracker.save_results_aggregated` (`lm_eval/loggers/evaluation_tracker.py`):
`<output_path>/<model name, '/' -> '__' (sanitize_model_name)>/results_<datetime.now().isoformat(), ':' -> '-'>.json`.
The keys are those of `lm_eval.evaluator.simple_evaluate`'s return value plus the tracker's model name and times;
each task lists the metrics of lm-eval's own task YAML (acc only for siqa, lm-eval's `social_iqa`, and winogrande).
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


def reported_metrics(task):
  """The metrics lm-eval reports for a perijax task: its task YAML's list (acc_norm only where lm-eval has it); a task
  lm-eval does not know keeps both, as perijax scores them."""
  return TASKS[task][2] if task in TASKS else ('acc', 'acc_norm')


def headline_metric(task):
  """lm-eval's convention for one number per task (Table 1's `avg`): acc_norm where lm-eval reports it, else acc."""
  return 'acc_norm' if 'acc_norm' in reported_metrics(task) else 'acc'


def accuracy_stderr(acc, n):
  """lm-eval's standard error of acc over n documents, "N/A" for one: `lm_eval/api/metrics.py` mean_stderr, the sample
  standard deviation (n - 1 in its denominator) over sqrt(n), for n scores of 0 or 1 sqrt(acc (1 - acc) / (n - 1))."""
  if n < 2:
    return 'N/A'
  return math.sqrt(max(acc * (1.0 - acc), 0.0) / (n - 1))


def results_file(workdir, result, config, split_sizes):
  """The dict lm-eval would write for `result` (evaluation's step_N.json dict)."""
  model_name = f'{os.path.basename(os.path.abspath(workdir))}/step_{result["step"]}'
  results, configs, versions, higher, samples = {}, {}, {}, {}, {}
  for name, scores in result['tasks'].items():
    lm_eval_name, version, metrics, path, dataset_name, split, text, target, choice = TASKS[name]
    results[lm_eval_name] = {'alias': lm_eval_name}
    for metric in metrics:
      results[lm_eval_name] |= {f'{metric},none': scores[metric],
                                f'{metric}_stderr,none': accuracy_stderr(scores[metric], scores['n'])}
    configs[lm_eval_name] = {
        'task': lm_eval_name, 'dataset_path': path, 'dataset_name': dataset_name,
        ('test_split' if split == 'test' else 'validation_split'): split,
        'doc_to_text': text, 'doc_to_target': target, 'doc_to_choice': choice, 'description': '',
        'target_delimiter': ' ', 'fewshot_delimiter': '\n\n', 'num_fewshot': 0, 'output_type': 'multiple_choice',
        'metric_list': [{'metric': metric, 'aggregation': 'mean', 'higher_is_better': True} for metric in metrics],
        'repeats': 1, 'should_decontaminate': False,
        'metadata': {'version': version, 'scored_by': 'perijax (perijax/tasks, docs/evaluation.md)',
                     'limit': config.eval.max_examples or None}}
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
                  'packed_scoring': config.eval.packed_scoring},
  }


def write(workdir, result, config, split_sizes):
  """Writes the results file (whole, then renamed; through `perijax.rundir`, so gs:// works); returns its path."""
  contents = results_file(workdir, result, config, split_sizes)
  directory = rundir.eval_dir(workdir) / 'lm_eval' / contents['model_name_sanitized']
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f'results_{datetime.datetime.now().isoformat().replace(":", "-")}.json'
  temporary = directory / (path.name + '.tmp')
  temporary.write_text(json.dumps(contents, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')
  temporary.replace(path)
  return str(path)
