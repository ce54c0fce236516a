"""Inference: the KV-cache sampler (sampling.py), the generate CLI (generate.py), greedy completions scored with ROUGE (rouge.py)."""
