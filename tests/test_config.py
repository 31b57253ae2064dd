"""Every bad config field fails before anything is built, with a message naming the field, value and what is allowed."""

import pytest

from configs import default, paper_1_5b, paper_3_2b, paper_400m, tiny
from perijax import config as config_lib
from perijax import hardware
from perijax import params as params_lib

BAD_FIELDS = [
    ('model.norm.placement', 'middle', "config.model.norm.placement = 'middle'.*'post', 'pre', 'peri'"),
    ('model.norm.kind', 'batchnorm', "config.model.norm.kind = 'batchnorm'.*'layernorm', 'rmsnorm'"),
    ('model.compute_dtype', 'float8', "config.model.compute_dtype = 'float8'.*'float32', 'bfloat16', 'float16'"),
    ('model.param_dtype', 'int8', "config.model.param_dtype = 'int8'.*'float32'"),
    ('model.d_model', 130, 'config.model.d_model = 130.*multiple of model.num_heads = 4'),
    ('model.num_layers', 0, 'config.model.num_layers = 0.*positive'),
    ('model.d_model', -8, 'config.model.d_model = -8.*positive'),
    ('train.batch_size', 0, 'config.train.batch_size = 0.*positive'),
    ('train.seq_len', -1, 'config.train.seq_len = -1.*positive'),
    ('model.norm.mix_post_layers', 9, 'config.model.norm.mix_post_layers = 9.*at most model.num_layers = 4'),
    ('model.num_kv_heads', 3, 'config.model.num_kv_heads = 3.*divisor of model.num_heads = 4'),
    ('optimizer.schedule', 'step', "config.optimizer.schedule = 'step'.*'cosine'"),
    ('model.remat', 'some', "config.model.remat = 'some'.*'none', 'minimal', 'full'"),
    ('mesh.tensor', 0, 'config.mesh.tensor = 0.*-1'),
    ('mesh.dcn_data', 0, 'config.mesh.dcn_data = 0.*slices or -1'),
    ('mesh.dcn_fsdp', -1, "config.mesh = {'dcn_data': -1, 'dcn_fsdp': -1}.*at most one"),
    ('train.xla_flags_preset', 'tpu', "config.train.xla_flags_preset = 'tpu'.*'none', 'gpu'"),
    ('train.compilation_cache_dir', None, 'config.train.compilation_cache_dir = None.*directory'),
    ('model.init.std', 0.0, 'config.model.init.std = 0.0.*positive'),
    ('model.norm.scale_init', -1.0, 'config.model.norm.scale_init = -1.0.*positive'),
    ('model.norm.freeze_out_scale', True, "config.model.norm.freeze_out_scale = True.*placement 'pre' has no output"),
    ('data.source', 'csv', "config.data.source = 'csv'.*'tfds', 'jsonl', 'parquet', 'hf_disk'"),
    ('data.path', '', "config.data.path = ''.*data.source = 'hf_disk'"),
    ('model.attention_impl', 'cudnn', "config.model.attention_impl = 'cudnn'.*model.compute_dtype = 'float32'.*"
     "'bfloat16', 'float16'"),
    ('train.accelerator', 'tpu-v5p', "config.train.accelerator = 'tpu-v5p'.*'cpu', 'tpu_v4', .*'tpu_v5p'"),
]


