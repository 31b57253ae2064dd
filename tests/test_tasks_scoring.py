"""lm-eval scoring: log-likelihood batching and truncation, whitespace handling, acc vs acc_norm, ties."""

import math
import re

import numpy as np
import pytest

from perijax.tasks import paper_tasks
from perijax.tasks import scoring
from perijax.tasks.scoring import MultipleChoiceItem


class ByteTokenizer:
  """UTF-8 bytes + 2 (0 = padding, 1 = eos), the project's byte tokenizer, kept local so the test stands alone."""
  pad_id, eos_id, vocab_size = 0, 1, 258

  def encode(self, text):
    return [byte + 2 for byte in text.encode('utf-8')]


class WordTokenizer:
  """GPT-2-like: a word carries its leading space (' yes' is one token), so joint tokenization merges the delimiter."""
  pad_id, eos_id = 0, 1

  def __init__(self):
    self.vocab = {}

  def encode(self, text):
    return [self.vocab.setdefault(piece, len(self.vocab) + 2) for piece in re.findall(r'\s*\S+|\s+', text)]


VOCAB = 258
POSITIONS = 16


@pytest.fixture(scope='module')
def position_bigram_table():
  """log p(next | previous token, position): a fixed random table, so truncation (which shifts positions) shows."""
  logits = np.random.default_rng(0).normal(size=(POSITIONS, VOCAB, VOCAB)) * 2
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def make_table_model(table, calls):
  def logprobs_fn(inputs, positions, segment_ids):
    calls.append((np.array(inputs), np.array(positions), np.array(segment_ids)))
    out = table[np.asarray(positions) % POSITIONS, np.asarray(inputs)].astype(np.float32)
    return np.where(np.asarray(segment_ids)[..., None] > 0, out, np.nan)  # padding must never be read
  return logprobs_fn


def brute_force(table, context, continuation, seq_len, eos_id):
  """One request at a time, straight from the definition: score the continuation tokens of the kept window."""
  tokens = ([eos_id] + context + continuation)[-(seq_len + 1):]
  total, greedy = 0.0, True
  for target_index in range(len(tokens) - len(continuation), len(tokens)):
    position = target_index - 1
    row = table[position % POSITIONS, tokens[position]]
    total += float(np.float32(row[tokens[target_index]]))
    greedy &= int(np.argmax(row.astype(np.float32))) == tokens[target_index]
  return total, greedy


@pytest.mark.parametrize('packed', [False, True])
def test_loglikelihoods_match_brute_force_with_batching_and_left_truncation(position_bigram_table, packed):
  rng = np.random.default_rng(1)
  seq_len, batch_size = 12, 3
  requests = []
  for context_len, continuation_len in [(0, 1), (3, 2), (5, 1), (11, 3), (20, 4), (2, 12), (30, 12), (1, 1), (0, 2)]:
    requests.append((rng.integers(2, VOCAB, context_len).tolist(), rng.integers(2, VOCAB, continuation_len).tolist()))
  calls = []
  results = scoring.loglikelihoods(requests, make_table_model(position_bigram_table, calls), batch_size=batch_size,
                                   seq_len=seq_len, eos_id=1, packed=packed)
  # Packed, the nine requests (2, 4, 6, 12, 12, 12, 12, 3, 3 columns) fill five rows, not nine: two calls, not three.
  assert len(calls) == (2 if packed else math.ceil(len(requests) / batch_size))
  for inputs, positions, segment_ids in calls:
    assert inputs.shape == positions.shape == segment_ids.shape == (batch_size, seq_len)
    for row in range(batch_size):
      used = int((segment_ids[row] > 0).sum())
      assert (segment_ids[row, used:] == 0).all()
      ids = segment_ids[row, :used]
      assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)  # documents 1, 2, ... in a row
      assert packed or ids.max() == 1
      for segment in np.unique(ids):  # each request's positions restart at 0
        np.testing.assert_array_equal(positions[row][segment_ids[row] == segment], np.arange((ids == segment).sum()))
  for (context, continuation), (ll, greedy) in zip(requests, results):
    expected_ll, expected_greedy = brute_force(position_bigram_table, context, continuation, seq_len, 1)
    assert ll == pytest.approx(expected_ll, rel=1e-6, abs=1e-5)
    assert greedy == expected_greedy
  if not packed:  # the truncated request (30 + 12 tokens) starts mid-context, not at eos: its first input is context
    assert calls[2][0][0, 0] == requests[6][0][-1]


