"""`python -m gpt2_jax.bench`: see gpt2_jax/tools/bench.py."""

if __name__ == "__main__":
    import sys

    from gpt2_jax.tools.bench import cli

    sys.exit(cli())
