"""`python -m gpt2_jax.prepare`: see gpt2_jax/data/prepare.py."""

if __name__ == "__main__":
    import sys

    from gpt2_jax.data.prepare import main

    sys.exit(main())
