"""`python -m gpt2_jax.evaluate`: see gpt2_jax/tools/evaluate.py."""

if __name__ == "__main__":
    import sys

    from gpt2_jax.tools.evaluate import cli

    sys.exit(cli())
