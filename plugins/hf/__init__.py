"""The bundled Hugging Face trainer backend, registered through the public `register_backends` hook.

Importing this module is cheap: torch and friends load only when a run starts.
"""

from ftplan.api import hookimpl


@hookimpl
def register_backends(register):
    from .backend import HuggingFaceBackend

    register(HuggingFaceBackend())
