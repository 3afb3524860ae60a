"""ftplan's plugin API: the one module a plugin author imports.

    from ftplan.api import hookimpl, TrainerBackend, BackendOptions, Problem, RunResult

    class MyBackend(TrainerBackend):
        name = "my-backend"
        ...

    @hookimpl
    def register_backends(register):
        register(MyBackend())

and in the plugin's pyproject.toml:

    [project.entry-points.ftplan]
    my_backend = "my_package.ftplan_plugin"

Everything here is public and versioned by `API_VERSION` (major.minor: a new minor adds, a new major
may change or remove). Importing this module is cheap; the helpers for backends that train with
the Hugging Face stack import torch only when called. The bundled backends (ftplan.backends.hf,
ftplan.backends.sagemaker) import nothing else from ftplan.
"""

from ftplan import __version__
from ftplan.data.aws import aws_error
from ftplan.data.catalog import CatalogModel, Gpu, Instance, Price, ec2_quotas, get_gpu, get_instance, sagemaker_images
from ftplan.data.catalog import pricing as pricing_rules
from ftplan.data.dataset import check_training_data, example_text, is_saved_dataset, read_records
from ftplan.data.files import atomic_write_text, user_dir
from ftplan.data.jsonl import iter_offsets as iter_record_offsets
from ftplan.data.jsonl import open_dataset, record_at, record_kind
from ftplan.errors import PlannerError
from ftplan.model.resolve import resolve_model
from ftplan.model.spec import ModelSpec
from ftplan.plan import Plan, check_targets, install_extras, weights_source
from ftplan.plan import load as load_plan
from ftplan.plan import to_yaml as plan_to_yaml
from ftplan.run.backend import (
                                ANY_PLATFORM,
                                BackendOptions,
                                Problem,
                                ProgressCallback,
                                ProgressEvent,
                                RunRequest,
                                RunResult,
                                TrainerBackend,
)
from ftplan.run.bundle import dist_info_files, source_files
from ftplan.run.execute import execute as execute_run
from ftplan.run.execute import prepare as prepare_run
from ftplan.run.hookspecs import hookimpl
from ftplan.train.build import build_model, build_optimizer, uses_autocast

API_VERSION = "1.3"  # 1.1: TrainerBackend.notices, RunResult.wall_clock_seconds, sagemaker_images, ec2_quotas,
# iter_record_offsets, open_dataset, record_at, check_targets; 1.2: record_kind; 1.3: install_extras

__all__ = [
    "API_VERSION", "__version__",
    # hooks and the backend contract
    "hookimpl", "TrainerBackend", "ANY_PLATFORM", "BackendOptions", "Problem", "RunRequest", "RunResult", "ProgressEvent",
    "ProgressCallback", "Plan", "PlannerError",
    # catalog entries (register_catalog_entries) and lookups
    "CatalogModel", "Gpu", "Instance", "Price", "get_gpu", "get_instance", "pricing_rules",
    # clouds: SageMaker's training images, EC2's vCPU quota codes
    "sagemaker_images", "ec2_quotas",
    # plans, files and data
    "load_plan", "plan_to_yaml", "weights_source", "check_targets", "install_extras", "user_dir",
    "atomic_write_text",
    "read_records",
    "check_training_data", "is_saved_dataset", "example_text",
    # JSONL read in constant memory (1.1): (line, byte offset, record, text) per line; a record by offset
    "iter_record_offsets", "open_dataset", "record_at",
    # a record's format, decided once for planner and trainers alike (1.2): "text", "pair", "chat" or None
    "record_kind",
    # remote backends: ftplan's own source as it imports, running a plan where the data landed, AWS errors
    "source_files", "dist_info_files", "prepare_run", "execute_run", "aws_error",
    # the Hugging Face stack (torch imported when called)
    "ModelSpec", "resolve_model", "build_model", "build_optimizer", "uses_autocast",
]
