"""perijax's data layer. tokenizers.py: byte and SentencePiece tokenizers, recorded in the workdir; corpus.py: the
embedded `shakespeare_milton` TFDS dataset (`python -m perijax.data.corpus` prepares it); pipeline.py: grain pipelines
(shuffle, tokenize, pack, batch, shard); sources.py: JSONL, Parquet and HF save_to_disk files as sources.
Nothing is imported here, so `python -m perijax.data.corpus` does not import the builder twice.
"""
