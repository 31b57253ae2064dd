"""The one config loader (`--config=FILE[:arg]` and `--config.a.b=value` overrides) and the checks every config passes
before anything is built or compiled. The fields, their defaults and their meaning live in configs/default.py."""

import difflib
import importlib.util
import os
from typing import Any, List

from absl import flags
import ml_collections
from ml_collections.config_flags import config_flags
from ml_collections.config_flags import config_path
from ml_collections.config_flags import tuple_parser

from perijax.errors import UserError
from perijax.hardware import ACCELERATORS
from perijax.norms import NORM_KINDS
from perijax import placement as placement_lib
from perijax.placement import PLACEMENTS
from perijax.precision import DTYPES
from perijax.runtime import XLA_FLAGS_PRESETS

# Checked field by field; a field absent from an older run's config.json is skipped, as it did not exist yet.
POSITIVE = ('model.vocab_size', 'model.d_model', 'model.num_layers', 'model.num_heads', 'model.scan_unroll',
            'model.rope_theta', 'model.init.std', 'model.norm.eps', 'model.norm.scale_init', 'train.steps',
            'train.batch_size', 'train.seq_len', 'train.log_every', 'train.stats_every', 'train.spike_factor',
            'train.spike_window', 'train.initial_loss_scale', 'train.loss_scale_growth_interval',
            'train.divergence_margin', 'train.divergence_steps', 'train.massive_k', 'train.massive_abs_threshold',
            'train.massive_ratio_threshold', 'optimizer.lr', 'optimizer.grad_accum_steps', 'eval.batch_size',
            'checkpoint.keep')
NON_NEGATIVE = ('model.num_kv_heads', 'model.head_dim', 'model.mlp_dim', 'model.norm.mix_post_layers',
                'optimizer.warmup_steps', 'optimizer.weight_decay', 'optimizer.grad_clip', 'optimizer.end_lr_factor',
                'checkpoint.every', 'checkpoint.keep_period', 'eval.max_examples', 'data.worker_count',
                'data.eval_max_batches')
CHOICES = {
    'model.norm.placement': PLACEMENTS, 'model.norm.kind': NORM_KINDS, 'model.param_dtype': tuple(DTYPES),
    'model.compute_dtype': tuple(DTYPES), 'model.mlp_activation': ('swiglu', 'gelu'),
    'model.remat': ('none', 'minimal', 'full'), 'model.attention_impl': ('xla', 'cudnn', 'auto', 'einsum'),
    'optimizer.schedule': ('cosine', 'linear', 'constant'), 'train.loss_scale': ('dynamic', 'none'),
    'train.xla_flags_preset': tuple(XLA_FLAGS_PRESETS), 'train.accelerator': ('cpu', *ACCELERATORS),
    'data.tokenizer': ('byte', 'sentencepiece'), 'data.process_split': ('documents', 'rows'),
    'data.source': ('tfds', 'jsonl', 'parquet', 'hf_disk'), 'wandb.mode': ('online', 'offline', 'disabled'),
    **dict.fromkeys(('model.norm.freeze_out_scale', 'model.init.depth_scaled_outputs', 'eval.packed_scoring',
                     'eval.lm_eval_results', 'wandb.enabled'), (True, False)),
}
_ABSENT = object()


class ConfigError(UserError, ValueError):
  """A config field has a value perijax cannot use."""


def _fail(field, value, allowed):
  raise ConfigError(f'config.{field} = {value!r} is not allowed: {allowed}')


