"""Zero-shot multiple-choice evaluation, scored as EleutherAI's lm-evaluation-harness scores it.

    items = load_task_items(name, config.eval, config.data)     # checked before any model runs
    score_multiple_choice(items, tokenizer, logprobs_fn, batch_size=config.eval.batch_size,
                          seq_len=config.train.seq_len)          # {'acc': 0.41, 'acc_norm': 0.43, 'n': 200}

Tasks: the paper's five benchmarks (`paper_tasks.py`; data through TFDS, HellaSwag and SIQA through `builders.py`)
and `next_line` on the embedded corpus (`next_line.py`). Scoring is `scoring.py`. lm-eval reports only `acc` for
siqa and winogrande; `acc_norm` is still given for them, by lm-eval's own definition.
"""

from typing import Sequence

from perijax.tasks import paper_tasks
from perijax.tasks import next_line
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
    raise ValueError(f'unknown task(s) {", ".join(repr(name) for name in unknown)}; '
                     f'known tasks: {", ".join(TASK_NAMES)}')
  if len(set(names)) != len(names):
    raise ValueError(f'tasks repeated in {list(names)}')
  return tuple(names)


def _task_documents(name: str, eval_config, data_config):
  """(documents of the task's evaluated split, the function that turns one into an item), for the five benchmarks."""
  tasks_data_dir = eval_config.tasks_data_dir or data_config.data_dir
  if name == 'arc_easy':
    return paper_tasks.read_arc_easy(tasks_data_dir), paper_tasks.arc_item
  if name == 'hellaswag':
    return paper_tasks.read_hellaswag(tasks_data_dir, eval_config.hellaswag_path), paper_tasks.hellaswag_item
  if name == 'piqa':
    return paper_tasks.read_piqa(tasks_data_dir), paper_tasks.piqa_item
  if name == 'siqa':
    return paper_tasks.read_siqa(tasks_data_dir, eval_config.siqa_path), paper_tasks.siqa_item
  if name == 'winogrande':
    return paper_tasks.read_winogrande(tasks_data_dir), paper_tasks.winogrande_item
  raise ValueError(f'unknown task {name!r}; known tasks: {", ".join(TASK_NAMES)}')


def load_task_items(name: str, eval_config, data_config) -> list[MultipleChoiceItem]:
  """One task's items, the first config.eval.max_examples of its evaluated split (0 = all)."""
  max_examples = int(eval_config.max_examples)
  if max_examples < 0:
    raise ValueError(f'config.eval.max_examples must be >= 0 (0 = all), got {max_examples}')
  if name == 'next_line':
    return next_line.next_line_items(data_config.data_dir, max_examples)
  docs, item_fn = _task_documents(name, eval_config, data_config)
  return paper_tasks.take_items(name, docs, item_fn, max_examples)


def split_size(name: str, eval_config, data_config) -> int:
  """Documents in the task's whole evaluated split (lm-eval's n-samples "original"; max_examples may score fewer)."""
  if name == 'next_line':
    return len(next_line.next_line_items(data_config.data_dir, 0))
  return len(_task_documents(name, eval_config, data_config)[0])


__all__ = ['TASK_NAMES', 'MultipleChoiceItem', 'load_task_items', 'loglikelihoods',
           'score_multiple_choice', 'split_size', 'validate_task_names']
