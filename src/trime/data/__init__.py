"""Data: dictionaries, corpora, token arrays, blocks and batches."""
