"""Tokenizers, byte-level (the default, no files) and SentencePiece, and their record in a run's workdir.

Each has `encode(text) -> list[int]` (no BOS/EOS added), `decode(ids) -> str`, `vocab_size`, `pad_id`, `eos_id` and
`name`. The pipeline appends `eos_id` after every document and uses it as the beginning-of-document input too, so no
separate BOS exists. Evaluation reads the record training wrote, so both always use exactly the same tokenizer.
"""

import io
import json
from typing import Iterable, Sequence

from etils import epath
import numpy as np
import sentencepiece as spm

from perijax import rundir
from perijax.errors import DataError, NotFoundError

KNOWN_TOKENIZERS = ('byte', 'sentencepiece')
RECORDED_IDS = ('vocab_size', 'pad_id', 'eos_id')  # in the workdir's record, checked when read back


class ByteTokenizer:
  """UTF-8 bytes shifted by two: 0 = padding, 1 = end of document, byte b -> b + 2."""

  name = 'byte'
  pad_id, eos_id = 0, 1
  num_special = 2
  vocab_size = 256 + num_special

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """The same ids as `encode`, as int32 numpy (the pipeline's fast path)."""
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32) + self.num_special

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= self.num_special) & (ids < self.vocab_size)]  # specials carry no text
    return (ids - self.num_special).astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model; pad/eos ids are the model's own (ours are trained with pad=0, eos=1, unk=2, no BOS)."""

  name = 'sentencepiece'

  def __init__(self, model_proto: bytes, path: str = ''):
    self.model_proto, self.path = model_proto, path  # path: where it was read from, for messages and save_tokenizer
    self.processor = spm.SentencePieceProcessor()
    try:
      self.processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as error:
      raise DataError(f'{path or "model bytes"} is not a readable SentencePiece model: {error}') from error
    self.vocab_size, self.pad_id, self.eos_id = (self.processor.get_piece_size(), self.processor.pad_id(),
                                                 self.processor.eos_id())
    if self.eos_id < 0:
      raise DataError(f'SentencePiece model {path or "(in memory)"} has no EOS piece (eos_id=-1); the pipeline needs '
                      'one to separate documents. Train it with eos_id set (train_sentencepiece does: eos_id=1).')

  def __reduce__(self):  # grain worker processes get the model's bytes and build their own processor
    return SentencePieceTokenizer, (self.model_proto, self.path)

  @classmethod
  def from_file(cls, path: str) -> 'SentencePieceTokenizer':
    path = epath.Path(path)
    if not path.is_file():
      raise NotFoundError(f'SentencePiece model file {path} does not exist (data.tokenizer_path must name a '
                          '.model file, e.g. one written by perijax.data.tokenizers.train_sentencepiece).')
    return cls(path.read_bytes(), str(path))

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in np.asarray(ids).reshape(-1) if i not in (self.pad_id, self.eos_id)])


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str) -> str:
  """Trains a BPE SentencePiece model on `texts` (one document each); returns the path of `<model_prefix>.model`.

  Normalization is off, whitespace kept and '\\n' a piece of its own, so decode(encode(text)) == text (byte fallback
  covers characters never seen in training).
  """
  model_path, model = epath.Path(f'{model_prefix}.model'), io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=(text for text in texts if text),  # sentencepiece rejects empty sentences
        model_writer=model, vocab_size=vocab_size, model_type='bpe', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        normalization_rule_name='identity', remove_extra_whitespaces=False, user_defined_symbols=['\n'],
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, max_sentence_length=1 << 16, minloglevel=2)
  except RuntimeError as error:
    raise DataError(f'SentencePiece training for {model_path} failed (vocab_size={vocab_size}): {error}') from error
  model_path.parent.mkdir(parents=True, exist_ok=True)
  model_path.write_bytes(model.getvalue())
  return str(model_path)


def make_tokenizer(data_config) -> Tokenizer:
  """The tokenizer `data_config.tokenizer` names ('byte' or 'sentencepiece' from `data_config.tokenizer_path`)."""
  if data_config.tokenizer not in KNOWN_TOKENIZERS:
    raise DataError(f'Unknown data.tokenizer {data_config.tokenizer!r}; allowed: {", ".join(KNOWN_TOKENIZERS)}.')
  if data_config.tokenizer == 'byte':
    return ByteTokenizer()
  if not data_config.tokenizer_path:
    raise DataError("data.tokenizer='sentencepiece' needs data.tokenizer_path, the path of a .model file.")
  return SentencePieceTokenizer.from_file(data_config.tokenizer_path)


def save_tokenizer(tokenizer: Tokenizer, workdir: str) -> None:
  """Writes `workdir/tokenizer.json` (and a copy of a sentencepiece model as `workdir/tokenizer.model`)."""
  rundir.root(workdir).mkdir(parents=True, exist_ok=True)
  record = {key: getattr(tokenizer, key) for key in ('name', *RECORDED_IDS)}
  if tokenizer.name == 'sentencepiece':
    (rundir.root(workdir) / rundir.SENTENCEPIECE_MODEL).write_bytes(tokenizer.model_proto)
    record.update(model_file=rundir.SENTENCEPIECE_MODEL, trained_from=tokenizer.path)
  rundir.tokenizer_file(workdir).write_text(json.dumps(record, indent=2) + '\n')


def load_tokenizer(workdir: str) -> Tokenizer:
  """The tokenizer `save_tokenizer` recorded in `workdir`, checked against the recorded ids."""
  record_path = rundir.tokenizer_file(workdir)
  if not record_path.is_file():
    raise NotFoundError(f'{record_path} does not exist: {workdir} is not a perijax workdir, or its run predates '
                        'tokenizer recording.')
  record = json.loads(record_path.read_text())
  if record['name'] not in KNOWN_TOKENIZERS:
    raise DataError(f'{record_path} names tokenizer {record["name"]!r}; known: {", ".join(KNOWN_TOKENIZERS)}.')
  tokenizer = (ByteTokenizer() if record['name'] == 'byte' else
               SentencePieceTokenizer.from_file(str(rundir.root(workdir) / record['model_file'])))
  read_back = {key: getattr(tokenizer, key) for key in RECORDED_IDS}
  if read_back != {key: record[key] for key in RECORDED_IDS}:
    raise DataError(f'{record_path} records {", ".join(f"{key}={record[key]}" for key in RECORDED_IDS)} but the '
                    f'tokenizer read back has {read_back}.')
  return tokenizer
