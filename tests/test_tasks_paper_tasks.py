"""The five benchmarks: lm-eval's exact prompts, TFDS readers (mocked, offline), JSONL builders, and bad input."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import perijax.tasks
from perijax.tasks import paper_tasks, scoring


class ByteTokenizer:
  pad_id, eos_id, vocab_size = 0, 1, 258

  def encode(self, text):
    return [byte + 2 for byte in text.encode('utf-8')]


def uniform_model(inputs, positions, segment_ids):
  return np.full(inputs.shape + (258,), -np.log(258.0), np.float32)


def configs(tmp_path, **eval_fields):
  eval_config = ml_collections.ConfigDict(dict(tasks=('arc_easy',), max_examples=0, tasks_data_dir='',
                                               hellaswag_path='', siqa_path='', batch_size=4))
  eval_config.update(eval_fields)
  data_config = ml_collections.ConfigDict(dict(name='shakespeare_milton', data_dir=str(tmp_path / 'tfds')))
  return eval_config, data_config


# ---- prompt formats: one hand-written document each, strings from the lm-eval YAMLs (docs/evaluation.md) -----------

def test_arc_prompt_and_gold_from_answer_key():
  doc = {'id': b'Mercury_1', 'question': b'Which of these is a gas at room temperature?',
         'choices': {'text': [b'ice', b'steam', b'iron'], 'label': np.array([0, 2, 3])}, 'answerKey': np.array(2)}
  item = paper_tasks.arc_item(doc)
  context = 'Question: Which of these is a gas at room temperature?\nAnswer:'
  assert item.requests == ((context, ' ice'), (context, ' steam'), (context, ' iron'))
  assert item.choice_texts == ('ice', 'steam', 'iron') and item.gold == 1


def test_hellaswag_prompt_capitalizes_ctx_b_and_preprocesses():
  doc = {'activity_label': 'Roof shingle removal', 'ctx_a': 'A man is sitting on a roof.', 'ctx_b': 'he STARTS',
         'endings': ['is using wrap to wrap a pair of skis.', 'starts pulling up roofing [title] on a roof.'],
         'label': 1}
  item = paper_tasks.hellaswag_item(doc)
  query = 'Roof shingle removal: A man is sitting on a roof. He starts'  # capitalize() lowercases the rest
  assert item.requests == ((query, ' is using wrap to wrap a pair of skis.'),
                           (query, ' starts pulling up roofing. on a roof.'))
  assert item.gold == 1
  wikihow = {'activity_label': 'Home and Garden', 'ctx_a': '[header] How to grow tomatoes [title] Choose a spot.',
             'ctx_b': '', 'endings': ['[step] Dig.'], 'label': 0}
  item = paper_tasks.hellaswag_item(wikihow)
  # lm-eval strips before it drops "[...]", so a leading tag leaves its space: the choice is " Dig.", as lm-eval has it.
  assert item.requests == (('Home and Garden: How to grow tomatoes. Choose a spot.', '  Dig.'),)
  assert item.choice_texts == (' Dig.',)


def test_piqa_prompt():
  doc = {'goal': 'How do I open a stuck jar?', 'sol1': 'Tap the lid on the counter.', 'sol2': 'Freeze it.',
         'label': np.array(0)}
  item = paper_tasks.piqa_item(doc)
  context = 'Question: How do I open a stuck jar?\nAnswer:'
  assert item.requests == ((context, ' Tap the lid on the counter.'), (context, ' Freeze it.')) and item.gold == 0


def test_siqa_prompt_and_one_based_label():
  doc = {'context': "Tracy didn't go home that evening and resisted Riley's attacks.",
         'question': 'What does Tracy need to do before this?', 'answerA': 'make a new plan',
         'answerB': 'Go home and see Riley', 'answerC': 'Find somewhere to go', 'label': b'3'}
  item = paper_tasks.siqa_item(doc)
  context = ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
             'What does Tracy need to do before this?\nA:')
  assert item.requests == ((context, ' make a new plan'), (context, ' Go home and see Riley'),
                           (context, ' Find somewhere to go'))
  assert item.gold == 2


def test_winogrande_prompt_is_partial():
  doc = {'sentence': b"Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         'option1': b'Sarah', 'option2': b'Maria', 'label': np.array(0)}
  item = paper_tasks.winogrande_item(doc)
  assert item.requests == (('Sarah was a much better surgeon than Maria so Sarah', ' always got the harder cases.'),
                           ('Sarah was a much better surgeon than Maria so Maria', ' always got the harder cases.'))
  assert item.choice_texts == tuple(context for context, _ in item.requests) and item.gold == 0


# ---- TFDS readers, offline -------------------------------------------------------------------------------------------

def test_catalog_readers_through_mocked_tfds(tmp_path):
  """Random mock examples from the real TFDS feature specs: the reader and schema path, end to end."""
  with tfds.testing.mock_data(num_examples=3):
    for task in ('arc_easy', 'piqa'):
      items = paper_tasks.take_items(task, paper_tasks.read(task, str(tmp_path)), max_examples=2)
      assert len(items) == 2
      for item in items:
        assert 0 <= item.gold < len(item.requests) and all(isinstance(c, str) for c in item.choice_texts)


def test_scores_of_realistic_mocked_examples(tmp_path):
  docs = {
      'ai2_arc': [{'id': 'a', 'question': 'Q1?', 'choices': {'text': ['x', 'yy'], 'label': [0, 1]}, 'answerKey': 0}],
      'piqa': [{'id': 'p', 'goal': 'G?', 'sol1': 'one', 'sol2': 'two', 'label': 1}] * 3,
      'winogrande': [{'sentence': 'A _ b.', 'option1': 'x', 'option2': 'y', 'label': 0}] * 2,
  }
  def as_data_source(builder, split, **kwargs):
    del kwargs
    assert split == {'ai2_arc': 'test'}.get(builder.name, 'validation')
    return docs[builder.name]
  eval_config, data_config = configs(tmp_path, max_examples=2)
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    results = {name: scoring.score_multiple_choice(
        perijax.tasks.load_task_items(name, eval_config, data_config), ByteTokenizer(), uniform_model,
        batch_size=4, seq_len=32) for name in ('arc_easy', 'piqa', 'winogrande')}
  # Uniform model: ties go to index 0 (arc gold 0 -> right; piqa gold 1 -> wrong); acc_norm picks the longest choice.
  assert results['arc_easy'] == {'acc': 1.0, 'acc_norm': 0.0, 'n': 1}
  assert results['piqa'] == {'acc': 0.0, 'acc_norm': 0.0, 'n': 2}  # max_examples=2 of 3
  assert results['winogrande']['acc'] == 1.0 and results['winogrande']['n'] == 2


# ---- JSONL builders --------------------------------------------------------------------------------------------------

HELLASWAG_LINES = [
    {'ind': 24, 'activity_label': 'Roof shingle removal', 'ctx_a': 'A man is sitting on a roof.', 'ctx_b': 'he',
     'ctx': 'A man is sitting on a roof. he', 'split': 'val', 'split_type': 'indomain', 'label': 3,
     'endings': ['is using wrap.', 'is ripping level tiles off.', "is holding a rubik's cube.", 'starts pulling up.'],
     'source_id': 'activitynet~v_-JhWjGDPHMY'},
    {'ind': 92, 'activity_label': 'Clean and jerk', 'ctx_a': 'A lady walks to a barbell.', 'ctx_b': 'she',
     'label': 0, 'endings': ['lifts it.', 'sits.', 'sleeps.', 'runs.'], 'source_id': 'activitynet~v_-lJS58hyo1c'},
]
SIQA_LINES = [
    {'context': 'Cameron decided to have a barbecue.', 'question': 'What will Cameron want to do next?',
     'answerA': 'eat', 'answerB': 'sleep', 'answerC': 'leave', 'promptDim': 'wanted'},
    {'context': 'Jan gave Tracy a gift.', 'question': 'How would Tracy feel?', 'answerA': 'sad', 'answerB': 'happy',
     'answerC': 'angry', 'promptDim': 'feel'},
]


def write_jsonl(path, lines):
  path.write_text(''.join(json.dumps(line) + '\n' for line in lines), encoding='utf-8')
  return str(path)


@pytest.fixture(scope='module')
def original_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('originals')
  hellaswag = write_jsonl(root / 'hellaswag_val.jsonl', HELLASWAG_LINES)
  siqa = write_jsonl(root / 'dev.jsonl', SIQA_LINES)
  (root / 'dev-labels.lst').write_text('1\n2\n')
  return {'hellaswag': hellaswag, 'siqa': siqa, 'data_dir': str(root / 'tfds')}


def test_hellaswag_builder_round_trip_keeps_fields_and_file_order(original_files):
  source = paper_tasks.read('hellaswag', original_files['data_dir'], original_files['hellaswag'])
  assert len(source) == 2
  assert [int(source[i]['ind']) for i in range(2)] == [24, 92]  # file order, not TFDS's hashed order
  first = source[0]
  assert {'ctx_a', 'ctx_b', 'activity_label', 'endings', 'label'} <= set(first)
  item = paper_tasks.hellaswag_item(first)
  assert item.requests[0] == ('Roof shingle removal: A man is sitting on a roof. He', ' is using wrap.')
  assert item.gold == 3
  again = paper_tasks.read('hellaswag', original_files['data_dir'], original_files['hellaswag'])  # the prepared copy
  assert paper_tasks.as_text(again[1]['ctx_a']) == 'A lady walks to a barbell.'


def test_siqa_builder_reads_the_separate_labels_file(original_files):
  source = paper_tasks.read('siqa', original_files['data_dir'], original_files['siqa'])
  items = [paper_tasks.siqa_item(source[i]) for i in range(len(source))]
  assert [item.gold for item in items] == [0, 1]
  assert items[1].requests[1] == ('Q: Jan gave Tracy a gift. How would Tracy feel?\nA:', ' happy')


def test_siqa_builder_accepts_inline_labels_and_rejects_bad_ones(tmp_path):
  inline = write_jsonl(tmp_path / 'siqa_inline.jsonl', [dict(SIQA_LINES[0], label='3')])
  source = paper_tasks.read('siqa', str(tmp_path / 'tfds'), inline)
  assert paper_tasks.siqa_item(source[0]).gold == 2
  bad = write_jsonl(tmp_path / 'siqa_bad.jsonl', [dict(SIQA_LINES[0], label='4')])
  with pytest.raises(ValueError, match='labels are "1", "2" or "3"'):
    paper_tasks.read('siqa', str(tmp_path / 'tfds'), bad)
  unlabelled = write_jsonl(tmp_path / 'test.jsonl', SIQA_LINES)
  with pytest.raises(FileNotFoundError, match='test-labels.lst'):
    paper_tasks.read('siqa', str(tmp_path / 'tfds'), unlabelled)
  assert len(list((tmp_path / 'tfds' / 'siqa_original').iterdir())) == 1  # bad files fail before anything is written


def test_different_source_files_get_separate_prepared_copies(tmp_path, original_files):
  other = write_jsonl(tmp_path / 'other.jsonl', HELLASWAG_LINES[1:])
  data_dir = str(tmp_path / 'tfds')
  assert len(paper_tasks.read('hellaswag', data_dir, original_files['hellaswag'])) == 2
  assert len(paper_tasks.read('hellaswag', data_dir, other)) == 1


# ---- bad input -------------------------------------------------------------------------------------------------------

def test_unknown_task_names_it_and_lists_the_known():
  with pytest.raises(ValueError, match=r"unknown task\(s\) 'lambada'.*next_line, arc_easy, hellaswag, piqa, siqa"):
    perijax.tasks.validate_task_names(['piqa', 'lambada'])
  assert perijax.tasks.validate_task_names(('piqa', 'siqa')) == ('piqa', 'siqa')


def test_missing_jsonl_paths_name_the_config_field(tmp_path):
  eval_config, data_config = configs(tmp_path)
  with pytest.raises(FileNotFoundError, match='config.eval.hellaswag_path'):
    perijax.tasks.load_task_items('hellaswag', eval_config, data_config)
  eval_config.siqa_path = str(tmp_path / 'nope.jsonl')
  with pytest.raises(FileNotFoundError, match=r"config.eval.siqa_path='.*nope.jsonl' is not a file"):
    perijax.tasks.load_task_items('siqa', eval_config, data_config)


@pytest.mark.parametrize('task,name,split', [('arc_easy', 'ai2_arc/ARC-Easy', 'test'), ('piqa', 'piqa', 'validation'),
                                             ('winogrande', 'winogrande', 'validation')])
def test_unprepared_catalog_dataset_names_dataset_split_and_data_dir(tmp_path, task, name, split):
  eval_config, data_config = configs(tmp_path, tasks_data_dir=str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match=f"task '{task}': TFDS dataset '{name}' split '{split}' is not prepared"):
    perijax.tasks.load_task_items(task, eval_config, data_config)   # before any model runs (Evaluator's order)
