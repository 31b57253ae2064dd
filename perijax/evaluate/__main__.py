"""`python -m perijax.evaluate`: the command line of perijax/evaluate/__init__.py."""

from absl import app

from perijax import evaluate

evaluate.define_flags()
app.run(evaluate.main, flags_parser=evaluate.parse_flags)
