"""The codebase keeps its shape: no package module past 400 lines (past it, a file is probably two ideas) and no line of
Python past 120 characters, anywhere in the repository."""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_LINE_CHARS = 120


def python_files():
  listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '*.py'], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  if listed.returncode == 0:  # a git checkout: its tracked and not-ignored files, never the venv
    return [ROOT / name for name in listed.stdout.split() if (ROOT / name).is_file()]  # not a file deleted unstaged
  return [path for path in ROOT.rglob('*.py') if not any(part.startswith('.') for part in path.relative_to(ROOT).parts)]


def long_lines(paths, limit):
  return [f'{path}:{number} ({len(line)} characters)' for path in paths
          for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1) if len(line) > limit]


def test_long_lines_are_found_and_characters_not_bytes_are_counted(tmp_path):
  path = tmp_path / 'probe.py'
  path.write_text('x = 1\n' + 'y = ' + '1' * 200 + '\n' + '# ' + 'γ' * 118 + '\n', encoding='utf-8')
  assert long_lines([path], MAX_LINE_CHARS) == [f'{path}:2 (204 characters)']


def test_no_package_module_passes_400_lines():
  sizes = {path: len(path.read_text(encoding='utf-8').splitlines()) for path in (ROOT / 'perijax').rglob('*.py')}
  assert len(sizes) > 20
  assert [f'{path.relative_to(ROOT)}: {n} lines' for path, n in sizes.items() if n > MAX_MODULE_LINES] == []


def test_no_python_line_passes_120_characters():
  paths = python_files()
  assert any(path.name == 'train.py' for path in paths)
  assert long_lines(paths, MAX_LINE_CHARS) == []
