"""grain input pipelines over `tfds.data_source`: shuffle, tokenize, pack, batch, shard across JAX processes.

Every batch is a dict of [batch_size, seq_len] numpy arrays, batch_size being THIS process's share: int32 `inputs`
and `targets` (the tokens to predict), `segment_ids` (1, 2, 3... per packed document in a row; 0 = padding) and
`positions` (0-based within a document's chunk), and float32 `weights` (1 on a target to predict, 0 on padding).

Packing rule (no prediction across documents, no token lost): a document's tokens are t = encode(text) + [eos]; its
inputs are [eos] + t[:-1] (EOS doubles as beginning-of-document) and its targets are t. A document longer than seq_len
is cut into seq_len chunks (inputs and targets cut at the same places), each packed as a document of its own, its
positions restarting at 0. Chunks are packed into rows first-fit (grain's FirstFitPackIterDataset over
PACKING_BINS_PER_ROW * batch_size bins), the rest of a row padded.

Sharding: process i of n reads examples i, i+n, i+2n... of the split (a global batch is batch_size * n). Training
shuffles its shard with the seed, anew every epoch, endlessly, through a grain DatasetIterator that Orbax checkpoints
(grain.checkpoint.CheckpointSave/CheckpointRestore). Evaluation reads the shard once, in order (EvalBatches).
"""

import functools
import itertools
from typing import Any, Iterator, Sequence

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from perijax.data import corpus  # registers the embedded `shakespeare_milton` builder with TFDS
from perijax.data import sources
from perijax.data import tokenizers
from perijax.errors import DataError, NotFoundError

Batch = dict[str, np.ndarray]
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')
PACKING_BINS_PER_ROW = 4   # more open rows -> less padding, rows of one batch drawn from more documents
READ_THREADS = 4           # threads reading and tokenizing examples (per grain worker)
READ_BUFFER = 256          # examples read ahead of the packer


def open_source(data_config, split: str) -> Sequence[Any]:
  """The split as a random-access source, `tfds.data_source` or with data.source != 'tfds' its files (sources.py),
  checked: prepared, non-empty, readable, its first record holding text."""
  field = data_config.text_field
  if data_config.get('source', 'tfds') != 'tfds':  # configs written before data.source existed read TFDS
    source = sources.open_file_source(data_config, split)
    what = f'split {split!r} of data.path {data_config.path!r} ({data_config.source})'
  else:
    where = f'data dir {data_config.data_dir!r}' if data_config.data_dir else "TFDS's default data dir"
    source = _tfds_source(data_config, split, where)
    what = f'TFDS dataset {data_config.name!r} split {split!r} in {where}'
  if len(source) == 0:
    raise DataError(f'{what} is empty: nothing to read.')
  try:
    first = source[0]
  except DataError:  # a file source's own message
    raise
  except Exception as error:  # pylint: disable=broad-except
    raise DataError(f'{what} cannot be read (corrupt or incomplete files?): {type(error).__name__}: {error}') from error
  if field not in first:
    raise DataError(f'data.text_field {field!r} is not a feature of {what}; its features: {sorted(first)}.')
  if not isinstance(first[field], (str, bytes)):
    raise DataError(f'data.text_field {field!r} in {what} holds {type(first[field]).__name__}, not text.')
  return source


