"""The error every package raises for bad user input, and how its messages quote that input.

It lives in ``training``, the lowest package that raises it (serving and services import training;
training and monitoring import nothing above them), so raising it never makes an import climb.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from a user (a path, a name, an option): the CLI prints it and exits with code 2."""


ECHO_CHARS = 64


def echo(value: str) -> str:
    """What an error message repeats of its input: the start, never a 100 KB name whole."""
    return value if len(value) <= ECHO_CHARS else f"{value[:ECHO_CHARS]}… ({len(value)} chars)"