def test_requests_are_placed_first_fit_longest_first():
  # Longest first: 7 -> row 0 (1 left); 5 -> row 1 (3 left); 4 -> row 2 (4 left); 3 -> row 1 at column 5; 2 -> row 2
  # at column 4 (row 0 has no room).
  assert scoring.place_requests([5, 3, 7, 2, 4], 8, packed=True) == ([(1, 0), (1, 5), (0, 0), (2, 4), (2, 0)], 3)
  assert scoring.place_requests([5, 3, 7], 8, packed=False) == ([(0, 0), (1, 0), (2, 0)], 3)
  assert scoring.place_requests([8, 8, 1], 8, packed=True) == ([(0, 0), (1, 0), (2, 0)], 3)


def test_is_greedy_when_every_continuation_token_is_the_argmax(position_bigram_table):
  context = [5, 6, 7]
  tokens = [1] + context
  for _ in range(4):  # follow the table's argmax from the last context token
    position = len(tokens) - 1
    tokens.append(int(np.argmax(position_bigram_table[position, tokens[-1]].astype(np.float32))))
  continuation = tokens[len(context) + 1:]
  wrong = continuation[:-1] + [(continuation[-1] + 1) % VOCAB]
  (_, greedy), (_, not_greedy) = scoring.loglikelihoods(
      [(context, continuation), (context, wrong)], make_table_model(position_bigram_table, []), batch_size=2,
      seq_len=16, eos_id=1)
  assert greedy and not not_greedy


def test_continuation_longer_than_seq_len_is_an_error(position_bigram_table):
  with pytest.raises(ValueError, match='does not fit seq_len=4'):
    scoring.loglikelihoods([([3], [4] * 5)], make_table_model(position_bigram_table, []), batch_size=1, seq_len=4,
                           eos_id=1)


def test_trailing_context_whitespace_moves_to_the_continuation():
  assert scoring.split_whitespace('Answer: ', 'yes') == ('Answer:', ' yes')
  assert scoring.split_whitespace('Answer:\n ', 'yes') == ('Answer:', '\n yes')
  assert scoring.split_whitespace('Answer:', ' yes') == ('Answer:', ' yes')
  tokenizer = ByteTokenizer()
  context, continuation = scoring.encode_pair(tokenizer, 'Q: hi\nA: ', 'yes')
  assert context == tokenizer.encode('Q: hi\nA:') and continuation == tokenizer.encode(' yes')


def test_continuation_tokens_come_from_the_joint_tokenization():
  tokenizer = WordTokenizer()
  context, continuation = scoring.encode_pair(tokenizer, 'Question: is it?\nAnswer:', ' yes')
  assert continuation == [tokenizer.vocab[' yes']]  # one merged token, not ' ' then 'yes'
  assert ' ' not in tokenizer.vocab
  # The same when the space arrives as the context's trailing whitespace.
  assert scoring.encode_pair(tokenizer, 'Question: is it?\nAnswer: ', 'yes') == (context, continuation)


class UnigramModel:
  """log p(token) fixed per byte whatever the context: hand-computable sums."""

  def __init__(self, logprob_of_char):
    self.table = np.full(VOCAB, -3.0, np.float32)
    for char, logprob in logprob_of_char.items():
      self.table[ord(char) + 2] = logprob

  def __call__(self, inputs, positions, segment_ids):
    return np.broadcast_to(self.table, inputs.shape + (VOCAB,))


def test_acc_and_acc_norm_disagree_on_hand_computed_items():
  # ' ' = -1, 'a' = -2, 'b' = -1 per token:  " aa" -> -5 (norm -5/2 = -2.5);  " bbbbbb" -> -7 (norm -7/6 = -1.17).
  # acc picks "aa" (-5 > -7); acc_norm picks "bbbbbb" (-1.17 > -2.5).
  model = UnigramModel({' ': -1.0, 'a': -2.0, 'b': -1.0})
  def item(gold):
    return MultipleChoiceItem(requests=(('Q:', ' aa'), ('Q:', ' bbbbbb')), choice_texts=('aa', 'bbbbbb'), gold=gold)
  assert scoring.choose([-5.0, -7.0], ['aa', 'bbbbbb']) == (0, 1)
  result = scoring.score_multiple_choice([item(1), item(1), item(0)], ByteTokenizer(), model, batch_size=4, seq_len=8)
  assert result == {'acc': pytest.approx(1 / 3), 'acc_norm': pytest.approx(2 / 3), 'n': 3}
  lls = scoring.loglikelihoods([scoring.encode_pair(ByteTokenizer(), 'Q:', ' aa'),
                                scoring.encode_pair(ByteTokenizer(), 'Q:', ' bbbbbb')], model, batch_size=2,
                               seq_len=8, eos_id=1)
  assert [ll for ll, _ in lls] == [-5.0, -7.0]


