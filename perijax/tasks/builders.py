"""Small TFDS builders of perijax's own, for the two benchmarks the TFDS catalog cannot give exactly.

HellaSwag: TFDS's `hellaswag` keeps only the joined `ctx`, but lm-eval builds its prompt from `ctx_a` and
`ctx_b.capitalize()`, which `ctx` cannot give back. Social IQa: not in the TFDS catalog at all. Both are prepared here
from the original release files, without TensorFlow, into array_record, and read back through a TFDS data source:

- `hellaswag_original` from `hellaswag_val.jsonl` (rowanz/hellaswag `data/`; one JSON object per line with ind,
  activity_label, ctx_a, ctx_b, endings, label, source_id, ...);
- `siqa_original` from Social IQa v1.4's `dev.jsonl` (context, question, answerA/B/C) and its labels file
  `dev-labels.lst` beside it (one "1"/"2"/"3" per line; the labels ship separately). A JSONL whose lines carry their
  own `label` (e.g. an export of the HF dataset) needs no labels file.

The JSONL path is given to the builder (`source_path=`), as config.eval.hellaswag_path / config.eval.siqa_path. Each
distinct source file gets its own builder config, named after its content's SHA-256, so a data dir never mixes two
files up: a prepared copy is reused only for the same bytes. Examples keep the file's order (shuffling disabled), so
"the first N" are the file's first N lines.
"""

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from perijax.errors import DataError, NotFoundError

_EVAL_SPLIT = 'validation'  # both originals are their dev sets, lm-eval's evaluated split


@dataclasses.dataclass(eq=False)
class SourceFileConfig(tfds.core.BuilderConfig):
  """A builder config that carries the original file to prepare from."""
  source_path: str = ''


def siqa_labels_path(jsonl_path: str) -> str:
  """The original release keeps the labels beside the questions: `dev.jsonl` -> `dev-labels.lst`."""
  stem, _ = os.path.splitext(jsonl_path)
  return stem + '-labels.lst'


def _read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as file:
    lines = [line for line in file if line.strip()]
  docs = []
  for number, line in enumerate(lines, start=1):
    try:
      docs.append(json.loads(line))
    except json.JSONDecodeError as error:
      raise DataError(f'{path}:{number}: not a JSON object ({error})') from error
  return docs


def _require_fields(path: str, docs: Sequence[dict], fields: Sequence[str]):
  for number, doc in enumerate(docs, start=1):
    missing = [field for field in fields if field not in doc]
    if missing:
      raise DataError(f'{path}: document {number} lacks {missing}; each line needs {list(fields)}')


class _OriginalJsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing: the source path comes from the builder config; array_record; file order kept."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Prepared from the original JSONL release.'}

  def __init__(self, *, source_path: str = '', **kwargs):
    if source_path and 'config' not in kwargs:
      kwargs['config'] = source_config(source_path)
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # Nothing is downloaded, so there is no checksums file to find beside the code; TFDS's own lookup of it touches
    # `importlib_resources`, which is not installed (TFDS imports it lazily), for any builder that lives in a package.
    return None

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=self._features(), disable_shuffling=True)

  def _source_path(self) -> str:
    path = getattr(self.builder_config, 'source_path', '')
    if not path or not os.path.isfile(path):
      raise NotFoundError(f'{self.name}: the original JSONL file to prepare from is missing: {path!r}')
    return path

  @classmethod
  def read_source(cls, path: str) -> list[dict]:
    """The examples of the original file, checked; raises ValueError/FileNotFoundError naming what is wrong."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # the file is local; nothing is downloaded
    return {_EVAL_SPLIT: self._generate_examples(self._source_path())}

  def _generate_examples(self, path):
    yield from enumerate(self.read_source(path))


class HellaswagOriginal(_OriginalJsonlBuilder):
  """HellaSwag validation with the fields lm-eval's prompt needs (ctx_a and ctx_b kept apart)."""

  def _features(self):
    return tfds.features.FeaturesDict({
        'ind': tfds.features.Scalar(dtype=np.int64),
        'activity_label': tfds.features.Text(),
        'ctx_a': tfds.features.Text(),
        'ctx_b': tfds.features.Text(),
        'endings': tfds.features.Sequence(tfds.features.Text()),
        'label': tfds.features.Scalar(dtype=np.int32),
        'source_id': tfds.features.Text(),
    })

  @classmethod
  def read_source(cls, path: str) -> list[dict]:
    docs = _read_jsonl(path)
    _require_fields(path, docs, ('activity_label', 'ctx_a', 'ctx_b', 'endings', 'label'))
    return [{
        'ind': int(doc.get('ind', line)),
        'activity_label': doc['activity_label'],
        'ctx_a': doc['ctx_a'],
        'ctx_b': doc['ctx_b'],
        'endings': list(doc['endings']),
        'label': int(doc['label']),
        'source_id': str(doc.get('source_id', '')),
    } for line, doc in enumerate(docs)]


