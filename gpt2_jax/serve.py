"""`python -m gpt2_jax.serve`: see gpt2_jax/infer/serve.py."""

if __name__ == "__main__":
    import sys

    from gpt2_jax.infer.serve import cli

    sys.exit(cli())
