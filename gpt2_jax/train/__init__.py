"""Training: config -> checked Plan (plan.py), pure steps (steps.py), the optimizer, the Trainer's
compiled functions (trainer.py), the loop and its hooks (loop.py, hooks.py), metrics, and the CLI
(cli.py; `python -m gpt2_jax.train` runs __main__.py)."""
