"""JSONL, Parquet and Hugging Face save_to_disk files as random-access grain sources (config.data.source, .path).

'{split}' in data.path stands for the split name (README.md, "Files instead of TFDS"). Each source is a sequence of
`{data.text_field: text}`, so shuffling, sharding, packing and resumption are exactly those of TFDS sources. pyarrow
and datasets are imported only when their source is selected; `datasets.load_from_disk` never reaches the network.
"""

import glob
import json
import os

import numpy as np

from perijax.errors import DataError

FILE_SOURCES = ('jsonl', 'parquet', 'hf_disk')
DataSourceError = DataError  # what a bad source, path or field raises (a ValueError, reported by the CLI as one line)


class JsonlSource:
  """The non-blank lines of JSONL files, each read on demand by its byte offset."""

  def __init__(self, paths: list[str], text_field: str):
    self.paths, self.text_field = paths, text_field
    lines = []  # (file index, offset, length) per record
    for file_index, path in enumerate(paths):
      offset = 0
      with open(path, 'rb') as f:
        for line in f:
          if line.strip():
            lines.append((file_index, offset, len(line)))
          offset += len(line)
    self._lines = np.array(lines, np.int64).reshape(-1, 3)

  def __len__(self):
    return len(self._lines)

  def __getitem__(self, index):
    file_index, offset, length = (int(value) for value in self._lines[index])
    with open(self.paths[file_index], 'rb') as f:  # opened per read: grain reads from threads and worker processes
      line = os.pread(f.fileno(), length, offset)
    where = f'{self.paths[file_index]} at byte {offset}'
    try:
      record = json.loads(line)
    except ValueError as error:
      raise DataError(f'{where} is not a JSON object on one line: {error}') from None
    if not isinstance(record, dict) or self.text_field not in record:
      fields = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(f'data.text_field {self.text_field!r} is not in the record {where}; it has {fields}')
    return {self.text_field: record[self.text_field]}


class ParquetSource:
  """The text column of Parquet files, read once into memory (the other columns are never read)."""

  def __init__(self, paths: list[str], text_field: str):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top  only when data.source = 'parquet'
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.text_field, chunks = text_field, []
    for path in paths:
      try:
        schema = pq.read_schema(path)
      except (OSError, pa.ArrowException) as error:
        raise DataError(f'{path} cannot be read as Parquet: {error}') from None
      if text_field not in schema.names:
        raise DataError(f'data.text_field {text_field!r} is not a column of {path}; its columns: {schema.names}')
      field_type = schema.field(text_field).type
      if field_type not in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
        raise DataError(f'data.text_field {text_field!r} of {path} holds {field_type}, not text')
      chunks.extend(pq.read_table(path, columns=[text_field]).column(text_field).chunks)
    self._column = pa.chunked_array(chunks, type=field_type)

  def __len__(self):
    return len(self._column)

  def __getitem__(self, index):
    return {self.text_field: self._column[int(index)].as_py()}


def open_hf_disk(data_config, split: str):
  """The split of a Hugging Face dataset saved with `save_to_disk` (memory-mapped Arrow), its text column only."""
  import datasets  # pylint: disable=g-import-not-at-top  only when data.source = 'hf_disk'
  path, field = data_config.path.replace('{split}', split), data_config.text_field
  try:
    loaded = datasets.load_from_disk(path)
  except (FileNotFoundError, ValueError, OSError) as error:
    raise DataError(f'data.path {path!r} is not a dataset written by datasets save_to_disk (data.source = hf_disk): '
                    f'{" ".join(str(error).split())[:200]}') from None
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded:
      raise DataError(f'split {split!r} is not in the DatasetDict at {path!r}; its splits: {sorted(loaded)} '
                      '(check data.train_split / data.eval_split)')
    loaded = loaded[split]
  elif '{split}' not in data_config.path:
    raise DataError(f'{path!r} holds a single Dataset, not a DatasetDict of splits: put {{split}} in data.path '
                    "(e.g. 'corpus/{split}') so that training and evaluation read different ones")
  if field not in loaded.column_names:
    raise DataError(f'data.text_field {field!r} is not a column of {path!r} (split {split!r}); '
                    f'its columns: {loaded.column_names}')
  return loaded.select_columns([field])  # a Dataset is a random-access sequence of {field: text} already


def open_file_source(data_config, split: str):
  """The split's files (data.path with '{split}' replaced, glob-expanded, sorted) as a random-access source;
  pipeline.open_source checks that it holds text."""
  if data_config.source == 'hf_disk':
    return open_hf_disk(data_config, split)
  readers = {'jsonl': JsonlSource, 'parquet': ParquetSource}
  if data_config.source not in readers:
    raise DataError(f'data.source {data_config.source!r} is not a file source; expected one of {FILE_SOURCES}')
  pattern = data_config.path.replace('{split}', split)
  paths = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
  if not paths:
    raise DataError(f'data.path {data_config.path!r} matches no file for split {split!r} (looked for {pattern!r}; '
                    f'data.source = {data_config.source!r})')
  return readers[data_config.source](paths, data_config.text_field)