def _tfds_source(data_config, split: str, where: str):
  name = data_config.name
  try:
    return tfds.data_source(name, split=split, data_dir=data_config.data_dir or None, download=False)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DataError(f'data.name {name!r} is not a TFDS dataset (e.g. {corpus.DATASET_NAME!r}, "c4/en", '
                    f'"lm1b"): {str(error).splitlines()[0]}') from error
  except Exception as error:  # pylint: disable=broad-except  TFDS raises many kinds for "not there"
    if isinstance(error, ValueError) and 'Unknown split' in str(error):
      raise DataError(f'Split {split!r} of {name!r}: {str(error).splitlines()[0]} (check data.train_split / '
                      'data.eval_split).') from error
    fix = (f'Prepare it once with:  {corpus.prepare_command(data_config.data_dir)}' if name == corpus.DATASET_NAME else
           'perijax only reads prepared datasets: prepare it once with TFDS elsewhere, as array_record (c4 needs '
           'Apache Beam, lm1b needs TensorFlow), and place it in data.data_dir (a local path or a gs:// bucket).')
    reason = (str(error).strip().splitlines() or [''])[0]
    raise NotFoundError(f'TFDS dataset {name!r} (split {split!r}) is not prepared as array_record in {where}. '
                        f'{fix}\n(TFDS said: {type(error).__name__}: {reason})') from error


def example_text(example: dict[str, Any], text_field: str) -> str:
  # Real array_record sources return text as bytes, tfds.testing.mock_data as str.
  text = example[text_field]
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)


def tokenize_document(tokenizer: tokenizers.Tokenizer, text_field: str, example) -> np.ndarray:
  """example -> t = encode(text) + [eos], int32."""
  text = example_text(example, text_field)
  encode = getattr(tokenizer, 'encode_array', None)
  tokens = encode(text) if encode else np.asarray(tokenizer.encode(text), np.int32)
  return np.append(tokens.astype(np.int32), np.int32(tokenizer.eos_id))


class ChunkDocument(grain.experimental.FlatMapTransform):
  """t -> {'inputs': ([eos] + t[:-1])[chunk], 'targets': t[chunk]} for seq_len-long chunks."""

  max_fan_out = 1 << 20  # required by the FlatMap interface; FlatMapIterDataset does not bound it

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, tokens):
    inputs = np.roll(tokens, 1)  # [eos] + t[:-1], as t ends with eos
    return [{'inputs': inputs[start:start + self.seq_len], 'targets': tokens[start:start + self.seq_len]}
            for start in range(0, len(tokens), self.seq_len)]


def _model_row(packed: dict[str, np.ndarray]) -> Batch:
  segment_ids = packed['targets_segment_ids'].astype(np.int32)
  return {'inputs': packed['inputs'].astype(np.int32), 'targets': packed['targets'].astype(np.int32),
          'segment_ids': segment_ids, 'positions': packed['targets_positions'].astype(np.int32),
          'weights': (segment_ids > 0).astype(np.float32)}


def _packed_batches(data_config, tokenizer: tokenizers.Tokenizer, split: str, *, batch_size: int, seq_len: int,
                    process_index: int, process_count: int, seed: int | None = None) -> grain.IterDataset:
  """This process's shard of `split` packed into batches: with a `seed` as training reads it, without it once in
  order, the last batch short."""
  if batch_size <= 0 or seq_len <= 0:
    raise ValueError(f'batch_size ({batch_size}) and seq_len ({seq_len}) must be positive.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} must be in [0, process_count={process_count}).')
  source = open_source(data_config, split)
  if len(source) < process_count:
    raise DataError(f'Split {split!r} of {data_config.name!r} has {len(source)} examples, fewer than the '
                    f'{process_count} processes that each need a disjoint part of it.')
  documents = grain.MapDataset.source(source)[process_index::process_count]
  if seed is not None:
    documents = documents.shuffle(seed=seed % 2**32).repeat()  # a new order every epoch, all from the seed
  tokens = documents.map(functools.partial(tokenize_document, tokenizer, data_config.text_field)).to_iter_dataset(
      grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER))
  chunks = grain.experimental.FlatMapIterDataset(tokens, ChunkDocument(seq_len))
  rows = grain.experimental.FirstFitPackIterDataset(chunks, length_struct={'inputs': seq_len, 'targets': seq_len},
                                                    num_packing_bins=PACKING_BINS_PER_ROW * batch_size,
                                                    shuffle_bins=False)
  return rows.map(_model_row).batch(batch_size, drop_remainder=seed is not None)


