"""Data: token shards (shards.py), documents (documents.py), `prepare` (prepare.py, pairs.py for
prompt/completion examples), the grain training pipeline (loader.py) and the bundled corpus."""
