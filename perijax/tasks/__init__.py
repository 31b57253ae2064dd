"""Zero-shot multiple-choice evaluation, scored as EleutherAI's lm-evaluation-harness scores it.

    results = evaluate_tasks(config.eval.tasks, tokenizer, logprobs_fn, config.eval, config.data,
                             batch_size=config.eval.batch_size, seq_len=config.train.seq_len)
    # {'next_line': {'acc': 0.41, 'acc_norm': 0.43, 'n': 200}, ...}

Tasks: the paper's five benchmarks (`benchmarks.py`; data through TFDS, HellaSwag and SIQA through `builders.py`)
and `next_line` on the embedded corpus (`next_line.py`). Scoring is `scoring.py`. lm-eval reports only `acc` for
siqa and winogrande; `acc_norm` is still given for them, by lm-eval's own definition.
"""

from typing import Sequence

from perijax.errors import DataError
from perijax.tasks import benchmarks
from perijax.tasks import next_line
from perijax.tasks.scoring import LogprobsFn
from perijax.tasks.scoring import MultipleChoiceItem
from perijax.tasks.scoring import loglikelihoods
from perijax.tasks.scoring import score_multiple_choice

TASK_NAMES = ('next_line', 'arc_easy', 'hellaswag', 'piqa', 'siqa', 'winogrande')


def validate_task_names(names: Sequence[str]) -> tuple[str, ...]:
  """The names as a tuple; ValueError naming any unknown one and listing the known."""
  if isinstance(names, str):
    names = (names,)
  unknown = [name for name in names if name not in TASK_NAMES]
  if unknown:
    raise DataError(f'unknown task(s) {", ".join(repr(name) for name in unknown)}; '
                     f'known tasks: {", ".join(TASK_NAMES)}')
  if len(set(names)) != len(names):
    raise DataError(f'tasks repeated in {list(names)}')
  return tuple(names)


def load_task_items(name: str, eval_config, data_config) -> list[MultipleChoiceItem]:
  """One task's items, the first config.eval.max_examples of its evaluated split (0 = all)."""
  max_examples = int(eval_config.max_examples)
  if max_examples < 0:
    raise DataError(f'config.eval.max_examples must be >= 0 (0 = all), got {max_examples}')
  tasks_data_dir = eval_config.tasks_data_dir or data_config.data_dir
  if name == 'next_line':
    return next_line.next_line_items(data_config.data_dir, max_examples)
  if name == 'arc_easy':
    docs, item_fn = benchmarks.read_arc_easy(tasks_data_dir), benchmarks.arc_item
  elif name == 'hellaswag':
    docs, item_fn = benchmarks.read_hellaswag(tasks_data_dir, eval_config.hellaswag_path), benchmarks.hellaswag_item
  elif name == 'piqa':
    docs, item_fn = benchmarks.read_piqa(tasks_data_dir), benchmarks.piqa_item
  elif name == 'siqa':
    docs, item_fn = benchmarks.read_siqa(tasks_data_dir, eval_config.siqa_path), benchmarks.siqa_item
  elif name == 'winogrande':
    docs, item_fn = benchmarks.read_winogrande(tasks_data_dir), benchmarks.winogrande_item
  else:
    raise DataError(f'unknown task {name!r}; known tasks: {", ".join(TASK_NAMES)}')
  return benchmarks.take_items(name, docs, item_fn, max_examples)


def evaluate_tasks(names: Sequence[str], tokenizer, logprobs_fn: LogprobsFn, eval_config, data_config, *,
                   batch_size: int, seq_len: int) -> dict[str, dict]:
  """`{name: {"acc", "acc_norm", "n"}}` for each task.

  Every task's data is loaded (and checked) before the model runs, so a missing dataset fails in seconds.

  Args:
    names: task names, a subset of TASK_NAMES.
    tokenizer: `encode(text) -> list[int]` without BOS/EOS, and `eos_id` (the beginning-of-sequence token).
    logprobs_fn: `(inputs, positions, segment_ids) [B, T] -> log-softmax [B, T, V]`, called at [batch_size, seq_len].
    eval_config: config.eval (max_examples, tasks_data_dir, hellaswag_path, siqa_path).
    data_config: config.data (data_dir: where the embedded corpus is, and the benchmarks if tasks_data_dir is '').
    batch_size: rows per model call.
    seq_len: tokens per row; longer requests keep their last seq_len + 1 tokens, as lm-eval does.
  """
  names = validate_task_names(names)
  items = {name: load_task_items(name, eval_config, data_config) for name in names}
  return {name: score_multiple_choice(items[name], tokenizer, logprobs_fn, batch_size=batch_size, seq_len=seq_len,
                                     desc=name) for name in names}


__all__ = ['TASK_NAMES', 'MultipleChoiceItem', 'evaluate_tasks', 'load_task_items', 'loglikelihoods',
           'score_multiple_choice', 'validate_task_names']
