"""Bad input the user can fix: the one exception family every perijax tool reports as a single line.

`perijax.cli.run` prints a UserError as `perijax.<tool>: error: <message>` and exits 1; any other exception is a bug
and keeps its traceback. Each module's own error (ConfigError, CheckpointError, ShardingError, DataError, ...) derives
from UserError and from the builtin it always was (ValueError or FileNotFoundError), so callers catching those still do.
"""


class UserError(Exception):
  """Bad input (config, flag, path, data, checkpoint); the message says what is wrong and what is allowed."""


class DataError(UserError, ValueError):
  """A dataset, split, text field or tokenizer file cannot be used as the config says."""


class NotFoundError(UserError, FileNotFoundError):
  """A file, directory or dataset the command needs is not there."""


class ArgumentError(UserError, ValueError):
  """A command-line argument or flag value the command cannot use."""
