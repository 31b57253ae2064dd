"""`next_line`: built deterministically from a corpus's test split; valid items; read through TFDS; clear errors."""

import random

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import perijax.tasks
from perijax.tasks import next_line, paper_tasks, scoring

FAKE_CORPUS = 'perijax_test_next_line_corpus'  # not the real name: the real builder may be registered in this process


def play_lines(count):
  lines = []
  for index in range(count):
    if index % 9 == 4:
      lines.append('Exeunt.')  # repeated: choices must still be distinct
    elif index == 20:
      lines.append(('A speech so long that no line of verse would ever reach it, ' * 3).rstrip())  # > MAX_LINE_CHARS
    else:
      lines.append(f'  Line {index} of the play,{" and so on" * (index % 4)} spoken aloud.')
  return lines


WORKS = {
    'shakespeare/fake_play': play_lines(70),
    'milton/fake_poem': [f'Verse {index} of the poem{"," * (index % 3)} in order' for index in range(49)],
    'milton/too_short': ['One line.', 'Two lines.'],
}


def passages_of(lines, per_passage=5):
  """Corpus-style passages: blocks of lines joined by "\\n", blank lines between blocks."""
  chunks = [lines[start:start + per_passage] for start in range(0, len(lines), per_passage)]
  return ['\n'.join(chunk[:2]) + '\n\n' + '\n'.join(chunk[2:]) if len(chunk) > 2 else '\n'.join(chunk)
          for chunk in chunks]


class PerijaxTestNextLineCorpus(tfds.core.GeneratorBasedBuilder):
  """The corpus's features (text, work, passage_index) over WORKS; only the test split matters here."""
  VERSION = tfds.core.Version('1.0.0')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None  # nothing to download; keeps TFDS from looking for a checksums file beside this test

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'work': tfds.features.Text(), 'passage_index': np.int64}))

  def _split_generators(self, dl_manager):
    return {'test': self._generate_examples()}

  def _generate_examples(self):
    for work, lines in WORKS.items():
      for index, passage in enumerate(passages_of(lines)):
        yield f'{work}:{index}', {'text': passage, 'work': work, 'passage_index': index}


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('corpus'))
  PerijaxTestNextLineCorpus(data_dir=data_dir, file_format='array_record').download_and_prepare()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(next_line, 'CORPUS_NAME', FAKE_CORPUS)
    yield data_dir


@pytest.fixture(scope='module')
def corpus_examples(corpus_dir):
  source = next_line.read_corpus_test_split(corpus_dir)
  return [source[index] for index in range(len(source))]


@pytest.fixture(scope='module')
def items(corpus_examples):
  return next_line.build_items(corpus_examples)


def test_work_lines_rebuild_each_work_in_order_from_the_shuffled_split(corpus_examples):
  assert isinstance(corpus_examples[0]['text'], bytes)  # a prepared data source gives bytes; both are accepted
  rebuilt = next_line.work_lines(corpus_examples)
  assert rebuilt == WORKS
  assert next_line.work_lines(reversed(corpus_examples)) == WORKS


def test_items_are_valid(items):
  assert len(items) == 9 + 7  # windows of 7 lines: 70 -> 10 less the one whose true line (20) is too long; 49 -> 7
  for item in items:
    work = next(name for name, lines in WORKS.items() if item.choice_texts[0] in lines)
    lines = WORKS[work]
    context = item.requests[0][0]
    context_lines = context.split('\n')
    true_line = item.choice_texts[item.gold]
    starts = [i for i in range(len(lines)) if lines[i:i + len(context_lines)] == context_lines]
    assert any(lines[start + len(context_lines)] == true_line for start in starts)  # gold is the true next line
    assert len(set(item.choice_texts)) == 4 and all(choice in lines for choice in item.choice_texts)  # same work
    assert all(len(choice) <= next_line.MAX_LINE_CHARS for choice in item.choice_texts)
    assert len(context) <= next_line.MAX_CONTEXT_CHARS
    assert item.requests == tuple((context, '\n' + choice) for choice in item.choice_texts)


