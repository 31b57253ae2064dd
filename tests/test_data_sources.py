"""JSONL, Parquet and Hugging Face save_to_disk sources: the same batches as TFDS for the same texts, exact resume,
one clear error for a bad source, path or field."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from perijax import config as config_lib
from perijax.data import pipeline
from perijax.data import sources
from perijax.data import tokenizers

SEQ_LEN, BATCH = 64, 4
BYTES = tokenizers.ByteTokenizer()
SPLITS = ('train', 'validation')


def tfds_config(data_dir):
  config = default.get_config().data
  config.update(data_dir=data_dir, worker_count=0, prefetch=0)
  return config


@pytest.fixture(scope='module')
def corpus_texts(corpus_data_dir):
  """The embedded corpus's splits as TFDS reads them, in its order."""
  config = tfds_config(corpus_data_dir)
  texts = {}
  for split in SPLITS:
    source = pipeline.open_source(config, split)
    texts[split] = [pipeline.example_text(source[i], config.text_field) for i in range(len(source))]
  return texts


@pytest.fixture(scope='module')
def file_configs(corpus_texts, tmp_path_factory):
  """The same texts written as JSONL (train in two files, blank lines between records), Parquet and a saved
  DatasetDict, each with an extra column that must be ignored."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  root = tmp_path_factory.mktemp('sources')
  for split, texts in corpus_texts.items():
    halves = (texts[:len(texts) // 2], texts[len(texts) // 2:]) if split == 'train' else (texts,)
    for part, half in enumerate(halves):
      with open(root / f'{split}-{part}.jsonl', 'w') as f:
        f.writelines(json.dumps({'id': index, 'text': text}) + '\n\n' for index, text in enumerate(half))
      pq.write_table(pa.table({'id': list(range(len(half))), 'text': half}), root / f'{split}-{part}.parquet',
                     row_group_size=3)
  datasets.DatasetDict({split: datasets.Dataset.from_dict({'text': texts, 'id': list(range(len(texts)))})
                        for split, texts in corpus_texts.items()}).save_to_disk(str(root / 'hf'))
  def make(source, path, **overrides):
    config = default.get_config().data
    config.update(source=source, path=str(path), worker_count=0, prefetch=0, **overrides)
    return config
  return {'jsonl': make('jsonl', root / '{split}-*.jsonl'), 'parquet': make('parquet', root / '{split}-*.parquet'),
          'hf_disk': make('hf_disk', root / 'hf')}


def train_batches(config, count, state=None):
  iterator = pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=3)
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(count)], iterator.get_state()


def assert_same_batches(left, right):
  assert len(left) == len(right)
  for a, b in zip(left, right):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('source', sources.FILE_SOURCES)
def test_file_source_gives_the_tfds_batches_for_the_same_texts(source, file_configs, corpus_texts, corpus_data_dir):
  config = file_configs[source]
  for split in SPLITS:
    opened = pipeline.open_source(config, split)
    assert [opened[i]['text'] for i in range(len(opened))] == corpus_texts[split]
  # Training (shuffled, packed, past an epoch) and evaluation batches, and bits per byte, all identical to TFDS's.
  steps = 3 * len(corpus_texts['train'])  # more documents than the split holds: the second epoch too
  expected, _ = train_batches(tfds_config(corpus_data_dir), steps // BATCH)
  got, _ = train_batches(config, steps // BATCH)
  assert_same_batches(got, expected)
  def eval_batches(data_config):
    return list(pipeline.make_eval_iterator(data_config, BYTES, split='validation', batch_size=BATCH, seq_len=SEQ_LEN))
  assert_same_batches(eval_batches(config), eval_batches(tfds_config(corpus_data_dir)))
  assert pipeline.bytes_per_token(config, BYTES, 'validation') == pipeline.bytes_per_token(
      tfds_config(corpus_data_dir), BYTES, 'validation')


@pytest.mark.parametrize('source', sources.FILE_SOURCES)
def test_resuming_mid_stream_gives_the_same_batches(source, file_configs):
  config = file_configs[source]
  uninterrupted, _ = train_batches(config, 9)
  _, state = train_batches(config, 4)
  resumed, _ = train_batches(config, 5, state=json.loads(json.dumps(state)) if isinstance(state, dict) else state)
  assert_same_batches(resumed, uninterrupted[4:])


def test_two_processes_read_disjoint_shards_of_a_jsonl_split(file_configs, corpus_texts):
  config = file_configs['jsonl']
  seen = []
  for index in range(2):
    batches = pipeline.make_eval_iterator(config, BYTES, split='validation', batch_size=BATCH, seq_len=SEQ_LEN,
                                          process_index=index, process_count=2)
    seen.append(sum(int(batch['weights'].sum()) for batch in batches))
  assert sum(seen) == sum(len(BYTES.encode(text)) + 1 for text in corpus_texts['validation'])


def test_hf_disk_single_dataset_per_split(tmp_path):
  import datasets
  for split in SPLITS:
    datasets.Dataset.from_dict({'body': [f'{split} text {i}' for i in range(3)]}).save_to_disk(str(tmp_path / split))
  config = default.get_config().data
  config.update(source='hf_disk', path=str(tmp_path / '{split}'), text_field='body')
  assert pipeline.open_source(config, 'validation')[2] == {'body': 'validation text 2'}
  config.path = str(tmp_path / 'train')
  with pytest.raises(sources.DataSourceError, match=r'single Dataset, not a DatasetDict.*put \{split\}'):
    pipeline.open_source(config, 'train')


def test_file_sources_import_pyarrow_and_datasets_only_when_selected(file_configs):
  code = ('import sys; from perijax.data import pipeline; import configs.default as d; c = d.get_config().data; '
          f'c.update(source="jsonl", path={file_configs["jsonl"].path!r}); pipeline.open_source(c, "train"); '
          'print(sorted(m for m in ("datasets", "pyarrow.parquet") if m in sys.modules))')
  output = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, check=True,
                          cwd=str(pipeline.__file__).rsplit('/perijax/', 1)[0]).stdout
  assert output.strip() == '[]'


def bad(tmp_path, source, path, **overrides):
  config = default.get_config()
  config.data.update(source=source, path=str(path), **overrides)
  return config


def test_bad_source_and_path_fail_in_config_validation(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"data.source = 'csv' is not allowed: expected one of \('tfds'"):
    config_lib.validate(bad(tmp_path, 'csv', tmp_path / '{split}.csv'))
  with pytest.raises(config_lib.ConfigError, match=r"config.data.path = .* expected a path with '\{split\}'"):
    config_lib.validate(bad(tmp_path, 'jsonl', tmp_path / 'train.jsonl'))
  with pytest.raises(config_lib.ConfigError, match=r"data.source = 'hf_disk': expected the directory"):
    config_lib.validate(bad(tmp_path, 'hf_disk', ''))
  config_lib.validate(bad(tmp_path, 'parquet', tmp_path / '{split}-*.parquet'))  # fine until it is read


def write(path, text):
  path.write_text(text)
  return path


@pytest.mark.parametrize('case', ['no_file', 'jsonl_field', 'jsonl_not_json', 'jsonl_not_text', 'jsonl_empty',
                                  'parquet_field', 'parquet_not_text', 'parquet_not_parquet', 'hf_not_saved',
                                  'hf_split', 'hf_field'])
def test_bad_files_are_one_clear_error(case, tmp_path):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  config = default.get_config().data
  config.update(source='jsonl', path=str(tmp_path / '{split}.jsonl'))
  if case == 'no_file':
    pattern = r"data.path '.*\{split\}.jsonl' matches no file for split 'train' \(looked for '.*train.jsonl'"
  elif case == 'jsonl_field':
    write(tmp_path / 'train.jsonl', '{"body": "hello"}\n')
    pattern = r"data.text_field 'text' is not in the record .*train.jsonl at byte 0; it has \['body'\]"
  elif case == 'jsonl_not_json':
    write(tmp_path / 'train.jsonl', '{"text": "fine"}\n{"text": broken}\n')
    pattern = r'train.jsonl at byte 17 is not a JSON object on one line'
  elif case == 'jsonl_not_text':
    write(tmp_path / 'train.jsonl', '{"text": 5}\n')
    pattern = r"data.text_field 'text' in split 'train' of .* holds int, not text"
  elif case == 'jsonl_empty':
    write(tmp_path / 'train.jsonl', '\n\n')
    pattern = r"split 'train' of data.path .* \(jsonl\) is empty"
  elif case.startswith('parquet'):
    config.update(source='parquet', path=str(tmp_path / '{split}.parquet'))
    if case == 'parquet_not_parquet':
      write(tmp_path / 'train.parquet', 'not parquet')
      pattern = r'train.parquet cannot be read as Parquet'
    else:
      column = {'body': ['a']} if case == 'parquet_field' else {'text': [1, 2]}
      pq.write_table(pa.table(column), tmp_path / 'train.parquet')
      pattern = (r"data.text_field 'text' is not a column of .*train.parquet; its columns: \['body'\]"
                 if case == 'parquet_field' else r"data.text_field 'text' of .*train.parquet holds int64, not text")
  else:
    config.update(source='hf_disk', path=str(tmp_path / 'hf'))
    if case == 'hf_not_saved':
      (tmp_path / 'hf').mkdir()
      pattern = r"data.path '.*hf' is not a dataset written by datasets save_to_disk"
    else:
      column = 'text' if case == 'hf_split' else 'body'
      datasets.DatasetDict({'validation': datasets.Dataset.from_dict({column: ['a']}),
                            'train': datasets.Dataset.from_dict({column: ['b']})}).save_to_disk(str(tmp_path / 'hf'))
      config.train_split = 'training' if case == 'hf_split' else 'train'
      pattern = (r"split 'training' is not in the DatasetDict at .*; its splits: \['train', 'validation'\]"
                 if case == 'hf_split' else r"data.text_field 'text' is not a column of .*; its columns: \['body'\]")
  with pytest.raises(sources.DataSourceError, match=pattern) as error:
    next(pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=0))  # reads every line
  assert isinstance(error.value, ValueError) and '\n' not in str(error.value)
