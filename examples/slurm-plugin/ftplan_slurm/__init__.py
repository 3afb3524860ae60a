"""An example ftplan plugin: on-premise hardware in the catalog and a Slurm trainer backend.

Everything it uses comes from `ftplan.api`, the one module plugins import.
"""

from ftplan.api import hookimpl

# The cluster, as catalog entries: instance types priced in the cluster's own "region" and platform.
# The rate is an example internal charge-back figure, not a published price.
CLUSTER = "dc1"
RATE_SOURCE = "example internal charge-back rate of the dc1 cluster (ftplan-slurm-example)"


@hookimpl
def register_catalog_entries(register_instance):
    """Only the argument it uses: ftplan calls hooks through pluggy."""
    for gpus, rate in ((1, 1.5), (8, 12.0)):
        register_instance({
            "type": f"onprem-a100x{gpus}", "gpu": "A100-80GB", "gpu_count": gpus, "vcpus": 16 * gpus,
            "memory_gib": 128.0 * gpus, "network": "100 Gb", "interconnect": "NVSwitch" if gpus > 1 else "PCIe",
            "efa": False, "spec_source": "example cluster inventory",
            "prices": [{"usd_per_hour": rate, "region": CLUSTER, "platform": "onprem", "market": "on-demand",
                        "date": "2026-11-01", "source": RATE_SOURCE}]})


@hookimpl
def register_backends(register):
    from .backend import SlurmBackend  # imported when backends are asked for, not when the plugin loads

    register(SlurmBackend())
