"""Byte and SentencePiece tokenizers: round trips, special ids, and the record in the workdir."""

import pickle

import ml_collections
import pytest

from perijax import rundir
from perijax.data import tokenizers

SAMPLE = 'To be, or not to be:\n  that is the question —  é€ 😀\n\n'


def _data_config(**overrides):
  return ml_collections.ConfigDict({'tokenizer': 'byte', 'tokenizer_path': '', **overrides})


def _training_texts():
  speakers = ['Hamlet', 'Ophelia', 'Horatio', 'Polonius', 'Laertes']
  verbs = ['speaks', 'weeps', 'listens', 'waits', 'laughs', 'sings']
  return [f'{speakers[i % 5]} {verbs[i % 6]} beside the castle wall, line {i}.\nAnd answers softly, {i * 7 % 13}.'
          for i in range(300)]


@pytest.fixture(scope='module')
def sentencepiece_model(tmp_path_factory):
  prefix = tmp_path_factory.mktemp('spm') / 'tiny'
  return tokenizers.train_sentencepiece(_training_texts(), vocab_size=400, model_prefix=str(prefix))


def test_byte_tokenizer_matches_the_contract():
  tokenizer = tokenizers.ByteTokenizer()
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size, tokenizer.name) == (0, 1, 258, 'byte')
  assert tokenizer.encode('Ab') == [ord('A') + 2, ord('b') + 2]
  assert tokenizer.encode(SAMPLE) == [b + 2 for b in SAMPLE.encode('utf-8')]
  assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE


def test_byte_decode_skips_specials_and_replaces_broken_utf8():
  tokenizer = tokenizers.ByteTokenizer()
  ids = [1, 0] + tokenizer.encode('hi') + [1, 0, 0]
  assert tokenizer.decode(ids) == 'hi'
  assert tokenizer.decode([0xC3 + 2]) == '\ufffd'  # a lone UTF-8 lead byte


def test_sentencepiece_round_trips_and_has_contract_ids(sentencepiece_model):
  tokenizer = tokenizers.SentencePieceTokenizer.from_file(sentencepiece_model)
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.name) == (0, 1, 'sentencepiece')
  assert tokenizer.vocab_size == 400
  for text in _training_texts()[:20] + [SAMPLE, '  leading and  double  spaces ']:
    ids = tokenizer.encode(text)
    assert all(i not in (tokenizer.pad_id, tokenizer.eos_id) for i in ids)
    assert tokenizer.decode(ids) == text
  # Pieces longer than one character were learned: it compresses its training text.
  text = _training_texts()[0]
  assert len(tokenizer.encode(text)) < len(text) / 2


def test_sentencepiece_survives_pickling_for_grain_workers(sentencepiece_model):
  tokenizer = tokenizers.SentencePieceTokenizer.from_file(sentencepiece_model)
  clone = pickle.loads(pickle.dumps(tokenizer))
  assert clone.encode(SAMPLE) == tokenizer.encode(SAMPLE)


@pytest.mark.parametrize('kind', ['byte', 'sentencepiece'])
def test_workdir_record_restores_the_same_tokenizer(kind, sentencepiece_model, tmp_path):
  config = _data_config(tokenizer=kind, tokenizer_path=sentencepiece_model if kind == 'sentencepiece' else '')
  tokenizer = tokenizers.make_tokenizer(config)
  tokenizers.save_tokenizer(tokenizer, str(tmp_path / 'workdir'))
  restored = tokenizers.load_tokenizer(str(tmp_path / 'workdir'))
  assert (restored.name, restored.vocab_size, restored.pad_id, restored.eos_id) == (
      tokenizer.name, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id)
  assert restored.encode(SAMPLE) == tokenizer.encode(SAMPLE)
  if kind == 'sentencepiece':  # the workdir holds its own copy of the model
    assert (tmp_path / 'workdir' / rundir.SENTENCEPIECE_MODEL).read_bytes() == open(sentencepiece_model, 'rb').read()


def test_bad_tokenizer_settings_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown data.tokenizer 'bpe'; allowed: byte, sentencepiece"):
    tokenizers.make_tokenizer(_data_config(tokenizer='bpe'))
  with pytest.raises(ValueError, match='needs data.tokenizer_path'):
    tokenizers.make_tokenizer(_data_config(tokenizer='sentencepiece'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tokenizers.make_tokenizer(_data_config(tokenizer='sentencepiece', tokenizer_path=str(tmp_path / 'no.model')))
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='not a readable SentencePiece model'):
    tokenizers.make_tokenizer(_data_config(tokenizer='sentencepiece', tokenizer_path=str(garbage)))
  with pytest.raises(FileNotFoundError, match='not a perijax workdir'):
    tokenizers.load_tokenizer(str(tmp_path / 'empty_workdir'))
