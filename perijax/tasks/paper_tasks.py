"""The paper's five zero-shot benchmarks: where each one's documents come from, and lm-eval's prompt for each.

    docs = read('hellaswag', data_dir, jsonl_path)       # the evaluated split, as a random-access data source
    items = take_items('hellaswag', docs, max_examples)   # lm-eval's zero-shot requests, the first max_examples

Documents come through `tfds.data_source` (no TensorFlow, never downloads): the TFDS catalog's ARC-Easy, PIQA and
Winogrande, and HellaSwag and SIQA prepared from their original JSONL files by the builders below (docs/evaluation.md,
"Where the data comes from", says why). Each `*_item(doc)` is lm-eval's zero-shot prompt, following the task YAML
named beside it (lm-eval `lm_eval/tasks/...`, snapshot 4e7e0d47).
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from perijax.errors import DataError, NotFoundError
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
  """lm-eval `arc/arc_easy.yaml`: "Question: {{question}}\\nAnswer:", choices.text, gold = label.index(answerKey)
  (TFDS maps ARC's labels "1".."5" to A..E in both alike, so the position is lm-eval's)."""
  labels, answer = [int(label) for label in doc['choices']['label']], int(doc['answerKey'])
  if answer not in labels:
    raise DataError(f'ARC document {as_text(doc.get("id", "?"))!r}: answerKey {answer} is not among its choice '
                    f'labels {labels}')
  return _choices_item(f'Question: {as_text(doc["question"])}\nAnswer:',
                       [as_text(text) for text in doc['choices']['text']], labels.index(answer))


def hellaswag_preprocess(text: str) -> str:
  """lm-eval `hellaswag/utils.py` preprocess, in order: strip, " [title]" -> ". ", drop "[...]", "  " -> " " once."""
  return re.sub('\\[.*?\\]', '', text.strip().replace(' [title]', '. ')).replace('  ', ' ')


def hellaswag_item(doc: dict) -> MultipleChoiceItem:
  """lm-eval `hellaswag/hellaswag.yaml` + `utils.py` process_docs: query = preprocess(activity_label + ": " + ctx_a +
  " " + ctx_b.capitalize()) (Python's capitalize also lowercases the rest), choices = preprocess(ending) each."""
  context = as_text(doc['activity_label']) + ': ' + as_text(doc['ctx_a']) + ' ' + as_text(doc['ctx_b']).capitalize()
  endings = [hellaswag_preprocess(as_text(ending)) for ending in doc['endings']]
  return _choices_item(hellaswag_preprocess(context), endings, int(doc['label']))


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
  """lm-eval `winogrande/default.yaml` + `preprocess_winogrande.py`, partial evaluation: each option fills the blank,
  `sentence[:idx] + option`, both contexts scored on " " + the stripped rest; they are also the choices (acc_norm's
  lengths). Gold = TFDS label (ClassLabel ['1', '2']: 0 is option1)."""
  sentence = as_text(doc['sentence'])
  blank = sentence.index('_')
  contexts = tuple(sentence[:blank] + as_text(doc[option]) for option in ('option1', 'option2'))
  return MultipleChoiceItem(requests=tuple((context, TARGET_DELIMITER + sentence[blank + 1:].strip())
                                           for context in contexts), choice_texts=contexts, gold=int(doc['label']))


ITEM = {'arc_easy': arc_item, 'hellaswag': hellaswag_item, 'piqa': piqa_item, 'siqa': siqa_item,
        'winogrande': winogrande_item}


def take_items(task: str, docs: Sequence[dict], max_examples: int) -> list[MultipleChoiceItem]:
  """The items of the first `max_examples` documents (0 = all) in the data source's order: for the catalog datasets a
  hashed one, so not the documents of `lm_eval --limit N` (over the whole split the accuracies agree)."""
  count = len(docs) if max_examples <= 0 else min(max_examples, len(docs))
  if count == 0:
    raise DataError(f"task '{task}': the evaluated split has no documents")
  return [ITEM[task](docs[index]) for index in range(count)]


# task -> (TFDS name, evaluated split); lm-eval evaluates ARC's test split, the others' validation (dev) split.
CATALOG = {'arc_easy': ('ai2_arc/ARC-Easy', 'test'), 'piqa': ('piqa', 'validation'),
           'winogrande': ('winogrande', 'validation')}


def read(task: str, data_dir: str | None, jsonl_path: str = '') -> Sequence[dict]:
  """The documents of `task`'s evaluated split; `jsonl_path` is the original file (hellaswag, siqa), checked and
  prepared into `data_dir` the first time it is read. Catalog datasets must have been prepared (array_record)."""
  if task in ('hellaswag', 'siqa'):
    builder_class = HellaswagOriginal if task == 'hellaswag' else SiqaOriginal
    field, where_to_get = builder_class.CONFIG_FIELD, builder_class.SOURCE
    if not jsonl_path:
      raise NotFoundError(f"task '{task}' reads the original JSONL file, and none is given: set {field} to "
                          f'{where_to_get}')
    if not os.path.isfile(jsonl_path):
      raise NotFoundError(f"task '{task}': {field}={jsonl_path!r} is not a file; it should be {where_to_get}")
    builder = builder_class(source_path=jsonl_path, data_dir=data_dir or None)
    if not builder.is_prepared():
      builder_class.read_source(jsonl_path)  # bad content fails here, before anything is written
      builder.download_and_prepare()
    return builder.as_data_source(split='validation')
  name, split = CATALOG[task]
  if task == 'winogrande':  # a legacy TFDS builder: registered only once its module is imported
    import tensorflow_datasets.text.winogrande  # pylint: disable=g-import-not-at-top,unused-import
  return tfds_split(task, name, split, data_dir, (
      f"Prepare it on a machine with network access with `tfds.builder('{name}', data_dir=DIR, "
      "file_format='array_record').download_and_prepare()` (or copy a prepared copy), then point "
      'config.eval.tasks_data_dir (or config.data.data_dir) at DIR.'))


def tfds_split(task: str, name: str, split: str, data_dir: str | None, how_to_prepare: str) -> Sequence[dict]:
  """A prepared TFDS split as a random-access data source; never downloads. One clear error if it is not there."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as error:  # tfds raises several kinds (not found, not prepared, tfrecord format); all mean the same.
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise NotFoundError(
        f"task '{task}': TFDS dataset '{name}' split '{split}' is not prepared (in array_record format) under data dir "
        f"{data_dir or '~/tensorflow_datasets (the TFDS default)'}. {how_to_prepare} (TFDS said: {first_line})"
    ) from error


@dataclasses.dataclass(eq=False)
class SourceFileConfig(tfds.core.BuilderConfig):
  source_path: str = ''


def siqa_labels_path(jsonl_path: str) -> str:
  """The original release's labels file: `dev.jsonl` -> `dev-labels.lst`."""
  return os.path.splitext(jsonl_path)[0] + '-labels.lst'


def _read_jsonl(path: str, fields: Sequence[str]) -> list[dict]:
  """One JSON object per non-blank line, each with `fields`; DataError naming the line otherwise."""
  docs = []
  with open(path, encoding='utf-8') as file:
    lines = [line for line in file if line.strip()]
  for number, line in enumerate(lines, start=1):
    try:
      docs.append(json.loads(line))
    except json.JSONDecodeError as error:
      raise DataError(f'{path}:{number}: not a JSON object ({error})') from error
    missing = [field for field in fields if field not in docs[-1]]
    if missing:
      raise DataError(f'{path}: document {number} lacks {missing}; each line needs {list(fields)}')
  return docs


class _OriginalJsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepares the validation split (both originals are dev sets), in the file's order, from the file its config names;
  a subclass gives FEATURES, CONFIG_FIELD and SOURCE (where to get the file) and `read_source(path)`, the file's
  examples, checked (DataError naming what is wrong)."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Prepared from the original JSONL release.'}
  FEATURES = {}

  def __init__(self, *, source_path: str = '', **kwargs):
    if source_path:  # else TFDS is rebuilding an unpickled builder from its own (data_dir, config, version)
      digest = hashlib.sha256()  # a config per content (with its labels file, if any): reused only for the same bytes
      for path in (source_path, siqa_labels_path(source_path)):
        if os.path.isfile(path):
          with open(path, 'rb') as file:
            digest.update(file.read())
      kwargs['config'] = SourceFileConfig(name=f'sha256_{digest.hexdigest()[:16]}',
                                          source_path=os.path.abspath(source_path),
                                          description=f'prepared from {os.path.abspath(source_path)}')
    super().__init__(**{'file_format': 'array_record', **kwargs})

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums file to find (nothing is downloaded); TFDS's lookup of it needs the uninstalled importlib_resources.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(self.FEATURES), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # the file is local; nothing is downloaded
    return {'validation': self._generate_examples(self.builder_config.source_path)}

  def _generate_examples(self, path):
    yield from enumerate(self.read_source(path))


class HellaswagOriginal(_OriginalJsonlBuilder):
  """HellaSwag validation from `hellaswag_val.jsonl`, with the fields lm-eval's prompt needs (ctx_a, ctx_b apart)."""
  CONFIG_FIELD = 'config.eval.hellaswag_path'
  SOURCE = 'hellaswag_val.jsonl from https://github.com/rowanz/hellaswag (data/)'
  FEATURES = {'ind': tfds.features.Scalar(dtype=np.int64), 'activity_label': tfds.features.Text(),
              'ctx_a': tfds.features.Text(), 'ctx_b': tfds.features.Text(),
              'endings': tfds.features.Sequence(tfds.features.Text()), 'label': tfds.features.Scalar(dtype=np.int32),
              'source_id': tfds.features.Text()}

  @classmethod
  def read_source(cls, path: str) -> list[dict]:
    docs = _read_jsonl(path, ('activity_label', 'ctx_a', 'ctx_b', 'endings', 'label'))
    return [{'ind': int(doc.get('ind', line)), 'activity_label': doc['activity_label'], 'ctx_a': doc['ctx_a'],
             'ctx_b': doc['ctx_b'], 'endings': list(doc['endings']), 'label': int(doc['label']),
             'source_id': str(doc.get('source_id', ''))} for line, doc in enumerate(docs)]


class SiqaOriginal(_OriginalJsonlBuilder):
  """Social IQa validation from v1.4's `dev.jsonl` (context, question, answerA/B/C) and the labels "1".."3": a `label`
  field on each line (e.g. an export of the HF dataset), else the release's separate labels file `dev-labels.lst`."""
  CONFIG_FIELD = 'config.eval.siqa_path'
  SOURCE = 'dev.jsonl (with dev-labels.lst beside it) from the Social IQa v1.4 release (socialiqa.zip)'
  ANSWER_FIELDS = ('context', 'question', 'answerA', 'answerB', 'answerC')
  # The label stays "1".."3" as the release has it; lm-eval's gold is label - 1.
  FEATURES = {field: tfds.features.Text() for field in ANSWER_FIELDS + ('label',)}

  @classmethod
  def read_source(cls, path: str) -> list[dict]:
    docs = _read_jsonl(path, cls.ANSWER_FIELDS)
    labels = [doc.get('label') for doc in docs]
    if any(label is None for label in labels):
      labels_path = siqa_labels_path(path)
      if not os.path.isfile(labels_path):
        raise NotFoundError(f'{path} has no "label" field, and its labels file {labels_path} (as the original Social '
                            'IQa release ships them: dev.jsonl + dev-labels.lst) is missing')
      with open(labels_path, encoding='utf-8') as file:
        labels = [line.strip() for line in file if line.strip()]
      if len(labels) != len(docs):
        raise DataError(f'{labels_path} has {len(labels)} labels for the {len(docs)} documents of {path}')
    labels = [str(label).strip() for label in labels]
    for line, label in enumerate(labels, start=1):
      if label not in ('1', '2', '3'):
        raise DataError(f'{path}: document {line} has label {label!r}; Social IQa labels are "1", "2" or "3"')
    return [{field: doc[field] for field in cls.ANSWER_FIELDS} | {'label': label} for doc, label in zip(docs, labels)]
