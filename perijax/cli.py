"""What every perijax command shares: its common flags, its config, and one error path.

    if __name__ == '__main__':
      cli.define_config_flags()          # --config=FILE[:arg] plus any --config.a.b=value
      cli.define_workdir_flag('...')     # --workdir (required)
      cli.define_distributed_flags()     # --coordinator_address, --num_processes, --process_id
      cli.run(main)                      # main calls cli.config() (or cli.config_and_overrides()), ...

Library modules define no flags: only a command's `__main__` block calls these. Expected errors (a perijax.errors.
UserError; absl's flag errors) print one line, `perijax.<tool>: error: <what is wrong and what is allowed>` (for an
experiment, `experiments.<name>: error: ...`), on stderr and exit with status 1; any other exception is a bug and keeps
its traceback.
"""

import os
import sys
import tempfile
import threading

from absl import app, flags

from perijax import config as config_lib
from perijax import rundir
from perijax import sharding as sharding_lib
from perijax.errors import ArgumentError, UserError  # noqa: F401  (ArgumentError: for the commands)

FLAGS = flags.FLAGS
_OVERRIDES = []   # the command line's --config.a.b=value arguments, in order
_ACCEPTS_OVERRIDES = [False]
_REQUIRED = []    # (flag, what it is), checked after parsing: one line naming the flag


def define_config_flags(default=None, overrides_only=False):
  """--config=FILE[:arg] (unless `overrides_only`: the config is the workdir's) and --config.a.b=value overrides."""
  _ACCEPTS_OVERRIDES[0] = True
  if not overrides_only:
    flags.DEFINE_string('config', default, 'Config file with get_config() (configs/*.py), optionally FILE:arg; any '
                        'field can then be overridden with --config.a.b=value.')
    require('config', 'a config file, e.g. --config=configs/tiny.py')


def require(name, what):
  """--name must be given; else one line naming it and `what` it is."""
  _REQUIRED.append((name, what))


def define_workdir_flag(help_text='Run directory: config.json, metrics, checkpoints.'):
  flags.DEFINE_string('workdir', None, help_text)
  require('workdir', 'the run directory, e.g. --workdir=runs/peri')


def define_distributed_flags():
  """The multi-host flags of perijax.train and perijax.evaluate."""
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 (not needed on TPU pods and '
                      'SLURM, where jax.distributed finds it).')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.', lower_bound=1)
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.', lower_bound=0)


def initialize_distributed():
  sharding_lib.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def overrides():
  """The `--config.a.b=value` arguments as given."""
  return list(_OVERRIDES)


def config():
  """--config with the command line's overrides applied, validated (raises ConfigError naming the field)."""
  return config_lib.load(FLAGS.config, _OVERRIDES)


def config_and_overrides():
  """(--config as given, its config with the overrides applied, {field: typed value} of the overrides), not yet
  validated: for sweep, demo and the experiments, which hand the file and overrides on to runs of their own and
  validate each."""
  config = config_lib.load_file(FLAGS.config)
  return FLAGS.config, config, config_lib.apply_overrides(config, _OVERRIDES)


def check_writable_dir(path, what='--workdir'):
  """Proves a file can be written in `path` (or, if it does not exist yet, in the directory that will hold it)
  before anything expensive starts; creates nothing. An object-store URL (gs://...) is not a local path: it is left
  to its first write."""
  if not rundir.is_local(path):
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ArgumentError(f'{what}={path} is a file; expected a directory (new or existing)')
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ArgumentError(f'{what}={path}: {existing} is a file; expected a directory (new or existing)')
  try:
    tempfile.TemporaryFile(dir=existing).close()   # deleted as it closes (or never named: O_TMPFILE)
  except OSError as error:
    raise ArgumentError(f'{what}={path} is not writable ({existing}: {error.strerror or error}); expected a directory '
                        'this user can write to') from None


def fail(message):
  """Prints the one error line and exits 1, skipping interpreter teardown: a failed Orbax read leaves work pending
  on its event loop whose tracebacks would otherwise follow the line. Nothing is half-written when input is bad."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  is_module = spec and spec.name.startswith(('perijax', 'experiments'))  # -m perijax.evaluate runs its __main__
  tool = spec.name.removesuffix('.__main__') if is_module else os.path.basename(sys.argv[0])
  sys.stdout.flush()
  print(f'{tool}: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def _parse_flags(argv):
  rest = [argv[0]]
  for arg in argv[1:]:
    if arg.startswith('--config.') and _ACCEPTS_OVERRIDES[0]:
      if '=' not in arg:
        fail(f'{arg}: expected --config.<section>.<field>=<value> (with "=")')
      _OVERRIDES.append(arg)
    else:
      rest.append(arg)
  try:
    remaining = FLAGS(rest)
  except flags.Error as error:
    fail(error)
  for name, what in _REQUIRED:
    if FLAGS[name].value is None:
      fail(f'--{name} is required: {what}')
  return remaining


def _drop_abandoned_reads(unraisable):
  """After a failed restore, Orbax's abandoned array reads complain (at garbage collection, or from their threads)
  that their event loop is closed; that noise would bury the one error line."""
  if 'Event loop is closed' in str(unraisable.exc_value) or 'coroutine' in repr(getattr(unraisable, 'object', None)):
    return
  (sys.__unraisablehook__ if hasattr(unraisable, 'object') else threading.__excepthook__)(unraisable)


def run(main, takes_arguments=False):
  """absl's app.run(main) with the one error path; unless `takes_arguments`, a positional argument is an error."""
  sys.unraisablehook = threading.excepthook = _drop_abandoned_reads

  def guarded(argv):
    try:
      if len(argv) > 1 and not takes_arguments:
        raise ArgumentError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form --name=value')
      return main(argv)
    except (UserError, app.UsageError) as error:
      fail(error)
  app.run(guarded, flags_parser=_parse_flags)