def make_train_iterator(data_config, tokenizer: tokenizers.Tokenizer, *, batch_size: int, seq_len: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's packed batches of `data_config.train_split`."""
  if data_config.worker_count < 0 or data_config.prefetch < 0:
    raise DataError(f'data.worker_count ({data_config.worker_count}) and data.prefetch ({data_config.prefetch}) '
                    'must be >= 0.')
  batches = _packed_batches(data_config, tokenizer, data_config.train_split, batch_size=batch_size, seq_len=seq_len,
                            process_index=process_index, process_count=process_count, seed=seed)
  if data_config.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags, which nothing parsed outside an absl app
      flags.FLAGS.mark_as_parsed()
    # Each worker packs its own slice of the documents; deterministic for a given worker_count.
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.worker_count, per_worker_buffer_size=max(1, data_config.prefetch)))
  elif data_config.prefetch > 0:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data_config.prefetch)
  return iter(batches)


class EvalBatches:
  """The split once, in order, as this process's batches; the last one padded with weights 0.

  Each pass starts over. With max_batches > 0 every pass yields exactly max_batches batches (all-padding ones once
  the shard runs out), so processes stay in lockstep; with 0 it yields until the shard ends, and processes can agree
  on the largest `count_batches()` and set `pad_to_batches`. After a pass, `target_tokens` = sum of its weights.
  """

  def __init__(self, dataset: grain.IterDataset, *, batch_size: int, seq_len: int, max_batches: int):
    self._dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
    self.max_batches = self.pad_to_batches = max_batches
    self.target_tokens = 0

  def _batches(self) -> Iterator[Batch]:
    return itertools.islice(self._dataset, self.max_batches or None)

  def __iter__(self) -> Iterator[Batch]:
    self.target_tokens = count = 0
    for count, batch in enumerate(self._batches(), 1):
      self.target_tokens += int(batch['weights'].sum())
      yield {key: np.pad(value, ((0, self.batch_size - len(value)), (0, 0))) for key, value in batch.items()}
    for _ in range(count, self.pad_to_batches):  # all padding (weights 0)
      yield {key: np.zeros((self.batch_size, self.seq_len), np.float32 if key == 'weights' else np.int32)
             for key in BATCH_KEYS}

  def count_batches(self) -> int:
    """Batches in one pass of this shard, up to max_batches (one pass of tokenizing and packing)."""
    return sum(1 for _ in self._batches())


def make_eval_iterator(data_config, tokenizer: tokenizers.Tokenizer, *, split: str, batch_size: int, seq_len: int,
                       process_index: int = 0, process_count: int = 1, max_batches: int = 0) -> EvalBatches:
  """This process's batches of `split`, once, in order (see EvalBatches)."""
  if max_batches < 0:
    raise ValueError(f'max_batches ({max_batches}) must be >= 0 (0 = the whole split).')
  batches = _packed_batches(data_config, tokenizer, split, batch_size=batch_size, seq_len=seq_len,
                            process_index=process_index, process_count=process_count)
  return EvalBatches(batches, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)


def bytes_per_token(data_config, tokenizer: tokenizers.Tokenizer, split: str, max_docs: int = 2000) -> float:
  """UTF-8 bytes of text per target token (EOS included) over the first `max_docs` documents (0 = all) of `split`:
  bits per byte = (mean loss per target token in nats) / ln 2 / bytes_per_token."""
  source = open_source(data_config, split)
  num_docs = min(max_docs, len(source)) if max_docs > 0 else len(source)
  num_bytes = num_tokens = 0
  for index in range(num_docs):   # one document at a time: max_docs=0 may be a large split
    text = example_text(source[index], data_config.text_field)
    num_bytes += len(text.encode('utf-8'))
    num_tokens += len(tokenizer.encode(text)) + 1
  return num_bytes / num_tokens