def test_acc_norm_divides_by_characters_not_bytes():
  # "éé" is 2 characters but 4 bytes. Characters: -3.0/2 = -1.5 < -4.4/3 = -1.47 -> choice 1;
  # bytes would give -3.0/4 = -0.75 > -1.47 -> choice 0.
  assert scoring.choose([-3.0, -4.4], ['éé', 'abc']) == (0, 1)


def test_winogrande_scores_the_shared_suffix_after_each_option(position_bigram_table):
  doc = {'sentence': 'The cup fell off the table because _ was wobbly.', 'option1': 'the cup', 'option2': 'the table',
         'label': 1}
  item = paper_tasks.winogrande_item(doc)
  tokenizer = ByteTokenizer()
  pairs = [scoring.encode_pair(tokenizer, context, continuation) for context, continuation in item.requests]
  assert pairs[0][1] == pairs[1][1] == tokenizer.encode(' was wobbly.')
  assert pairs[0][0] != pairs[1][0]
  results = scoring.loglikelihoods(pairs, make_table_model(position_bigram_table, []), batch_size=2, seq_len=64,
                                   eos_id=1)
  expected = [brute_force(position_bigram_table, context, continuation, 64, 1)[0] for context, continuation in pairs]
  assert [ll for ll, _ in results] == pytest.approx(expected, rel=1e-6)
  assert expected[0] != pytest.approx(expected[1])  # the contexts matter even though the scored tokens are the same
  result = scoring.score_multiple_choice([item], tokenizer, make_table_model(position_bigram_table, []), batch_size=2,
                                         seq_len=64)
  assert result['acc'] == float(int(np.argmax(expected)) == 1)


def uniform_model(inputs, positions, segment_ids):
  return np.full(inputs.shape + (VOCAB,), -math.log(VOCAB), np.float32)


def test_constant_logits_tie_to_the_first_choice_and_acc_norm_prefers_long_choices():
  tokenizer = ByteTokenizer()
  (ll, greedy), = scoring.loglikelihoods([([5, 6], [7, 8, 9])], uniform_model, batch_size=2, seq_len=8, eos_id=1)
  assert ll == pytest.approx(-3 * math.log(VOCAB), rel=1e-6)
  assert not greedy  # argmax of a constant row is token 0 (padding), never a byte
  same_length = [MultipleChoiceItem(requests=tuple(('Q:', ' ' + c) for c in 'abcd'), choice_texts=tuple('abcd'),
                                    gold=gold) for gold in range(4)]
  result = scoring.score_multiple_choice(same_length, tokenizer, uniform_model, batch_size=4, seq_len=8)
  assert result == {'acc': 0.25, 'acc_norm': 0.25, 'n': 4}  # every tie goes to index 0: right once in four
  # Lengths differ: ll = -(len + 1) ln V is highest for the shortest choice ('a', index 2), and ll / len =
  # -(1 + 1/len) ln V for the longest ('abcd', first at index 1; the tie with index 3 goes to the first).
  choices = ('ab', 'abcd', 'a', 'abcd')
  varied = [MultipleChoiceItem(requests=tuple(('Q:', ' ' + c) for c in choices), choice_texts=choices, gold=gold)
            for gold in (2, 1, 3)]
  result = scoring.score_multiple_choice(varied, tokenizer, uniform_model, batch_size=4, seq_len=8)
  assert result == {'acc': pytest.approx(1 / 3), 'acc_norm': pytest.approx(1 / 3), 'n': 3}


def test_malformed_items_are_rejected():
  with pytest.raises(ValueError, match='gold must index the choices'):
    scoring.score_multiple_choice([MultipleChoiceItem((('a', ' b'),), ('b',), gold=1)], ByteTokenizer(),
                                  uniform_model, batch_size=1, seq_len=8)
  with pytest.raises(ValueError, match='no items'):
    scoring.score_multiple_choice([], ByteTokenizer(), uniform_model, batch_size=1, seq_len=8)
