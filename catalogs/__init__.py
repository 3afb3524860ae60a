"""ftplan's data: model architectures, GPUs, AWS instances and prices, each with its source and date.

Shipped inside the wheel and read with importlib.resources by planner.catalog.
"""
