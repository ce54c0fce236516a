"""UserError: the one base of every error a user can cause and fix; each CLI prints it as `error: ...` and exits 2."""


class UserError(Exception):
    """Something the user can fix (bad input, config, files or command line); the message says
    what and how. Stage-specific kinds (DataError, ConfigError, HFFormatError, ...) subclass it,
    so `except UserError` catches them all."""
