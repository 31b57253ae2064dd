"""Every perijax config field, with its default and a one-line comment.

Other configs start from this one and change what they need. Every field can be overridden on the command line:
    python -m perijax.train --config=configs/tiny.py --config.model.norm.placement=peri
Validation of these fields lives in `perijax/config.py`, next to nothing else.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # ---- model -------------------------------------------------------------------------------------------------------
  model = config.model = ml_collections.ConfigDict()
  model.vocab_size = 320            # embedding rows; >= the tokenizer's vocabulary (byte tokenizer: 258)
  model.d_model = 128               # width of the residual stream
  model.num_layers = 4              # Transformer layers, each an attention and an MLP sub-layer
  model.num_heads = 4               # query heads; d_model must be divisible by it
  model.num_kv_heads = 0            # key/value heads for grouped-query attention; 0 = num_heads (plain multi-head)
  model.head_dim = 0                # per-head width; 0 = d_model // num_heads
  model.mlp_dim = 0                 # MLP hidden width; 0 = 8/3 * d_model rounded up to 64 for swiglu,
                                    # 4 * d_model for gelu
  model.mlp_activation = 'swiglu'   # 'swiglu' (gated SiLU, Llama) or 'gelu' (GPT-2)
  model.tie_embeddings = True       # LM head shares the token embedding matrix
  model.rope_theta = 10000.0        # RoPE base frequency
  model.scan_layers = True          # stack layers with nn.scan so compile time does not grow with depth
  model.scan_unroll = 1             # layers per scan iteration (compile time grows with it, not with depth)
  model.remat = 'none'              # activation checkpointing per layer: 'none' | 'minimal' (save matmul
                                    # outputs) | 'full'
  model.attention_impl = 'xla'      # jax.nn.dot_product_attention's 'xla' | 'cudnn' (GPU flash; bfloat16 or float16
                                    # compute only) | 'auto', or 'einsum' (written out; the fastest gradient on CPU)
  model.param_dtype = 'float32'     # dtype the parameters are stored in (master weights); 'float16' = pure float16
  model.compute_dtype = 'float32'   # dtype of activations and matmuls: 'float32' | 'bfloat16' | 'float16'
  model.norm_in_float32 = True      # compute normalization statistics in float32 whatever the compute dtype
  model.softmax_in_float32 = True   # compute the attention softmax in float32
  model.loss_in_float32 = True      # compute logits' log-softmax and the loss in float32

  init = model.init = ml_collections.ConfigDict()  # weight init (the paper's is not known; docs/paper.md, section 2)
  init.std = 0.02                   # std of the normal init of every weight matrix (embedding and LM head too)
  init.depth_scaled_outputs = False  # draw attention out and MLP down with std / sqrt(2 * num_layers) (Megatron-LM)

  norm = model.norm = ml_collections.ConfigDict()
  norm.placement = 'pre'            # 'post' | 'pre' | 'peri' | 'pre_post' | 'output' | 'mix' | 'none' (docs/paper.md)
  norm.kind = 'rmsnorm'             # 'layernorm' | 'rmsnorm'
  norm.eps = 1e-6                   # added to the variance inside the norm
  norm.qk_norm = False              # RMSNorm each head's q and k before RoPE, one [head_dim] scale (Qwen3/Gemma 3 form)
  norm.embed_norm = False           # normalize the embedding output before the first layer (Peri-LN's optional norm)
  norm.mix_post_layers = 1          # placement 'mix': the first this-many layers are Post-LN, the rest Pre-LN
  norm.scale_init = 1.0             # initial value of every norm's scale gamma (QK, embedding and final norms too)
  norm.freeze_out_scale = False     # keep the output norms' gamma at scale_init (Peri-LN's N_out, pre_post's and
                                    # output's out_norm, Post-LN's norm): the frozen-gamma ablation (docs/paper.md)

  # ---- training ----------------------------------------------------------------------------------------------------
  train = config.train = ml_collections.ConfigDict()
  train.steps = 200                 # optimizer steps to train
  train.batch_size = 16             # global batch in sequences, over all processes and devices
  train.seq_len = 128               # tokens per sequence
  train.seed = 0                    # seeds parameters init, data order and dropout-free RNG
  train.log_every = 10              # steps between lines in metrics.jsonl / TensorBoard
  train.stats_every = 50            # steps between per-layer statistics (variance, max |x|, float16 overflows)
  train.massive_k = 8               # statistics steps: the k largest |x| per layer, kept apart for the stream and each
                                    # sub-layer's output (massive activations, Sun et al. 2024)
  train.massive_abs_threshold = 100.0   # a layer's |x| is massive if > this (Sun et al.: 100) ...
  train.massive_ratio_threshold = 1000.0  # ... and > this x the median |x| (Sun et al.: ~1000); read by perijax.report
  train.spike_factor = 3.0          # gradient spike: global grad norm > spike_factor * running median ...
  train.spike_window = 50           # ... of the last spike_window steps' grad norms
  train.divergence_ema_decay = 0.9  # divergence (perijax/instability.py): EMA decay per step of the smoothed loss ...
  train.divergence_margin = 0.5     # ... above its running minimum by more than this many nats ...
  train.divergence_steps = 50       # ... at every logged step for this many steps (or any non-finite loss)
  train.loss_scale = 'dynamic'      # float16 only: 'dynamic' (flax DynamicScale) | 'none'
  train.initial_loss_scale = 65536.0  # starting loss scale for float16 (2**16)
  train.loss_scale_growth_interval = 2000  # good steps before the loss scale doubles
  train.accelerator = 'cpu'         # for the MFU estimate: 'cpu' (measured matmul rate; MFU is NaN on a GPU or
                                    # TPU) or a name in perijax/hardware.py
  train.compilation_cache_dir = '~/.cache/perijax/xla'  # persistent XLA compilation cache: a restart or a rerun of
                                    # the same config skips compiling; '' = off (JAX_COMPILATION_CACHE_DIR wins if set)
  train.xla_flags_preset = 'none'   # 'gpu': XLA flags for speed on NVIDIA GPUs (perijax/runtime.py), added to XLA_FLAGS

  # ---- optimizer ---------------------------------------------------------------------------------------------------
  optimizer = config.optimizer = ml_collections.ConfigDict()
  optimizer.lr = 3e-3               # peak learning rate
  optimizer.warmup_steps = 20       # linear warmup from 0 to lr
  optimizer.schedule = 'cosine'     # decay after warmup: 'cosine' | 'linear' | 'constant'
  optimizer.end_lr_factor = 0.1     # final lr = end_lr_factor * lr
  optimizer.b1 = 0.9                # AdamW beta1
  optimizer.b2 = 0.95               # AdamW beta2
  optimizer.eps = 1e-8              # AdamW epsilon
  optimizer.weight_decay = 0.1      # decoupled weight decay, masked off norms and biases
  optimizer.grad_clip = 1.0         # global-norm gradient clipping; 0 = off
  optimizer.grad_accum_steps = 1    # micro-batches per optimizer step, averaged inside one jitted step

  # ---- device mesh and sharding ------------------------------------------------------------------------------------
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1                    # data-parallel axis size; -1 = all devices the other axes leave
  mesh.fsdp = 1                     # fully-sharded data parallel: shards parameters and optimizer state too
  mesh.tensor = 1                   # tensor parallel: splits heads and MLP width
  # The three sizes above are per TPU slice (ICI). Over several slices each axis also has a part across slices (DCN,
  # slower): by default data parallelism across slices, whose gradient all-reduce is once per step.
  mesh.dcn_data = -1                # slices the data axis spans; -1 = all slices that dcn_fsdp leaves
  mesh.dcn_fsdp = 1                 # slices the fsdp axis spans (parameter all-gathers cross DCN every layer)
  # Logical axis -> mesh axis (or None = replicated). The model names its axes; this table alone says where they go.
  mesh.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('embed', 'fsdp'),
      ('vocab', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('norm', None),
      ('layers', None),
      ('act_embed', None),
  )

  # ---- data --------------------------------------------------------------------------------------------------------
  data = config.data = ml_collections.ConfigDict()
  data.source = 'tfds'              # 'tfds' | 'jsonl' | 'parquet' | 'hf_disk' (datasets.save_to_disk); see data.path
  data.path = ''                    # jsonl/parquet/hf_disk: files or directory, '{split}' replaced by the split name
  data.name = 'shakespeare_milton'  # TFDS dataset name, e.g. 'shakespeare_milton' (embedded), 'c4/en', 'lm1b'
  data.data_dir = ''                # TFDS data dir (a path; on a pod a gcsfuse-mounted bucket);
                                    # '' = ~/tensorflow_datasets
  data.train_split = 'train'        # split to train on
  data.eval_split = 'validation'    # held-out split for evaluation loss and per-layer statistics
  data.text_field = 'text'          # feature holding the text
  data.tokenizer = 'byte'           # 'byte' (no files) | 'sentencepiece'
  data.tokenizer_path = ''          # sentencepiece: path to a .model file
  data.worker_count = 0             # grain worker processes; 0 = in the main process
  data.prefetch = 2                 # batches prefetched ahead of the train step
  data.eval_max_batches = 0         # evaluation batches; 0 = the whole eval split once
  data.process_split = 'documents'  # multi-host input: 'documents' (each process reads a disjoint shard; scales) or
                                    # 'rows' (each reads all, keeps its rows: batches identical for any process count)

  # ---- checkpoints -------------------------------------------------------------------------------------------------
  checkpoint = config.checkpoint = ml_collections.ConfigDict()
  checkpoint.every = 100            # steps between checkpoints (and one at the end); 0 = only at the end
  checkpoint.keep = 3               # checkpoints kept; older ones are deleted
  checkpoint.keep_period = 0        # also keep, forever, every checkpoint whose step is a multiple of this; 0 = none
  checkpoint.async_save = True      # write checkpoints in the background while training continues

  # ---- evaluation --------------------------------------------------------------------------------------------------
  evaluation = config.eval = ml_collections.ConfigDict()
  evaluation.batch_size = 16        # sequences per evaluation batch
  evaluation.tasks = ('next_line',)  # zero-shot tasks: 'next_line' (embedded), 'arc_easy', 'hellaswag', 'piqa',
                                     # 'siqa', 'winogrande'
  evaluation.max_examples = 200     # examples per task; 0 = all
  evaluation.tasks_data_dir = ''    # TFDS data dir for the benchmark datasets; '' = data.data_dir
  evaluation.hellaswag_path = ''    # original HellaSwag JSONL (validation), for the 'hellaswag' task
  evaluation.siqa_path = ''         # original Social IQa JSONL + labels, for the 'siqa' task
  evaluation.packed_scoring = True   # several task requests per row, kept apart by segment ids (same scores, faster)
  evaluation.lm_eval_results = True  # also write lm-evaluation-harness's results_<time>.json under WORKDIR/eval/lm_eval

  # ---- Weights & Biases (beside metrics.jsonl and TensorBoard) ------------------------------------------------------
  wandb = config.wandb = ml_collections.ConfigDict()
  wandb.enabled = False             # also log training metrics to W&B; run name = workdir name, id kept in the workdir
  wandb.project = 'perijax'         # W&B project
  wandb.entity = ''                 # W&B user or team; '' = your default entity
  wandb.mode = 'online'             # 'online' | 'offline' (sync later with `wandb sync`) | 'disabled'; WANDB_MODE wins

  return config
