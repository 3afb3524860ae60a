"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class PlannerError(Exception):
    """Bad input or a missing resource, with a message that says what is wrong and how to fix it."""


_CONTROL = str.maketrans({c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]})


def printable(text: str) -> str:
    """`text` without control characters (tab and newline kept): an escape sequence in a model name, a path or a
    plugin's message must not reach the terminal, where it could retitle the window, clear the screen or forge
    output."""
    return text.translate(_CONTROL)
