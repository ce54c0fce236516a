"""`python -m gpt2_jax.plot`: see gpt2_jax/tools/plot.py."""

if __name__ == "__main__":
    import sys

    from gpt2_jax.tools.plot import cli

    sys.exit(cli())
