"""The bundled SageMaker trainer backend, registered through the public `register_backends` hook.

Importing this module is cheap: boto3 loads only when a job is checked or started.
"""

from ftplan.api import hookimpl


@hookimpl
def register_backends(register):
    from .backend import SageMakerBackend

    register(SageMakerBackend())
