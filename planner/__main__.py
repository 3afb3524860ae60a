"""`python -m ftplan` runs the ftplan CLI."""

from ftplan.cli.main import main

main()
