"""perijax's data layer: tokenizers, the embedded Shakespeare + Milton corpus (a TFDS builder), grain pipelines.

  tokenizers.py  byte-level (default) and SentencePiece tokenizers; the tokenizer record in a workdir
  corpus.py      the `shakespeare_milton` TFDS dataset and its prepare command: python -m perijax.data.corpus
  pipeline.py    grain over tfds.data_source: shuffle, tokenize, pack, batch, shard; train and eval iterators
  sources.py     JSONL, Parquet and Hugging Face save_to_disk files as grain sources (config.data.source)

Nothing is imported here, so `python -m perijax.data.corpus` does not import the builder twice.
"""
