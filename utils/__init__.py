"""Data in, data out: corpora, cleaning, dedup, tokenizer, datasets, metrics."""
