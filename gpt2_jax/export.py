"""`python -m gpt2_jax.export`: see gpt2_jax/tools/export.py."""

if __name__ == "__main__":
    import sys

    from gpt2_jax.tools.export import cli

    sys.exit(cli())
