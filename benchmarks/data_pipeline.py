"""How fast the grain pipeline feeds tokens on the embedded corpus, with a config's batch size and sequence length.

    python benchmarks/data_pipeline.py --config=configs/tiny.py --seconds=20 --out=/tmp/data_pipeline.json

The issue's target is a pipeline rate >= 10x the tiny config's training consumption; the trainer measures the
consumption, this measures the supply: `tokens_per_s` counts every position of every batch (what a train step consumes),
`target_tokens_per_s` only the non-padding ones. The embedded corpus must be prepared (python -m perijax.data.corpus).
"""

import argparse
import importlib.util
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perijax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from perijax.data import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position


def measure(config, seconds: float = 10.0, warmup_batches: int = 5) -> dict:
  """Pipeline throughput of `config.data` at `config.train`'s batch size and sequence length, one process."""
  tokenizer = tokenizers.make_tokenizer(config.data)
  batch_size, seq_len = config.train.batch_size, config.train.seq_len
  iterator = pipeline.make_train_iterator(config.data, tokenizer, batch_size=batch_size, seq_len=seq_len,
                                          seed=config.train.seed)
  try:
    start = time.perf_counter()
    for _ in range(warmup_batches):
      next(iterator)
    first_batch_s = time.perf_counter() - start  # pipeline start-up, including opening the source
    batches = target_tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
      batch = next(iterator)
      batches += 1
      target_tokens += int(batch['weights'].sum())
    elapsed = time.perf_counter() - start
  finally:
    iterator.close()
  tokens = batches * batch_size * seq_len
  return {
      'dataset': config.data.name, 'tokenizer': tokenizer.name, 'batch_size': batch_size, 'seq_len': seq_len,
      'worker_count': config.data.worker_count, 'prefetch': config.data.prefetch,
      'batches': batches, 'seconds': elapsed, 'warmup_s': first_batch_s,
      'batches_per_s': batches / elapsed, 'tokens_per_s': tokens / elapsed,
      'target_tokens_per_s': target_tokens / elapsed, 'fill': target_tokens / max(tokens, 1),
  }


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=str(REPO / 'configs' / 'tiny.py'), help='config file with get_config()')
  parser.add_argument('--seconds', type=float, default=10.0, help='how long to pull batches')
  parser.add_argument('--worker_count', type=int, default=-1, help='override data.worker_count; -1 = keep')
  parser.add_argument('--out', default='', help='write the result as JSON here')
  args = parser.parse_args()
  config = load_config(args.config)
  if args.worker_count >= 0:
    config.data.worker_count = args.worker_count
  result = measure(config, seconds=args.seconds)
  result['config'] = args.config
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text + '\n')


if __name__ == '__main__':
  main()
