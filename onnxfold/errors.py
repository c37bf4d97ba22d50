"""Errors that reach the user as one clear line (the CLI exits 2 on them)."""


class UserError(Exception):
    """Bad input or usage: the message says what is wrong and how to fix it."""
