"""Files in and out: Hugging Face folders (hf.py), the GPT-2 tokenizer (tokenizer.py), our Orbax
checkpoints (checkpoint.py), and a model for inference from either kind of folder (load.py)."""
