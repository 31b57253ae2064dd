"""Bad input the user can fix: the one exception family `perijax.cli.run` reports as a single line (any other
exception is a bug and keeps its traceback). Each error also derives from the builtin it always was (ValueError or
FileNotFoundError), so callers catching those still do."""


class UserError(Exception):
  """Bad input (config, flag, path, data, checkpoint); the message says what is wrong and what is allowed."""


class DataError(UserError, ValueError):
  """A dataset, split, text field or tokenizer file cannot be used as the config says."""


class NotFoundError(UserError, FileNotFoundError):
  """A file, directory or dataset the command needs is not there."""


class ArgumentError(UserError, ValueError):
  """A command-line argument or flag value the command cannot use."""
