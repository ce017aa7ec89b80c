"""Errors meant for the user: the CLI prints them as one line (no traceback)."""


class QtvitError(Exception):
    """A problem with the user's input (a path, a name, a config value); the message says which."""
