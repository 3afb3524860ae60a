"""Bundled ftplan plugins. Each registers through the same hooks (planner/hookspecs.py) a third
party uses; planner/plugins.py lists them in BUNDLED."""
