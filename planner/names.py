"""The one pattern for names that plugins register and plans refer to: backends, platforms, plugins.

A lower-case identifier (letters, digits, '.', '_', '-'), never a Python path: a plan names a
registered backend, it cannot make ftplan import anything.
"""

from typing import Annotated

from pydantic import StringConstraints

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=64)]