def _get(config, field):
  """The field's value, or _ABSENT where the config lacks it (a field an older run's config.json predates)."""
  for part in field.split('.'):
    if part not in config:
      return _ABSENT
    config = config[part]
  return config


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError naming the first bad field, its value and what is allowed. Returns the config unchanged."""
  values = {field: _get(config, field) for field in (*POSITIVE, *NON_NEGATIVE, *CHOICES)}
  for field in POSITIVE:
    if values[field] is not _ABSENT and not (_is_number(values[field]) and values[field] > 0):
      _fail(field, values[field], 'expected a positive number')
  for field in NON_NEGATIVE:
    if values[field] is not _ABSENT and not (_is_number(values[field]) and values[field] >= 0):
      _fail(field, values[field], 'expected a number >= 0')
  for field, allowed in CHOICES.items():
    if values[field] is not _ABSENT and values[field] not in allowed:
      _fail(field, values[field], f'expected one of {allowed}')
  m, train = config.model, config.train
  decay = _get(config, 'train.divergence_ema_decay')
  if decay is not _ABSENT and not (_is_number(decay) and 0 <= decay < 1):
    _fail('train.divergence_ema_decay', decay, 'expected a number in [0, 1)')
  if 'massive_k' in train and not isinstance(train.massive_k, int):
    _fail('train.massive_k', train.massive_k, 'expected a positive integer')
  keep_period, every = config.checkpoint.get('keep_period', 0), config.checkpoint.every
  if keep_period and every and keep_period % every:
    _fail('checkpoint.keep_period', keep_period, f'expected a multiple of checkpoint.every = {every} (steps that are '
          'saved), or 0')
  if not m.head_dim and m.d_model % m.num_heads:
    _fail('model.d_model', m.d_model, f'expected a multiple of model.num_heads = {m.num_heads} (or set model.head_dim)')
  head_dim = m.head_dim or m.d_model // m.num_heads
  if head_dim % 2:
    _fail('model.head_dim', head_dim, 'expected an even per-head width (RoPE rotates pairs)')
  if m.num_kv_heads and m.num_heads % m.num_kv_heads:
    _fail('model.num_kv_heads', m.num_kv_heads, f'expected a divisor of model.num_heads = {m.num_heads}')
  if m.norm.placement == 'mix' and m.norm.mix_post_layers > m.num_layers:
    _fail('model.norm.mix_post_layers', m.norm.mix_post_layers,
          f'expected at most model.num_layers = {m.num_layers} Post-LN layers')
  if m.norm.freeze_out_scale and not any(map(placement_lib.has_output_norm,
                                             placement_lib.layer_placements(m.norm, m.num_layers))):
    _fail('model.norm.freeze_out_scale', True, f'placement {m.norm.placement!r} has no output norm to freeze (post, '
          'peri, pre_post, output and mix with mix_post_layers >= 1 have)')
  if m.param_dtype == 'float16' and m.compute_dtype != 'float16':
    _fail('model.param_dtype', m.param_dtype, 'float16 parameters ("pure float16") need model.compute_dtype = float16')
  if m.attention_impl == 'cudnn' and m.compute_dtype not in ('bfloat16', 'float16'):   # else it fails at compile
    _fail('model.attention_impl', 'cudnn', f'model.compute_dtype = {m.compute_dtype!r}, but cuDNN attention takes '
          "only ('bfloat16', 'float16'); set one of them, or model.attention_impl = 'xla', 'auto' or 'einsum'")
  for axes, what in ((('data', 'fsdp', 'tensor'), 'device count'), (('dcn_data', 'dcn_fsdp'), 'number of slices')):
    sizes = {axis: config.mesh.get(axis, 1) for axis in axes}  # dcn_* are absent from configs of older runs
    for axis, size in sizes.items():
      if not isinstance(size, int) or (size < 1 and size != -1):
        _fail(f'mesh.{axis}', size, f'expected a positive {what} or -1 (all remaining)')
    if list(sizes.values()).count(-1) > 1:
      _fail('mesh', sizes, f'at most one of {", ".join(axes)} may be -1')
  if not isinstance(train.get('compilation_cache_dir', ''), str):
    _fail('train.compilation_cache_dir', train.compilation_cache_dir, "expected a directory, or '' (off)")
  source, path = config.data.get('source', 'tfds'), config.data.get('path', '')
  if source in ('jsonl', 'parquet') and '{split}' not in path:
    _fail('data.path', path, f"data.source = {source!r} reads files: expected a path with '{{split}}' in it, e.g. "
          "'corpus/{split}.jsonl' or 'corpus/{split}-*.parquet' ('{split}' becomes data.train_split / "
          'data.eval_split)')
  if source == 'hf_disk' and not path:
    _fail('data.path', path, "data.source = 'hf_disk': expected the directory datasets' save_to_disk wrote (a "
          "DatasetDict), or 'dir/{split}' for one Dataset per split")
  if 'wandb' in config:  # absent from the config.json of runs made before W&B logging existed
    if not isinstance(config.wandb.project, str) or not config.wandb.project.strip():
      _fail('wandb.project', config.wandb.project, 'expected a non-empty W&B project name')
    if not isinstance(config.wandb.entity, str):
      _fail('wandb.entity', config.wandb.entity, "expected a W&B entity name, or '' for your default entity")
    if config.wandb.enabled and importlib.util.find_spec('wandb') is None:
      _fail('wandb.enabled', True, 'the wandb package is not installed (pip install the wandb of requirements.txt)')
  return config


# How `--config.a.b=text` is read for a field of each type: the parsers `--config.` flags themselves use.
_VALUE_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser(),
                  str: flags.ArgumentParser(), tuple: tuple_parser.TupleParser()}


def leaf_fields(config: ml_collections.ConfigDict, prefix: str = '') -> List[str]:
  """Every overridable field path of `config`, e.g. ['model.vocab_size', ..., 'model.norm.placement', ...]."""
  return [path for key, value in config.items() for path in (
      leaf_fields(value, f'{prefix}{key}.') if isinstance(value, ml_collections.ConfigDict) else [f'{prefix}{key}'])]


def check_field(config: ml_collections.ConfigDict, field: str) -> type:
  """Returns the type of `field`, or raises ValueError naming the field and the closest existing ones."""
  fields = leaf_fields(config)
  if field not in fields:
    scored = sorted(((difflib.SequenceMatcher(None, field, f).ratio(), f) for f in fields), reverse=True)
    close = [f for ratio, f in scored[:3] if ratio >= 0.6 and ratio >= scored[0][0] - 0.1]
    # A right leaf name under the wrong parent (e.g. 'norm.placement') is worth suggesting too.
    close += [f for f in fields if f.endswith('.' + field.split('.')[-1]) and f not in close]
    hint = f'; did you mean {" or ".join(close[:3])}?' if close else '; see configs/default.py for every field'
    raise ConfigError(f'config has no field {field!r}{hint}')
  field_type = config_path.get_type(field, config)
  return type(None) if field_type is None else field_type


def parse_value(config: ml_collections.ConfigDict, field: str, text: str) -> Any:
  """Parses `text` as the type of `field` in `config` (an int field takes '3', a float field '1e-3', a tuple field
  '(1, 2)' or, for strings, 'a,b')."""
  field_type = check_field(config, field)
  if field_type is tuple and text.strip()[:1] not in ('(', '['):
    return tuple(part.strip() for part in text.split(',') if part.strip())
  parser = _VALUE_PARSERS.get(field_type, _VALUE_PARSERS[str])  # a None-valued field takes the string itself
  try:
    return parser.parse(text)
  except (ValueError, TypeError, SyntaxError) as e:
    raise ConfigError(f'{field}={text!r}: not a valid {field_type.__name__} '
                     f'(the config has {config_path.get_value(field, config)!r}): {e}') from None


def load_file(config_arg: str) -> ml_collections.ConfigDict:
  """The ConfigDict of `path.py[:arg]` (its get_config()), or ConfigError if the file is missing or broken."""
  path = config_arg.split(':', 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f'--config={config_arg}: {path!r} is not a file; expected a Python file with get_config(), '
                      'e.g. configs/tiny.py')
  try:
    return config_flags.ConfigFileFlagParser(name='config', lock_config=False).parse(config_arg)
  except Exception as error:  # pylint: disable=broad-except  the file's own code failed: the user's to fix
    detail = (str(error).strip().splitlines() or [''])[0]
    raise ConfigError(f'--config={config_arg}: the file cannot be loaded ({type(error).__name__}: {detail}); '
                      'expected a Python file defining get_config() that returns an ml_collections.ConfigDict, '
                      'e.g. configs/tiny.py') from error


def apply_overrides(config: ml_collections.ConfigDict, overrides, sections=None) -> dict:
  """Applies `--config.a.b=text` strings (the `--config.` prefix optional) in place; returns {field: typed value}.
  `sections`: the top-level sections that may be overridden (all by default)."""
  applied = {}
  for override in overrides:
    name, equals, text = override.removeprefix('--config.').partition('=')
    if not equals:
      raise ConfigError(f'{override!r}: expected --config.<section>.<field>=<value>')
    if sections is not None and (name.split('.')[0] not in sections or '.' not in name):
      raise ConfigError(f'--config.{name}: this command may only override config.{{{",".join(sections)}}}.* (the '
                        "model and training fields come from the checkpoint's own config.json)")
    applied[name] = parse_value(config, name, text)  # an unknown field or a bad value: one clear error
    config_path.set_value(name, config, applied[name])
  return applied


def load(config_arg: str, overrides=()) -> ml_collections.ConfigDict:
  """`--config=FILE[:arg]` with the overrides applied, validated: what train, params and dryrun start from."""
  config = load_file(config_arg)
  apply_overrides(config, overrides)
  return validate(config)
