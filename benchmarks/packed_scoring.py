"""Zero-shot scoring speed, several requests per row (packed, the default) vs one request per row, on ARC-like items.

    python benchmarks/packed_scoring.py [--items=16 --seq_len=1024 --batch_size=4 --out=benchmarks/packed_scoring.json]

ARC-like: a "Question: ...\\nAnswer:" context of 80-220 characters and four answers of 4-40 characters (ARC-Easy's
range), generated from a fixed seed, scored with the byte tokenizer by a randomly initialized model of
configs/tiny.py's shape (float32). Each way is compiled on a first pass, then timed on a second. The target
(issue 18) is packed >= 3x the items per second of one request per row, with the same log-likelihoods (max |diff|).
"""

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from perijax import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from perijax.data import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from perijax.tasks import scoring  # pylint: disable=g-import-not-at-top,wrong-import-position

WORDS = ('the which plant animal water energy light heat cell earth moon sun rock soil air force motion sound '
         'student measured changes most likely because when during what how best describes these form process').split()


def arc_like_requests(num_items, seed=0):
  """(context, continuation) strings: four per item, sharing the item's question."""
  rng = np.random.default_rng(seed)
  def text(low, high):
    words, length = [], int(rng.integers(low, high))
    while sum(len(w) + 1 for w in words) < length:
      words.append(WORDS[rng.integers(len(WORDS))])
    return ' '.join(words)
  requests = []
  for _ in range(num_items):
    question = f'Question: {text(70, 210).capitalize()}?\nAnswer:'
    requests += [(question, ' ' + text(4, 40)) for _ in range(4)]
  return requests


def measure(num_items=16, seq_len=1024, batch_size=4):
  config = tiny.get_config()
  config.model.compute_dtype = 'float32'
  model = train_step.make_model(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))['params'])
  logprobs = jax.jit(lambda p, inputs, positions, segment_ids: jax.nn.log_softmax(
      model.apply({'params': p}, inputs, positions, segment_ids)[0].astype(jnp.float32), axis=-1))
  def logprobs_fn(*arrays):
    return logprobs(params, *arrays)
  tokenizer = tokenizers.ByteTokenizer()
  requests = [scoring.encode_pair(tokenizer, context, continuation)
              for context, continuation in arc_like_requests(num_items)]
  results, report = {}, {}
  for packed in (False, True):
    kwargs = dict(batch_size=batch_size, seq_len=seq_len, eos_id=tokenizer.eos_id, packed=packed)
    scoring.loglikelihoods(requests[:4], logprobs_fn, **kwargs)  # compile
    start = time.perf_counter()
    results[packed] = scoring.loglikelihoods(requests, logprobs_fn, **kwargs)
    seconds = time.perf_counter() - start
    rows = scoring.place_requests([min(len(c) + len(x), seq_len) for c, x in requests], seq_len, packed)[1]
    report['packed' if packed else 'one_per_row'] = {
        'seconds': seconds, 'items_per_s': num_items / seconds, 'rows': rows,
        'model_calls': -(-rows // batch_size)}
  lls = {packed: np.array([ll for ll, _ in results[packed]]) for packed in results}
  report.update(
      items=num_items, requests=len(requests), seq_len=seq_len, batch_size=batch_size,
      mean_request_tokens=float(np.mean([len(c) + len(x) + 1 for c, x in requests])),
      speedup=report['packed']['items_per_s'] / report['one_per_row']['items_per_s'],
      max_abs_diff=float(np.max(np.abs(lls[True] - lls[False]))),
      greedy_equal=[g for _, g in results[True]] == [g for _, g in results[False]],
      device=jax.devices()[0].device_kind, target_speedup=3.0)
  report['passed'] = report['speedup'] >= 3.0 and report['max_abs_diff'] <= 1e-4 and report['greedy_equal']
  return report


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--items', type=int, default=16)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'packed_scoring.json'))
  args = parser.parse_args()
  report = measure(args.items, args.seq_len, args.batch_size)
  pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + '\n')
  print(f'{report["items"]} ARC-like items ({report["requests"]} requests of {report["mean_request_tokens"]:.0f} '
        f'tokens) at seq_len {report["seq_len"]}: one per row {report["one_per_row"]["items_per_s"]:.2f} items/s, '
        f'packed {report["packed"]["items_per_s"]:.2f} items/s = {report["speedup"]:.1f}x (target 3x); '
        f'max |diff| {report["max_abs_diff"]:.2e} -> {args.out}')
  sys.exit(0 if report['passed'] else 1)


if __name__ == '__main__':
  main()