class SiqaOriginal(_OriginalJsonlBuilder):
  """Social IQa validation: context, question, three answers and the label "1".."3"."""

  def _features(self):
    return tfds.features.FeaturesDict({
        'context': tfds.features.Text(),
        'question': tfds.features.Text(),
        'answerA': tfds.features.Text(),
        'answerB': tfds.features.Text(),
        'answerC': tfds.features.Text(),
        'label': tfds.features.Text(),  # "1".."3" as the release has it; lm-eval's gold is label - 1
    })

  @classmethod
  def read_source(cls, path: str) -> list[dict]:
    docs = _read_jsonl(path)
    _require_fields(path, docs, ('context', 'question', 'answerA', 'answerB', 'answerC'))
    labels = [doc.get('label') for doc in docs]
    if any(label is None for label in labels):
      labels = _read_siqa_labels(path, len(docs))
    examples = []
    for line, (doc, label) in enumerate(zip(docs, labels)):
      label = str(label).strip()
      if label not in ('1', '2', '3'):
        raise DataError(f'{path}: document {line + 1} has label {label!r}; Social IQa labels are "1", "2" or "3"')
      examples.append({field: doc[field] for field in ('context', 'question', 'answerA', 'answerB', 'answerC')} |
                      {'label': label})
    return examples


def _read_siqa_labels(jsonl_path: str, count: int) -> list[str]:
  labels_path = siqa_labels_path(jsonl_path)
  if not os.path.isfile(labels_path):
    raise NotFoundError(f'{jsonl_path} has no "label" field, and its labels file {labels_path} (as the original '
                            'Social IQa release ships them: dev.jsonl + dev-labels.lst) is missing')
  with open(labels_path, encoding='utf-8') as file:
    labels = [line.strip() for line in file if line.strip()]
  if len(labels) != count:
    raise DataError(f'{labels_path} has {len(labels)} labels for the {count} documents of {jsonl_path}')
  return labels


def source_config(source_path: str) -> SourceFileConfig:
  """The builder config for one source file: named after the SHA-256 of its bytes (and of its labels file, if any)."""
  digest = hashlib.sha256()
  for path in (source_path, siqa_labels_path(source_path)):
    if os.path.isfile(path):
      with open(path, 'rb') as file:
        digest.update(file.read())
  return SourceFileConfig(name=f'sha256_{digest.hexdigest()[:16]}', source_path=os.path.abspath(source_path),
                          description=f'prepared from {os.path.abspath(source_path)}')


_CONFIG_FIELD = {'hellaswag': 'config.eval.hellaswag_path', 'siqa': 'config.eval.siqa_path'}
_WHERE_TO_GET = {
    'hellaswag': 'hellaswag_val.jsonl from https://github.com/rowanz/hellaswag (data/)',
    'siqa': 'dev.jsonl (with dev-labels.lst beside it) from the Social IQa v1.4 release (socialiqa.zip)',
}


def data_source(task: str, builder_cls, source_path: str, data_dir: str | None) -> Sequence[dict]:
  """The validation split of `builder_cls` prepared from `source_path` into `data_dir` (once), as a data source."""
  if not source_path:
    raise NotFoundError(f"task '{task}' reads the original JSONL file, and none is given: set "
                            f'{_CONFIG_FIELD[task]} to {_WHERE_TO_GET[task]}')
  if not os.path.isfile(source_path):
    raise NotFoundError(f"task '{task}': {_CONFIG_FIELD[task]}={source_path!r} is not a file; it should be "
                            f'{_WHERE_TO_GET[task]}')
  builder = builder_cls(source_path=source_path, data_dir=data_dir or None)
  if not builder.is_prepared():
    builder_cls.read_source(source_path)  # bad content fails here, before anything is written
    builder.download_and_prepare()
  return builder.as_data_source(split=_EVAL_SPLIT)
