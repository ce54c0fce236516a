"""Data: token shards (shards.py), documents (documents.py), `prepare` (prepare.py; tokenize.py for
pretraining shards, pairs.py for prompt/completion examples), the grain training pipeline (loader.py),
the bundled corpus (corpus.py) and a synthetic dialogue set (dialogues.py)."""
