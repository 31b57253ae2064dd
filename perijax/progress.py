"""Progress bars for the slow loops a person watches (evaluation, corpus preparation, sweeps), only in a terminal.

A bar goes to stderr when it is a terminal and nowhere otherwise (tqdm's `disable=None`; TQDM_DISABLE=1 turns bars off
in a terminal too). Training needs no bar: it prints one line per log step with its own ETA (perijax/metrics.py).
"""

import os
import sys

from tqdm import tqdm

# Like training's console line: what, count of total, elapsed<remaining (h:mm:ss), rate; with no total, no bar.
BAR_FORMAT = '{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {rate_fmt}'
COUNT_FORMAT = '{desc} {n_fmt} {unit} {elapsed} {rate_fmt}'


def progress(iterable=None, desc='', total=None, unit='it', leave=False):
  """`iterable` with a tqdm bar on stderr if stderr is a terminal; the same items, and no output, otherwise."""
  total = len(iterable) if total is None and hasattr(iterable, '__len__') else total
  return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
              bar_format=BAR_FORMAT if total else COUNT_FORMAT,
              disable=True if os.environ.get('TQDM_DISABLE') else None)


def write(message):
  """Prints a line to stdout (flushed) below a bar that is showing, instead of breaking it up."""
  tqdm.write(message, file=sys.stdout)
  sys.stdout.flush()


def interactive():
  """Whether bars show: stderr is a terminal and TQDM_DISABLE is not set (for libraries with their own switch)."""
  return sys.stderr.isatty() and not os.environ.get('TQDM_DISABLE')
