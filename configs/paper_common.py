"""What the three paper-scale configs share; each size file sets only the shape. Sources: docs/paper.md, section 4.

From the paper: 30B tokens per run, the tiktoken cl100k_base tokenizer (~100k tokens), Pre- against Peri-LN, float16
results. Secondary source: a peak lr around 2e-3. Chosen here (not known from the paper): float16 compute with float32
master weights and dynamic loss scaling, sequence 2048, global batch 256 x 2048 = 0.5M tokens (57,220 steps = 30B
tokens), warmup 2,000 steps then cosine to 10%, AdamW(0.9, 0.95), weight decay 0.1, Megatron-LM's default init (the
paper trained with Megatron-LM: std 0.02, output projections 0.02/sqrt(2 * num_layers)), SwiGLU, RMSNorm. Data: a
prepared TFDS text dataset (C4 here; the paper's DCLM-baseline is not in TFDS) with a SentencePiece tokenizer of ~100k
pieces given by path: --config.data.tokenizer_path=/gcs/BUCKET/spm100k.model.
"""

from configs import default


def get_config(d_model, num_layers, num_heads, mlp_dim):
  config = default.get_config()
  config.model.update(vocab_size=100352, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                      mlp_dim=mlp_dim, tie_embeddings=False, compute_dtype='float16', remat='minimal')
  config.model.norm.placement = 'peri'
  config.model.init.update(std=0.02, depth_scaled_outputs=True)  # Megatron-LM's init_method_std, scaled output init
  config.train.update(steps=57_220, batch_size=256, seq_len=2048, log_every=50, stats_every=500, accelerator='h100')
  config.optimizer.update(lr=2e-3, warmup_steps=2000, schedule='cosine')
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.data.update(name='c4/en', eval_split='validation', tokenizer='sentencepiece', worker_count=4)
  config.checkpoint.update(every=1000, keep=3)
  config.eval.update(batch_size=64, tasks=('arc_easy', 'hellaswag', 'piqa', 'siqa', 'winogrande'), max_examples=0)
  return config