@pytest.mark.parametrize('field, value, message', BAD_FIELDS)
def test_bad_field_fails_with_its_message(field, value, message):
  config = tiny.get_config()
  if field == 'model.norm.mix_post_layers':
    config.model.norm.placement = 'mix'
  if field == 'model.norm.freeze_out_scale':
    config.model.norm.placement = 'pre'  # tiny's own; said here because the check depends on it
  if field == 'data.path':
    config.data.source = 'hf_disk'
  parent, name = field.rsplit('.', 1)
  node = config
  for part in parent.split('.'):
    node = node[part]
  node[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_float16_parameters_need_float16_compute():
  config = tiny.get_config()
  config.model.param_dtype = 'float16'
  with pytest.raises(config_lib.ConfigError, match='pure float16'):
    config_lib.validate(config)


def test_accelerator_is_checked_when_loaded_and_every_table_name_is_allowed():
  # Unchecked, a bad name passed validation and failed in hardware.peak_flops once the train state was built.
  with pytest.raises(config_lib.ConfigError, match="config.train.accelerator = 'tpu-v5p' is not allowed"):
    config_lib.load(tiny.__file__, ['--config.train.accelerator=tpu-v5p'])
  for name in ('cpu', *hardware.ACCELERATORS):
    config_lib.load(tiny.__file__, [f'--config.train.accelerator={name}'])


def test_cudnn_attention_is_allowed_in_half_precision():
  for dtype in ('bfloat16', 'float16'):
    config = tiny.get_config()
    config.model.update(attention_impl='cudnn', compute_dtype=dtype)
    config_lib.validate(config)


def test_frozen_output_scale_is_allowed_where_an_output_norm_exists():
  for placement in ('post', 'peri', 'pre_post', 'output', 'mix'):
    config = tiny.get_config()
    config.model.norm.update(placement=placement, freeze_out_scale=True)
    config_lib.validate(config)
  config.model.norm.mix_post_layers = 0  # Mix-LN with no Post-LN layer is all Pre-LN: nothing to freeze
  with pytest.raises(config_lib.ConfigError, match="placement 'mix' has no output norm"):
    config_lib.validate(config)


def test_paper_configs_use_megatrons_init_and_tiny_says_its_own():
  for module in (paper_400m, paper_1_5b, paper_3_2b):
    assert module.get_config().model.init.to_dict() == {'std': 0.02, 'depth_scaled_outputs': True}
  assert tiny.get_config().model.init.to_dict() == {'std': 0.02, 'depth_scaled_outputs': False}


def test_shipped_configs_are_valid():
  for module in (default, tiny, paper_400m, paper_1_5b, paper_3_2b):
    config_lib.validate(module.get_config())


@pytest.mark.parametrize('module, billions', [(paper_400m, 0.4), (paper_1_5b, 1.5), (paper_3_2b, 3.2)])
def test_paper_configs_are_within_5_percent_of_their_name(module, billions):
  counts = params_lib.count_params(module.get_config().model)
  assert abs(counts['non_embedding'] / (billions * 1e9) - 1) < 0.05


def test_parameter_count_matches_the_formula():
  config = tiny.get_config()
  m = config.model
  d, v, layers, mlp = m.d_model, m.vocab_size, m.num_layers, 384  # tiny: 8/3 * 128 rounded up to 64
  per_layer = 4 * d * d + 3 * d * mlp + 2 * d  # q, k, v, out; gate, up, down; two RMSNorm scales (Pre-LN)
  counts = params_lib.count_params(m)
  assert counts['embedding'] == v * d
  assert counts['non_embedding'] == layers * per_layer + d  # + the final norm


def test_parse_value_reads_each_field_type_and_names_bad_input():
  config = default.get_config()
  assert config_lib.parse_value(config, 'optimizer.lr', '3e-3') == 3e-3
  assert config_lib.parse_value(config, 'model.num_layers', '12') == 12
  assert config_lib.parse_value(config, 'model.scan_layers', 'false') is False
  assert config_lib.parse_value(config, 'model.norm.placement', 'peri') == 'peri'
  assert config_lib.parse_value(config, 'eval.tasks', 'next_line, piqa') == ('next_line', 'piqa')
  assert config_lib.parse_value(config, 'eval.tasks', "('piqa',)") == ('piqa',)
  with pytest.raises(ValueError, match=r"model.num_layers='many': not a valid int"):
    config_lib.parse_value(config, 'model.num_layers', 'many')
  with pytest.raises(ValueError, match="config has no field 'model.placement'; did you mean .*model.norm.placement"):
    config_lib.parse_value(config, 'model.placement', 'peri')
