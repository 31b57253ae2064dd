"""`next_line`: an in-domain multiple-choice task built from the embedded corpus's test split.

Given a passage of a play or poem, choose its true next line among four lines of the same work. It gives the embedded
default (Shakespeare and Milton) an accuracy table like the paper's benchmarks, scored the same lm-eval way.

How items are built, deterministically from the data alone (no model, seq_len or tokenizer enters):
- each work's non-blank lines, in order (passages sorted by `passage_index`, each split into lines, trailing whitespace
  removed, leading indentation kept as the text has it);
- the work's lines are cut into windows of `CONTEXT_LINES + 1` consecutive lines: the last is the true next line, the
  ones before it are the context, dropped from the front until the context is at most `MAX_CONTEXT_CHARS` characters
  (lines are joined with "\\n"; a window whose true line is over `MAX_LINE_CHARS`, or with no context line that fits,
  is skipped);
- three distractors are distinct lines of the same work (at most `MAX_LINE_CHARS` characters) other than the true line,
  drawn among the `DISTRACTOR_POOL` lines closest to it in length (so that length alone does not give the answer
  away), with a numpy Generator seeded by SHA-256 of "work:line index"; the same Generator places the true line among
  the four;
- the continuation of each choice is "\\n" + line (the line break the text itself has there; the target delimiter " "
  of lm-eval's benchmarks would be out of place in verse); acc_norm divides by the line's length without the "\\n";
- works are interleaved (first item of every work in name order, then the second, ...) so that the first N items, as
  config.eval.max_examples takes them, span the corpus.
Chance is 25% (acc and acc_norm alike).
"""

import collections
import hashlib
from typing import Iterable, Sequence

import numpy as np

from perijax.data import corpus  # registers the corpus's TFDS builder, so TFDS knows its name
from perijax.errors import DataError
from perijax.tasks.paper_tasks import as_text, tfds_split
from perijax.tasks.scoring import MultipleChoiceItem

CORPUS_NAME = corpus.DATASET_NAME  # the embedded corpus
CORPUS_SPLIT = 'test'
CONTEXT_LINES = 6        # lines before the true one in each window
MAX_CONTEXT_CHARS = 400  # the context fits a 512-byte sequence with room for the line
MAX_LINE_CHARS = 100     # true lines and distractors: verse lines are far shorter; this skips long prose lines
NUM_CHOICES = 4
DISTRACTOR_POOL = 12     # distractors are drawn among this many lines of the work closest in length to the true one


def work_lines(examples: Iterable[dict]) -> dict[str, list[str]]:
  """Each work's non-blank lines in order, from examples with `text`, `work` and `passage_index`."""
  passages = collections.defaultdict(list)
  for example in examples:
    passages[as_text(example['work'])].append((int(example['passage_index']), as_text(example['text'])))
  lines = {}
  for work, work_passages in passages.items():
    work_passages.sort(key=lambda passage: passage[0])
    lines[work] = [line.rstrip() for _, text in work_passages for line in text.split('\n') if line.strip()]
  return lines


def _rng(work: str, line_index: int) -> np.random.Generator:
  """A Generator that depends only on the work's name and the position (Python's hash() is salted per process)."""
  digest = hashlib.sha256(f'{work}:{line_index}'.encode('utf-8')).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], 'little'))


def work_items(work: str, lines: Sequence[str]) -> list[MultipleChoiceItem]:
  """The items of one work, in the order of their lines."""
  pool = list(dict.fromkeys(line for line in lines if len(line) <= MAX_LINE_CHARS))  # distinct, first-seen order
  if len(pool) < NUM_CHOICES:
    return []
  items = []
  for target in range(CONTEXT_LINES, len(lines), CONTEXT_LINES + 1):
    true_line = lines[target]
    context_lines = list(lines[target - CONTEXT_LINES:target])
    while context_lines and len('\n'.join(context_lines)) > MAX_CONTEXT_CHARS:
      context_lines.pop(0)
    if len(true_line) > MAX_LINE_CHARS or not context_lines:
      continue
    rng = _rng(work, target)
    # Distractors of about the true line's length: otherwise a model that only counts tokens (constant logits pick
    # the shortest choice) beats chance. Drawn among the DISTRACTOR_POOL lines closest in length.
    others = sorted((line for line in pool if line != true_line), key=lambda line: abs(len(line) - len(true_line)))
    nearest = others[:DISTRACTOR_POOL]
    choices = [nearest[index] for index in rng.choice(len(nearest), size=NUM_CHOICES - 1, replace=False)]
    gold = int(rng.integers(NUM_CHOICES))
    choices.insert(gold, true_line)
    context = '\n'.join(context_lines)
    items.append(MultipleChoiceItem(requests=tuple((context, '\n' + choice) for choice in choices),
                                    choice_texts=tuple(choices), gold=gold))
  return items


def build_items(examples: Iterable[dict]) -> list[MultipleChoiceItem]:
  """All items of the corpus split, works interleaved in name order."""
  per_work = [work_items(work, lines) for work, lines in sorted(work_lines(examples).items())]
  interleaved = []
  for rank in range(max((len(items) for items in per_work), default=0)):
    interleaved.extend(items[rank] for items in per_work if rank < len(items))
  return interleaved


def read_corpus_test_split(data_dir: str | None) -> Sequence[dict]:
  """The embedded corpus's test split from its prepared TFDS copy in `data_dir`; never prepares or downloads."""
  return tfds_split('next_line', CORPUS_NAME, CORPUS_SPLIT, data_dir, (
      f"Prepare it with `{corpus.prepare_command(data_dir or '')}` (config.data.data_dir says where it is)."))


def next_line_items(data_dir: str | None, max_examples: int) -> list[MultipleChoiceItem]:
  """The first `max_examples` items (0 = all) of the task."""
  source = read_corpus_test_split(data_dir)
  items = build_items(source[index] for index in range(len(source)))
  if not items:
    raise DataError(f"task 'next_line': the '{CORPUS_NAME}' {CORPUS_SPLIT} split yields no items (each work needs "
                     f'at least {CONTEXT_LINES + 1} non-blank lines and {NUM_CHOICES} distinct lines)')
  return items if max_examples <= 0 else items[:max_examples]
