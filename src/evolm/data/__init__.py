"""Data: built-in corpora, user sources, quality filters, dedup, token shards, mixtures."""
