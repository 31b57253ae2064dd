"""Zero-shot multiple-choice scoring, exactly as EleutherAI's lm-evaluation-harness (lm-eval) does it (see
docs/evaluation.md). Comments name the lm-eval file each rule comes from (snapshot 4e7e0d47, v0.4.13.dev0; the same
logic since v0.4.3)."""

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perijax.errors import DataError
from perijax.progress import progress

# logprobs_fn(inputs [B, T], positions [B, T], segment_ids [B, T]) -> log-softmax [B, T, V].
LogprobsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], jax.Array]


class MultipleChoiceItem(NamedTuple):
  """One document: a (context, continuation) request per choice, and the gold choice. `choice_texts` are lm-eval's
  `doc_to_choice` (acc_norm's lengths): the continuations without the delimiter " ", or Winogrande's contexts."""
  requests: tuple[tuple[str, str], ...]
  choice_texts: tuple[str, ...]
  gold: int


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
  """Moves the context's trailing whitespace to the front of the continuation (lm-eval `lm_eval/api/model.py`
  TemplateLM._encode_pair: `n_spaces = len(context) - len(context.rstrip())`)."""
  stripped = context.rstrip()
  return stripped, context[len(stripped):] + continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation tokens as lm-eval's TemplateLM._encode_pair computes them for a causal LM:
  `tok(context + continuation)[len(tok(context)):]`, so a leading space merges with the first word as in running text.
  The beginning-of-sequence token is added later, by `loglikelihoods`."""
  context, continuation = split_whitespace(context, continuation)
  context_tokens = list(tokenizer.encode(context))
  return context_tokens, list(tokenizer.encode(context + continuation))[len(context_tokens):]


@jax.jit
def _target_logprobs(logprobs, targets):
  """Log-probability of each target token and whether it is the argmax, [B, T] each (the [B, T, V] stays on device)."""
  logprobs = logprobs.astype(jnp.float32)
  target_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return target_logprob, jnp.argmax(logprobs, axis=-1) == targets


def place_requests(lengths: Sequence[int], seq_len: int, packed: bool) -> tuple[list[tuple[int, int]], int]:
  """(row, first column) of each request, and the number of rows: one request per row, or packed first-fit decreasing,
  each a document of its own (segment ids 1, 2, ...; positions from 0) that the model's segment mask keeps alone."""
  if not packed:
    return [(index, 0) for index in range(len(lengths))], len(lengths)
  places, free, rows = [(0, 0)] * len(lengths), np.zeros(len(lengths), np.int64), 0  # free: columns left per row
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
  """`(loglikelihood, is_greedy)` per (context tokens, continuation tokens) request, in order, as lm-eval's
  `_loglikelihood_tokens` returns them. `logprobs_fn` gets fixed [batch_size, seq_len] arrays (padding: segment id 0;
  rows filling the last batch: a lone `eos_id`); longer requests keep their last seq_len + 1 tokens."""
  windows = []  # (inputs, targets, first position predicting the continuation) per request
  for context, continuation in requests:
    if not continuation:
      raise ValueError('a continuation must have at least one token (lm-eval scores a non-empty continuation)')
    if len(continuation) > seq_len:
      raise DataError(f'a continuation of {len(continuation)} tokens does not fit seq_len={seq_len}; '
                      'lm-eval requires len(continuation) <= max_length')
    # lm-eval `lm_eval/models/huggingface.py` _loglikelihood_tokens: `inp = (context_enc + continuation_enc)
    # [-(max_length + 1):][:-1]`, left truncation. The leading eos is lm-eval's empty-context rule, for every request.
    tokens = ([eos_id] + list(context) + list(continuation))[-(seq_len + 1):]
    windows.append((tokens[:-1], tokens[1:], len(tokens) - 1 - len(continuation)))
  places, num_rows = place_requests([len(inputs) for inputs, _, _ in windows], seq_len, packed)
  members = [[] for _ in range(num_rows)]  # (request, first column) per row, left to right: segments 1, 2, ...
  for index, (row, column) in sorted(enumerate(places), key=lambda place: place[1]):
    members[row].append((index, column))
  results = [None] * len(windows)
  for start in progress(range(0, num_rows, batch_size), desc, unit='batch'):
    inputs, targets, segment_ids, positions = np.zeros((4, batch_size, seq_len), np.int32)
    spans = []  # (request, row, columns of its continuation's predictions)
    batch_members = members[start:start + batch_size]
    for row, row_members in enumerate(batch_members):
      for segment, (index, column) in enumerate(row_members, start=1):
        request_inputs, request_targets, first = windows[index]
        columns = slice(column, column + len(request_inputs))
        inputs[row, columns], targets[row, columns] = request_inputs, request_targets
        segment_ids[row, columns], positions[row, columns] = segment, np.arange(len(request_inputs))
        spans.append((index, row, slice(column + first, columns.stop)))
    inputs[len(batch_members):, 0] = targets[len(batch_members):, 0] = eos_id  # filler rows: a lone eos
    segment_ids[len(batch_members):, 0] = 1
    target_logprob, is_argmax = map(np.asarray, _target_logprobs(logprobs_fn(inputs, positions, segment_ids), targets))
    for index, row, span in spans:
      # lm-eval sums the gathered float32 log-probs; summing in float64 differs only in the last bits.
      results[index] = (float(np.sum(target_logprob[row, span], dtype=np.float64)), bool(np.all(is_argmax[row, span])))
  return results


def choose(loglikelihood_per_choice: Sequence[float], choice_texts: Sequence[str]) -> tuple[int, int]:
  """Predicted index for `acc` and for `acc_norm`: lm-eval `lm_eval/api/task.py` ConfigurableTask.process_results,
  `np.argmax(lls)` and `np.argmax(lls / completion_len)`, the choices' lengths in Unicode characters (delimiter
  excluded; an empty choice counts as 1); ties go to the lowest index."""
  lls = np.asarray(loglikelihood_per_choice, np.float64)
  lengths = np.asarray([max(len(text), 1) for text in choice_texts], np.float64)
  return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def score_multiple_choice(items: Sequence[MultipleChoiceItem], tokenizer, logprobs_fn: LogprobsFn, *,
                          batch_size: int, seq_len: int, desc: str = 'scoring', packed: bool = True) -> dict:
  """`{"acc", "acc_norm", "n"}`: the mean over the items of lm-eval's acc and acc_norm (the same either way of
  `packed`, see `loglikelihoods`)."""
  if not items:
    raise ValueError('no items to score')
  for index, item in enumerate(items):
    if len(item.requests) != len(item.choice_texts) or not 0 <= item.gold < len(item.requests):
      raise ValueError(f'item {index}: {len(item.requests)} requests, {len(item.choice_texts)} choice texts and gold '
                       f'{item.gold}; gold must index the choices and there must be one request per choice')
  requests = [encode_pair(tokenizer, *request) for item in items for request in item.requests]
  results = iter(loglikelihoods(requests, logprobs_fn, batch_size=batch_size, seq_len=seq_len,
                                eos_id=tokenizer.eos_id, desc=desc, packed=packed))
  correct, correct_norm = 0, 0
  for item in items:
    pred, pred_norm = choose([next(results)[0] for _ in item.requests], item.choice_texts)
    correct += pred == item.gold
    correct_norm += pred_norm == item.gold
  return {'acc': correct / len(items), 'acc_norm': correct_norm / len(items), 'n': len(items)}
