"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class PlannerError(Exception):
    """Bad input or a missing resource, with a message that says what is wrong and how to fix it."""
