"""`next_line`: an in-domain multiple-choice task built from the embedded corpus's test split, so the default
(Shakespeare and Milton) gets an accuracy table like the paper's benchmarks, scored the same lm-eval way.

Given up to CONTEXT_LINES lines of a play or poem (at most MAX_CONTEXT_CHARS, joined by "\\n"), choose the true next
line among four lines of the same work. Items come from the data alone (no model, seq_len or tokenizer): each work's
non-blank lines in order, cut into windows of CONTEXT_LINES + 1; three distinct distractors of at most MAX_LINE_CHARS
drawn near the true line's length, by a Generator seeded from the work and the line. A choice's continuation is
"\\n" + line (the text's own line break; lm-eval's " " would be out of place in verse); acc_norm divides by the line's
length. Works are interleaved, so the first config.eval.max_examples items span the corpus. Chance is 25%.
"""

import collections
import hashlib
import itertools
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
  """Each work's non-blank lines in order (passages by `passage_index`; trailing blanks removed, indentation kept)."""
  passages = collections.defaultdict(list)
  for example in examples:
    passages[as_text(example['work'])].append((int(example['passage_index']), as_text(example['text'])))
  def in_order(work_passages):   # by passage_index only: equal indices keep their input order
    return [text for _, text in sorted(work_passages, key=lambda passage: passage[0])]
  return {work: [line.rstrip() for text in in_order(work_passages) for line in text.split('\n') if line.strip()]
          for work, work_passages in passages.items()}


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
    seed = hashlib.sha256(f'{work}:{target}'.encode('utf-8')).digest()[:8]  # not hash(): it is salted per process
    rng = np.random.default_rng(int.from_bytes(seed, 'little'))
    # Distractors of about the true line's length: otherwise a model that only counts tokens (constant logits pick
    # the shortest choice) beats chance.
    nearest = sorted((line for line in pool if line != true_line),
                     key=lambda line: abs(len(line) - len(true_line)))[:DISTRACTOR_POOL]
    choices = [nearest[index] for index in rng.choice(len(nearest), size=NUM_CHOICES - 1, replace=False)]
    gold = int(rng.integers(NUM_CHOICES))
    choices.insert(gold, true_line)
    items.append(MultipleChoiceItem(requests=tuple(('\n'.join(context_lines), '\n' + choice) for choice in choices),
                                    choice_texts=tuple(choices), gold=gold))
  return items


def build_items(examples: Iterable[dict]) -> list[MultipleChoiceItem]:
  """All items of the corpus split, works interleaved in name order."""
  per_work = [work_items(work, lines) for work, lines in sorted(work_lines(examples).items())]
  return [item for rank in itertools.zip_longest(*per_work) for item in rank if item is not None]


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
