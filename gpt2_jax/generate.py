"""`python -m gpt2_jax.generate`: see gpt2_jax/infer/generate.py."""

if __name__ == "__main__":
    import sys

    from gpt2_jax.infer.generate import cli

    sys.exit(cli())