def test_items_are_deterministic_and_spread(corpus_examples, items):
  shuffled = list(corpus_examples)
  random.Random(3).shuffle(shuffled)
  assert next_line.build_items(shuffled) == items
  assert len({item.gold for item in items}) > 1  # the true line is not always in the same place
  first_works = {('Verse' in item.choice_texts[item.gold]) for item in items[:2]}
  assert first_works == {True, False}  # works interleave, so the first N items span the corpus


def test_long_true_lines_are_skipped():
  lines = [f'line {index}' for index in range(7)]
  lines[6] = 'x' * (next_line.MAX_LINE_CHARS + 1)
  assert next_line.work_items('w', lines) == []
  lines[6] = 'short enough'
  (item,) = next_line.work_items('w', lines)
  assert item.choice_texts[item.gold] == 'short enough' and item.requests[0][0] == '\n'.join(lines[:6])


def test_evaluate_next_line_with_a_uniform_model(corpus_dir, items):
  eval_config = ml_collections.ConfigDict(dict(max_examples=5, tasks_data_dir='', hellaswag_path='', siqa_path=''))
  data_config = ml_collections.ConfigDict(dict(name='shakespeare_milton', data_dir=corpus_dir))

  class ByteTokenizer:
    eos_id = 1

    def encode(self, text):
      return [byte + 2 for byte in text.encode('utf-8')]

  def uniform_model(inputs, positions, segment_ids):
    return np.full(inputs.shape + (258,), -np.log(258.0), np.float32)

  result = scoring.score_multiple_choice(perijax.tasks.load_task_items('next_line', eval_config, data_config),
                                        ByteTokenizer(), uniform_model, batch_size=8, seq_len=512)
  first = items[:5]
  # Uniform log-probs: ll = -(bytes + 1) ln V, so acc picks the shortest choice (in bytes; the first if tied), and
  # acc_norm the one with the most characters (lines here are ASCII).
  expected_acc = np.mean([int(np.argmin([len(c) for c in item.choice_texts])) == item.gold for item in first])
  expected_norm = np.mean([int(np.argmax([len(c) for c in item.choice_texts])) == item.gold for item in first])
  assert result == {'acc': pytest.approx(expected_acc), 'acc_norm': pytest.approx(expected_norm), 'n': 5}


def test_missing_corpus_says_how_to_prepare_it(tmp_path, monkeypatch):
  monkeypatch.setattr(next_line, 'CORPUS_NAME', 'shakespeare_milton')
  with pytest.raises(FileNotFoundError, match=r"'shakespeare_milton' split 'test'.*python -m perijax.data.corpus"):
    next_line.next_line_items(str(tmp_path), max_examples=0)
  assert paper_tasks.as_text(b'\xc3\xa9') == 'é'


def test_distractors_match_the_true_line_in_length_so_length_alone_is_chance(monkeypatch):
  # As in a play: short speaker names recur (one entry each in the distinct pool) between speeches of any length, so
  # true lines are short far more often than lines drawn from the pool. A model that scores only the token count
  # (constant logits) must not beat chance.
  rng = np.random.default_rng(0)
  names = ['HAMLET.', 'OPHELIA.', 'POLONIUS.', 'KING.', 'QUEEN.', 'HORATIO.']
  lines = []
  for i in range(400):
    lines += [names[i % len(names)], f'speech {i} ' + 'x' * int(rng.integers(5, 80))]

  def shortest_wins(items):
    return np.mean([int(np.argmin([len(c) for c in item.choice_texts])) == item.gold for item in items])

  assert shortest_wins(next_line.work_items('shakespeare/hamlet', lines)) < 0.4  # chance 0.25, n = 114
  monkeypatch.setattr(next_line, 'DISTRACTOR_POOL', 10**9)  # distractors drawn from the whole work instead
  assert shortest_wins(next_line.work_items('shakespeare/hamlet', lines)) > 0.55
