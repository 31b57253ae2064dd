"""What a training process sets before it compiles anything: XLA flags (read once, when jax starts its first backend,
so `setup(config.train)` runs first in `perijax.train`'s main) and the persistent compilation cache."""

import os

import jax

# NVIDIA GPU flags for speed (JAX's "GPU performance tips" and MaxText's GPU recipes). All are XLA debug options that
# the CPU jaxlib parses too, so tests/test_runtime.py checks that this jaxlib still knows every one of them.
XLA_FLAGS_PRESETS = {
    'none': (),
    'gpu': (
        '--xla_gpu_enable_latency_hiding_scheduler=true',  # schedule collectives to overlap with compute
        '--xla_gpu_enable_highest_priority_async_stream=true',  # ... and run them on a high-priority stream
        '--xla_gpu_enable_triton_gemm=false',  # cuBLAS for matmuls, not Triton's generated kernels
        '--xla_gpu_enable_pipelined_all_gather=true',  # FSDP: gather the next layer's weights during this one
        '--xla_gpu_enable_pipelined_reduce_scatter=true',  # ... and scatter its gradients the same way
        '--xla_gpu_enable_pipelined_all_reduce=true',
        '--xla_gpu_enable_while_loop_double_buffering=true',  # the scanned layer loop: overlap iterations
        '--xla_gpu_all_reduce_combine_threshold_bytes=1073741824',  # fewer, larger collectives
        '--xla_gpu_all_gather_combine_threshold_bytes=1073741824',
        '--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728',
        '--xla_gpu_enable_all_gather_combine_by_dim=false',
        '--xla_gpu_enable_reduce_scatter_combine_by_dim=false',
        '--xla_disable_hlo_passes=rematerialization',  # recomputation is model.remat's choice, not the compiler's
    ),
}


def xla_flags(preset, current=''):
  """`current` XLA_FLAGS plus the preset's flags; a flag the user already set keeps the user's value."""
  already = {flag.split('=', 1)[0] for flag in current.split()}
  added = [flag for flag in XLA_FLAGS_PRESETS[preset] if flag.split('=', 1)[0] not in already]
  return ' '.join([current.strip()] + added).strip()


def setup(train_config):
  """Applies `train.xla_flags_preset` to XLA_FLAGS and turns on the compilation cache in `train.compilation_cache_dir`
  (JAX_COMPILATION_CACHE_DIR in the environment wins). Fields absent from older runs' configs mean off."""
  preset = train_config.get('xla_flags_preset', 'none')
  if XLA_FLAGS_PRESETS.get(preset):  # 'none' adds nothing; an unknown one fails validation, before any compile
    os.environ['XLA_FLAGS'] = xla_flags(preset, os.environ.get('XLA_FLAGS', ''))
  cache_dir = train_config.get('compilation_cache_dir', '')
  if cache_dir and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    # Only compiles that take over jax_persistent_cache_min_compile_time_secs (1 s) are written: the train steps.
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
