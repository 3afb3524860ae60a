"""How fast GPUs exchange bytes: the link a collective runs over, and the seconds a ring collective takes.

Inside an instance the GPUs talk over NVLink/NVSwitch or PCIe. Between instances a ring crosses each
instance boundary once per channel and NCCL spreads its channels over every NIC, so a GPU's share of
the cross-instance bandwidth is the whole instance network, capped by its own intra-node link.
"""

from __future__ import annotations

import re

from ftplan.data import catalog


def network_gbytes_per_s(network: str) -> float:
    """An EC2 network performance string ('4x100 Gb', 'up to 25 Gb', '3200 Gb') in GB/s."""
    m = re.search(r"(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*Gb", network)
    if not m:
        return catalog.throughput().communication.network_floor_gbytes_per_s
    return (int(m.group(1) or 1) * float(m.group(2))) / 8


def intra_node_gbytes_per_s(instance: catalog.Instance) -> float:
    """Bus bandwidth per GPU between the GPUs of one instance: NVLink/NVSwitch when it has them, else PCIe."""
    comm = catalog.throughput().communication
    speeds = comm.intra_node_gbytes_per_s
    linked = any(k in instance.interconnect for k in ("NVLink", "NVSwitch"))
    return speeds.get(instance.gpu.split("-")[0] if linked else "PCIe", speeds["PCIe"]) * comm.bus_efficiency


def inter_node_gbytes_per_s(instance: catalog.Instance) -> float:
    """Bus bandwidth of one instance's whole network to the others (half of it without EFA)."""
    comm = catalog.throughput().communication
    efa = 1.0 if instance.efa else comm.inter_node_without_efa_factor
    return network_gbytes_per_s(instance.network) * efa * comm.bus_efficiency


def link_gbytes_per_s(instance: catalog.Instance, count: int) -> float:
    """The per-GPU bandwidth of a ring over `count` instances: the intra-node link, or the instance network
    when several instances take part and it is slower."""
    intra = intra_node_gbytes_per_s(instance)
    return min(intra, inter_node_gbytes_per_s(instance)) if count > 1 else intra


def allreduce_seconds(nbytes: float, instance: catalog.Instance, count: int) -> float:
    """A ring all-reduce of `nbytes` over every GPU of `count` instances: 2 (N-1)/N of them per GPU."""
    gpus = instance.gpu_count * count
    if gpus == 1:
        return 0.0
    return 2 * (gpus - 1) / gpus * nbytes / (link_gbytes_per_s(instance, count) * 1e9)


def gather_seconds(nbytes: float, instance: catalog.Instance, count: int) -> float:
    """A ring all-gather (or reduce-scatter) of `nbytes` over every GPU of `count` instances: each GPU
    receives (N-1)/N of them."""
    gpus = instance.gpu_count * count
    if gpus == 1:
        return 0.0
    return (gpus - 1) / gpus * nbytes / (link_gbytes_per_s(instance, count) * 1e9)
