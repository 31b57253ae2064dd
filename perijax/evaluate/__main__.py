"""`python -m perijax.evaluate`: the command line of perijax/evaluate/__init__.py."""

from perijax import cli
from perijax import evaluate

evaluate.define_flags()
cli.run(evaluate.main)
