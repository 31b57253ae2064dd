"""Preemption on a pod: SIGTERM on any one host (or all) makes every process save the same step and exit 0."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from perijax import checkpoint as checkpoint_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # a hang (one host saving alone) fails the test instead of blocking it


def train_args(data_dir, workdir, steps):
  return ['-m', 'perijax.train', f'--workdir={workdir}', '--config=configs/tiny.py',
          f'--config.data.data_dir={data_dir}',
          '--config.model.d_model=32', '--config.model.num_layers=2', f'--config.train.steps={steps}',
          '--config.train.batch_size=8', '--config.train.seq_len=32', '--config.train.log_every=1',
          '--config.train.stats_every=1', '--config.checkpoint.every=0']


def fresh_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_two_processes(args, port):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  return [subprocess.Popen([sys.executable, *args, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                            f'--process_id={i}'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
          for i in range(2)]


def finish(processes):
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0].decode() for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    pytest.fail(f'the processes did not exit within {TIMEOUT} s (a host waiting for a collective the other never '
                'joins)')
  assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  return outputs


def wait_for_metrics(workdir, lines, processes):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + TIMEOUT
  while not (os.path.exists(path) and len(open(path).readlines()) >= lines):
    assert time.time() < deadline and all(p.poll() is None for p in processes), 'training did not start'
    time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize('signalled', [(1,), (0, 1)], ids=['one_host_then_resume', 'every_host'])
def test_sigterm_on_any_host_saves_the_same_step_on_every_process(signalled, corpus_data_dir, tmp_path, free_port):
  workdir = str(tmp_path / 'run')
  processes = start_two_processes(train_args(corpus_data_dir, workdir, 100_000), free_port)
  wait_for_metrics(workdir, 3, processes)
  for i in signalled:
    processes[i].send_signal(signal.SIGTERM)
  outputs = finish(processes)
  saved = [re.findall(r'preempted: saved the checkpoint at step (\d+)', out) for out in outputs]
  assert len(saved[0]) == 1 and saved[0] == saved[1], outputs
  step = int(saved[0][0])
  assert checkpoint_lib.make_manager(workdir, read_only=True).all_steps() == [step]
  # Both processes wrote their part of the same checkpoint: each one's data-iterator position.
  data = os.path.join(workdir, 'checkpoints', str(step), 'data')
  assert (sorted(f for f in os.listdir(data) if f.startswith('process_'))
          == ['process_0-of-2.json', 'process_1-of-2.json'])

  if len(signalled) > 1:
    return   # resuming does not depend on which hosts were signalled: the one_host case checks it once
  # The checkpoint resumes: two more steps on both processes, then the run ends normally.
  processes = start_two_processes(train_args(corpus_data_dir, workdir, step + 2), fresh_port())
  outputs = finish(processes)
  assert f'resuming from the checkpoint at step {step}' in outputs[0]
  assert checkpoint_lib.make_manager(workdir, read_only=True).latest_step() == step + 2
