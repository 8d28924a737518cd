"""Tokenizer, contest shards, corpus conversion and per-rank loading."""
