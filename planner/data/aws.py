"""boto3 at ftplan's edge: clients, and one clear line for every botocore failure. boto3 is imported
only inside these functions."""

from __future__ import annotations

from ftplan.errors import PlannerError


def aws_error(exc: Exception, what: str = "the AWS Price List API", keep: str = "the bundled prices stay in use"
              ) -> PlannerError:
    """One clear line for a botocore failure: credentials, network, or a refused request."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
        ReadTimeoutError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError)):
        return PlannerError("no AWS credentials found (boto3's chain: environment, ~/.aws, instance role); "
                            f"configure them with aws configure - {keep}")
    if isinstance(exc, ProfileNotFound):
        return PlannerError(f"AWS profile {exc.kwargs.get('profile')!r} does not exist (AWS_PROFILE or --profile); "
                            f"set it up with aws configure --profile NAME - {keep}")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        return PlannerError(f"cannot reach {what} (no network?); {keep}")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return PlannerError(f"{what} refused the request ({error.get('Code', 'error')}: "
                            f"{error.get('Message') or 'no message'}); check the credentials' permissions - {keep}")
    return PlannerError(f"AWS request failed ({type(exc).__name__}); {keep}")


def client(service: str, region: str, *, need: str = "this"):
    try:
        import boto3
    except ImportError:
        raise PlannerError(f"{need} needs boto3: pip install 'ftplan[aws]'") from None
    from botocore.exceptions import BotoCoreError

    try:
        return boto3.client(service, region_name=region)
    except BotoCoreError as exc:
        raise aws_error(exc) from None
