"""The paper's five zero-shot benchmarks: lm-eval's prompt formats, and readers over TFDS.

Each `*_item(doc)` turns one document, a dict as the dataset holds it, into a `MultipleChoiceItem` with lm-eval's
zero-shot prompt (no description, no few-shot examples, target delimiter " "); the YAML each follows is named beside
it (lm-eval `lm_eval/tasks/...`, snapshot 4e7e0d47). Each `read_*` returns the evaluated split's documents through
`tfds.data_source`, which needs no TensorFlow: ARC-Easy, PIQA and Winogrande as the TFDS catalog has them, HellaSwag and
SIQA from perijax's own builders over the original JSONL files (`perijax/tasks/builders.py`).
"""

import re
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from perijax.tasks import builders
from perijax.tasks.scoring import MultipleChoiceItem

TARGET_DELIMITER = ' '  # lm-eval `lm_eval/config/task.py`: target_delimiter defaults to " "


def as_text(value) -> str:
  """TFDS Text features are bytes from a prepared data source and str under `tfds.testing.mock_data`."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _choices_item(context: str, choices: Sequence[str], gold: int) -> MultipleChoiceItem:
  """lm-eval `lm_eval/api/task.py` construct_requests: one request (context, delimiter + choice) per choice."""
  return MultipleChoiceItem(requests=tuple((context, TARGET_DELIMITER + choice) for choice in choices),
                            choice_texts=tuple(choices), gold=gold)


def arc_item(doc: dict) -> MultipleChoiceItem:
  """lm-eval `arc/arc_easy.yaml`: "Question: {{question}}\\nAnswer:", choices.text, gold = label.index(answerKey).

  TFDS maps ARC's numeric labels "1".."5" to A..E (ClassLabel ints) for both answerKey and the choice labels, so the
  position of answerKey among the choice labels is lm-eval's gold.
  """
  labels = [int(label) for label in doc['choices']['label']]
  answer = int(doc['answerKey'])
  if answer not in labels:
    raise ValueError(f'ARC document {as_text(doc.get("id", "?"))!r}: answerKey {answer} is not among its choice '
                     f'labels {labels}')
  return _choices_item(f'Question: {as_text(doc["question"])}\nAnswer:',
                       [as_text(text) for text in doc['choices']['text']], labels.index(answer))


def hellaswag_preprocess(text: str) -> str:
  """lm-eval `hellaswag/utils.py` preprocess, in order: strip, " [title]" -> ". ", drop "[...]", "  " -> " " once."""
  text = text.strip()
  text = text.replace(' [title]', '. ')
  text = re.sub('\\[.*?\\]', '', text)
  return text.replace('  ', ' ')


def hellaswag_item(doc: dict) -> MultipleChoiceItem:
  """lm-eval `hellaswag/hellaswag.yaml` + `utils.py` process_docs.

  ctx = ctx_a + " " + ctx_b.capitalize() (Python's capitalize also lowercases the rest), query =
  preprocess(activity_label + ": " + ctx), choices = preprocess(ending) each.
  """
  context = as_text(doc['ctx_a']) + ' ' + as_text(doc['ctx_b']).capitalize()
  query = hellaswag_preprocess(as_text(doc['activity_label']) + ': ' + context)
  return _choices_item(query, [hellaswag_preprocess(as_text(ending)) for ending in doc['endings']], int(doc['label']))


def piqa_item(doc: dict) -> MultipleChoiceItem:
  """lm-eval `piqa/piqa.yaml`: "Question: {{goal}}\\nAnswer:", choices [sol1, sol2], gold = label."""
  return _choices_item(f'Question: {as_text(doc["goal"])}\nAnswer:', [as_text(doc['sol1']), as_text(doc['sol2'])],
                       int(doc['label']))


def siqa_item(doc: dict) -> MultipleChoiceItem:
  """lm-eval `siqa/siqa.yaml`: "Q: {{context}} {{question}}\\nA:", choices [answerA, answerB, answerC],
  gold = label - 1 (the original labels are "1".."3"). lm-eval reports `acc` only for this task."""
  return _choices_item(f'Q: {as_text(doc["context"])} {as_text(doc["question"])}\nA:',
                       [as_text(doc['answerA']), as_text(doc['answerB']), as_text(doc['answerC'])],
                       int(as_text(doc['label'])) - 1)


def winogrande_item(doc: dict) -> MultipleChoiceItem:
  """lm-eval `winogrande/default.yaml` + `preprocess_winogrande.py`: partial evaluation.

  Each option fills the blank to make a context, `sentence[:idx] + option`; both are scored on the same continuation,
  " " + the text after the blank, stripped. Gold = TFDS label (ClassLabel ['1', '2'], so 0 means option1). lm-eval
  reports `acc` only; its `choices` (the acc_norm lengths) are the two contexts.
  """
  sentence = as_text(doc['sentence'])
  blank = sentence.index('_')
  suffix = sentence[blank + 1:].strip()
  contexts = [sentence[:blank] + as_text(doc['option1']), sentence[:blank] + as_text(doc['option2'])]
  return MultipleChoiceItem(requests=tuple((context, TARGET_DELIMITER + suffix) for context in contexts),
                            choice_texts=tuple(contexts), gold=int(doc['label']))


def _tfds_split(task: str, name: str, split: str, data_dir: str | None, how_to_prepare: str) -> Sequence[Any]:
  """A prepared TFDS split as a random-access data source; never downloads. One clear error if it is not there."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as error:  # tfds raises several kinds (not found, not prepared, tfrecord format); all mean the same.
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise FileNotFoundError(
        f"task '{task}': TFDS dataset '{name}' split '{split}' is not prepared (in array_record format) under data dir "
        f"{data_dir or '~/tensorflow_datasets (the TFDS default)'}. {how_to_prepare} (TFDS said: {first_line})"
    ) from error


def _prepare_catalog_hint(name: str) -> str:
  return (f"Prepare it on a machine with network access with `tfds.builder('{name}', data_dir=DIR, "
          "file_format='array_record').download_and_prepare()` (or copy a prepared copy), then point "
          'config.eval.tasks_data_dir (or config.data.data_dir) at DIR.')


def read_arc_easy(data_dir: str | None) -> Sequence[dict]:
  """ARC-Easy test split (lm-eval evaluates test): TFDS `ai2_arc/ARC-Easy`."""
  return _tfds_split('arc_easy', 'ai2_arc/ARC-Easy', 'test', data_dir, _prepare_catalog_hint('ai2_arc/ARC-Easy'))


def read_piqa(data_dir: str | None) -> Sequence[dict]:
  """PIQA validation split (no labelled test): TFDS `piqa`."""
  return _tfds_split('piqa', 'piqa', 'validation', data_dir, _prepare_catalog_hint('piqa'))


def read_winogrande(data_dir: str | None) -> Sequence[dict]:
  """Winogrande validation split (the dev set, the same for every size): TFDS `winogrande`."""
  # A legacy TFDS builder: registered only once its module is imported.
  import tensorflow_datasets.text.winogrande  # pylint: disable=g-import-not-at-top,unused-import
  return _tfds_split('winogrande', 'winogrande', 'validation', data_dir, _prepare_catalog_hint('winogrande'))


def read_hellaswag(data_dir: str | None, jsonl_path: str) -> Sequence[dict]:
  """HellaSwag validation from the original `hellaswag_val.jsonl` (TFDS's own HellaSwag drops ctx_a/ctx_b)."""
  return builders.data_source('hellaswag', builders.HellaswagOriginal, jsonl_path, data_dir)


def read_siqa(data_dir: str | None, jsonl_path: str) -> Sequence[dict]:
  """Social IQa validation from the original `dev.jsonl` (+ `dev-labels.lst`); SIQA is not in the TFDS catalog."""
  return builders.data_source('siqa', builders.SiqaOriginal, jsonl_path, data_dir)


def take_items(task: str, docs: Sequence[dict], item_fn, max_examples: int) -> list[MultipleChoiceItem]:
  """The first `max_examples` documents (0 = all) in the data source's order, which is fixed once prepared.

  TFDS's catalog datasets are stored in a hashed order, not the source file's (HellaSwag and SIQA keep the file's), so
  a partial run covers different documents than `lm_eval --limit N`; over the whole split the accuracies agree.
  """
  count = len(docs) if max_examples <= 0 else min(max_examples, len(docs))
  if count == 0:
    raise ValueError(f"task '{task}': the evaluated split has no documents")
  return [item_fn(docs[index]) for index in range(count)]
