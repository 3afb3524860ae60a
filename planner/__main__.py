"""`python -m planner` runs the ftplan CLI."""

from .cli import main

main()
