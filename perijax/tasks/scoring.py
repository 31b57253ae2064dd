"""Zero-shot multiple-choice scoring, exactly as EleutherAI's lm-evaluation-harness (lm-eval) does it.

A choice's score is the sum of its continuation tokens' log-probabilities given the context. `acc` takes the argmax
of those sums, `acc_norm` the argmax of the sums divided by the choice's length in characters. Where a rule is
lm-eval's, the comment names the lm-eval file (snapshot 4e7e0d47, v0.4.13.dev0; the same logic since v0.4.3).
"""

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perijax.errors import DataError
from perijax.progress import progress

# logprobs_fn(inputs [B, T], positions [B, T], segment_ids [B, T]) -> log-softmax [B, T, V].
LogprobsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], jax.Array]


class MultipleChoiceItem(NamedTuple):
  """One document: a (context, continuation) request per choice, and the gold choice.

  `choice_texts` are the strings lm-eval's `doc_to_choice` returns; `acc_norm` divides by their length in characters.
  For most tasks they are the continuations without the target delimiter " "; for Winogrande (lm-eval's
  "multiple_input" mode) they are the option-filled contexts, as in lm-eval's `process_results`.
  """
  requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
  choice_texts: tuple[str, ...]
  gold: int


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
  """Moves the context's trailing whitespace to the front of the continuation.

  lm-eval `lm_eval/api/model.py` TemplateLM._encode_pair: `n_spaces = len(context) - len(context.rstrip())`, then
  `continuation = context[-n_spaces:] + continuation; context = context[:-n_spaces]`.
  """
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  return context, continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation tokens as lm-eval computes them for a causal LM.

  lm-eval `lm_eval/api/model.py` TemplateLM._encode_pair: the continuation's tokens are the joint tokenization minus
  the context's, `tok(context + continuation)[len(tok(context)):]`, so a leading space merges with the first word as
  the tokenizer would merge it in running text. The beginning-of-sequence token is added later, by `loglikelihoods`.
  """
  context, continuation = split_whitespace(context, continuation)
  context_tokens = list(tokenizer.encode(context))
  whole_tokens = list(tokenizer.encode(context + continuation))
  return context_tokens, whole_tokens[len(context_tokens):]


def _pack_request(context: Sequence[int], continuation: Sequence[int], seq_len: int, eos_id: int):
  """The model's input row for one request, and where its continuation's predictions are.

  The model reads `[eos] + tokens` (eos doubles as beginning-of-sequence, as in training). lm-eval
  `lm_eval/models/huggingface.py` _loglikelihood_tokens:
  `inp = (context_enc + continuation_enc)[-(max_length + 1):][:-1]` (left truncation keeps the end), and the
  continuation is scored at the last `len(continuation_enc)` positions. lm-eval's empty-context rule (context_enc =
  [prefix token]) is what the leading eos gives here for every request.
  """
  if not continuation:
    raise ValueError('a continuation must have at least one token (lm-eval scores a non-empty continuation)')
  if len(continuation) > seq_len:
    raise DataError(f'a continuation of {len(continuation)} tokens does not fit seq_len={seq_len}; '
                     'lm-eval requires len(continuation) <= max_length')
  tokens = ([eos_id] + list(context) + list(continuation))[-(seq_len + 1):]
  inputs, targets = tokens[:-1], tokens[1:]
  first = len(inputs) - len(continuation)  # first position whose prediction is a continuation token
  return inputs, targets, first


@jax.jit
def _target_logprobs(logprobs, targets):
  """Log-probability of each target token and whether it is the argmax, [B, T] each (the [B, T, V] stays on device)."""
  logprobs = logprobs.astype(jnp.float32)
  target_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return target_logprob, jnp.argmax(logprobs, axis=-1) == targets


def place_requests(lengths: Sequence[int], seq_len: int, packed: bool) -> tuple[list[tuple[int, int]], int]:
  """(row, first column) of each request, and the number of rows: one request per row, or packed.

  Packed: first-fit decreasing (longest first, each into the first row with room), so a row holds several requests
  as separate documents (segment ids 1, 2, ...; positions restart at 0). The model's segment mask keeps each request
  from seeing the others, so its log-likelihood is the one it gets alone in a row.
  """
  if not packed:
    return [(index, 0) for index in range(len(lengths))], len(lengths)
  places = [(0, 0)] * len(lengths)
  free = np.zeros(len(lengths), np.int64)  # columns left in each open row
  rows = 0
  for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    fits = np.flatnonzero(free[:rows] >= lengths[index])
    row = int(fits[0]) if len(fits) else rows
    if row == rows:
      free[row], rows = seq_len, rows + 1
    places[index] = (row, int(seq_len - free[row]))
    free[row] -= lengths[index]
  return places, rows


def loglikelihoods(requests: Sequence[tuple[Sequence[int], Sequence[int]]], logprobs_fn: LogprobsFn, *,
                   batch_size: int, seq_len: int, eos_id: int, desc: str = 'scoring',
                   packed: bool = True) -> list[tuple[float, bool]]:
  """`(loglikelihood, is_greedy)` per request, in order (lm-eval's `_loglikelihood_tokens` return value): the sum of
  each continuation's token log-probs given its context, and whether greedy decoding would produce it.

  `requests` are (context tokens, continuation tokens) pairs without the beginning-of-sequence token `eos_id`.
  `logprobs_fn` is called on fixed [batch_size, seq_len] arrays: padding columns have segment id 0, and rows that fill
  the last batch are a lone `eos_id`, ignored. Longer requests keep their last seq_len + 1 tokens. `packed`: several
  requests per row (`place_requests`), else one each; `desc` labels the progress bar.
  """
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f'batch_size and seq_len must be >= 1, got batch_size={batch_size}, seq_len={seq_len}')
  windows = [_pack_request(context, continuation, seq_len, eos_id) for context, continuation in requests]
  places, num_rows = place_requests([len(inputs) for inputs, _, _ in windows], seq_len, packed)
  members = [[] for _ in range(num_rows)]  # (request, first column) per row, left to right: segments 1, 2, ...
  for index, (row, column) in sorted(enumerate(places), key=lambda place: place[1]):
    members[row].append((index, column))
  results = [None] * len(windows)
  for start in progress(range(0, num_rows, batch_size), desc, unit='batch'):
    batch_members = members[start:start + batch_size]
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    inputs[len(batch_members):, 0] = targets[len(batch_members):, 0] = eos_id  # filler rows: a lone eos
    segment_ids[len(batch_members):, 0] = 1
    for row, row_members in enumerate(batch_members):
      for segment, (index, column) in enumerate(row_members, start=1):
        request_inputs, request_targets, _ = windows[index]
        columns = slice(column, column + len(request_inputs))
        inputs[row, columns], targets[row, columns] = request_inputs, request_targets
        segment_ids[row, columns] = segment
        positions[row, columns] = np.arange(len(request_inputs))
    target_logprob, is_argmax = _target_logprobs(logprobs_fn(inputs, positions, segment_ids), targets)
    target_logprob, is_argmax = np.asarray(target_logprob), np.asarray(is_argmax)
    for row, row_members in enumerate(batch_members):
      for index, column in row_members:
        request_inputs, _, first = windows[index]
        span = slice(column + first, column + len(request_inputs))
        # lm-eval sums the gathered float32 log-probs; summing in float64 differs only in the last bits.
        results[index] = (float(np.sum(target_logprob[row, span], dtype=np.float64)),
                          bool(np.all(is_argmax[row, span])))
  return results


def choose(loglikelihood_per_choice: Sequence[float], choice_texts: Sequence[str]) -> tuple[int, int]:
  """Predicted index for `acc` and for `acc_norm`.

  lm-eval `lm_eval/api/task.py` ConfigurableTask.process_results: `pred = np.argmax(lls)`,
  `completion_len = [float(len(choice)) for choice in choices]` (Unicode characters of the choice, delimiter excluded),
  `pred_norm = np.argmax(lls / completion_len)`. `np.argmax` breaks ties towards the lowest index. An empty choice
  would divide by zero; it counts as length 1 here (no real task has one).
  """
  lls = np.asarray(loglikelihood_per_choice, np.float64)
  lengths = np.asarray([max(len(text), 1) for text in choice_texts], np.float64)
  return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def score_multiple_choice(items: Sequence[MultipleChoiceItem], tokenizer, logprobs_fn: LogprobsFn, *,
                          batch_size: int, seq_len: int, desc: str = 'scoring', packed: bool = True) -> dict:
  """`{"acc", "acc_norm", "n"}` over the items: the mean over documents of lm-eval's acc and acc_norm.

  `packed`: several requests per model row (see `loglikelihoods`); the log-likelihoods are the same either way.
  """
  if not items:
    raise ValueError('no items to score')
  requests, owners = [], []
  for index, item in enumerate(items):
    if len(item.requests) != len(item.choice_texts) or not 0 <= item.gold < len(item.requests):
      raise ValueError(f'item {index}: {len(item.requests)} requests, {len(item.choice_texts)} choice texts and gold '
                       f'{item.gold}; gold must index the choices and there must be one request per choice')
    for context, continuation in item.requests:
      requests.append(encode_pair(tokenizer, context, continuation))
      owners.append(index)
  results = loglikelihoods(requests, logprobs_fn, batch_size=batch_size, seq_len=seq_len, eos_id=tokenizer.eos_id,
                           desc=desc, packed=packed)
  lls_per_item = [[] for _ in items]
  for owner, (ll, _) in zip(owners, results):
    lls_per_item[owner].append(ll)
  correct, correct_norm = 0, 0
  for item, lls in zip(items, lls_per_item):
    pred, pred_norm = choose(lls, item.choice_texts)
    correct += pred == item.gold
    correct_norm += pred_norm == item.gold
  return {'acc': correct / len(items), 'acc_norm': correct_norm / len(items), 'n': len(items)}
