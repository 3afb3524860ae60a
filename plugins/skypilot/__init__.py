"""The bundled SkyPilot trainer backend, registered through the public `register_backends` hook.

Importing this module is cheap: SkyPilot and boto3 load only when a run is checked or launched.
"""

from ftplan.api import hookimpl


@hookimpl
def register_backends(register):
    from .backend import SkyPilotBackend

    register(SkyPilotBackend())
