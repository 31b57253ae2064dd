"""Zero-shot multiple-choice evaluation, scored as EleutherAI's lm-evaluation-harness scores it.

    items = load_task_items(name, config.eval, config.data)     # checked before any model runs
    scoring.score_multiple_choice(items, tokenizer, logprobs_fn, batch_size=config.eval.batch_size,
                                  seq_len=config.train.seq_len)  # {'acc': 0.41, 'acc_norm': 0.43, 'n': 200}

Tasks: the paper's five benchmarks (`paper_tasks.py`) and `next_line` on the embedded corpus (`next_line.py`), scored
by `scoring.py`; `lm_eval_results.py` writes lm-eval's results file. acc_norm is given for every task, siqa and
winogrande included (lm-eval reports only acc for them), by lm-eval's definition.
"""

from typing import Sequence

from perijax.errors import DataError
from perijax.tasks import next_line
from perijax.tasks import paper_tasks
from perijax.tasks.scoring import MultipleChoiceItem

TASK_NAMES = ('next_line', 'arc_easy', 'hellaswag', 'piqa', 'siqa', 'winogrande')


def validate_task_names(names: Sequence[str]) -> tuple[str, ...]:
  """The names as a tuple; DataError naming any unknown or repeated one."""
  names = (names,) if isinstance(names, str) else tuple(names)
  unknown = [name for name in names if name not in TASK_NAMES]
  if unknown:
    raise DataError(f'unknown task(s) {", ".join(map(repr, unknown))}; known tasks: {", ".join(TASK_NAMES)}')
  if len(set(names)) != len(names):
    raise DataError(f'tasks repeated in {list(names)}')
  return names


def _paper_task_documents(name: str, eval_config, data_config):
  jsonl_path = {'hellaswag': eval_config.hellaswag_path, 'siqa': eval_config.siqa_path}.get(name, '')
  return paper_tasks.read(name, eval_config.tasks_data_dir or data_config.data_dir, jsonl_path)


def load_task_items(name: str, eval_config, data_config) -> list[MultipleChoiceItem]:
  """One task's items, the first config.eval.max_examples of its evaluated split (0 = all)."""
  validate_task_names(name)
  max_examples = int(eval_config.max_examples)
  if max_examples < 0:
    raise DataError(f'config.eval.max_examples must be >= 0 (0 = all), got {max_examples}')
  if name == 'next_line':
    return next_line.next_line_items(data_config.data_dir, max_examples)
  return paper_tasks.take_items(name, _paper_task_documents(name, eval_config, data_config), max_examples)


def split_size(name: str, eval_config, data_config) -> int:
  """Documents in the task's whole evaluated split (lm-eval's n-samples "original"; max_examples may score fewer)."""
  if name == 'next_line':
    return len(next_line.next_line_items(data_config.data_dir, 0))
  return len(_paper_task_documents(name, eval_config, data_config))
