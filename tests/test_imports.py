"""The package's import graph runs one way: no cycles, and the lower layers never import the higher ones."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'perijax'
# Modules that build the model or its numerics must not know about training, evaluation, reporting or commands.
LOWER = ('perijax.norms', 'perijax.placement', 'perijax.model', 'perijax.precision', 'perijax.stats')
HIGHER = ('perijax.train', 'perijax.evaluate', 'perijax.sweep', 'perijax.demo', 'perijax.dryrun', 'perijax.report',
          'perijax.cli')


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_imports(path: pathlib.Path, modules) -> set:
  """The perijax modules `path` imports at module level or inside functions (both count: both are dependencies)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
    else:
      continue
    found.update(name for name in names if name in modules)
  return found


def import_graph():
  paths = {module_name(path): path for path in PACKAGE.rglob('*.py')}
  graph = {name: package_imports(path, paths) - {name} for name, path in paths.items()}
  # A package's __init__ importing its own submodules is not a dependency between ideas.
  return {name: {dep for dep in deps if not dep.startswith(name + '.')} for name, deps in graph.items()}


def find_cycle(graph):
  """One cycle of `graph` as a list of modules, or None (depth-first search with colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_a_planted_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_package_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 20
  assert find_cycle(graph) is None


@pytest.mark.parametrize('lower', LOWER)
def test_model_layer_imports_nothing_above_it(lower):
  graph = import_graph()
  reachable, frontier = set(), [lower]
  while frontier:
    for dep in graph.get(frontier.pop(), ()):
      if dep not in reachable:
        reachable.add(dep)
        frontier.append(dep)
  assert not {dep for dep in reachable if dep.startswith(HIGHER)}, (lower, sorted(reachable))
