"""Words for recommend's explanations: every reason, why-not, rejection and assumption code, from its figures.

The words are plain text, never markup: the render layer shows them as data (they carry paths and names)."""

from __future__ import annotations

from ftplan.recommend.evaluate import describe_drop
from ftplan.recommend.models import Assumption, Reason, WhyNot

GIB = 2**30



def hours(h: float) -> str:
    """A duration in minutes below an hour, else in hours."""
    return f"{h * 60:.0f} min" if h < 1 else f"{h:,.1f} h"


def _relative(value: float, ref: float) -> str:
    return f"{value / ref - 1:+.0%}" if ref else "n/a"


def rejection(code: str) -> str:
    return describe_drop(code)


def reason(r: Reason) -> str:
    f = r.figures
    if r.code == "priority":
        what = {"cost": "the cheapest plan that fits and meets the constraints",
                "quality": "the cheapest plan in the best quality tier for the task",
                "balanced": "the best balance of cost, time and quality among the plans that fit"}[f["priority"]]
        return f"{what} ({f['ranked']} ranked)"
    if r.code == "headroom":
        return (f"fits with {f['headroom_bytes'] / GIB:.1f} GiB headroom on each of {f['gpus']} {f['gpu']} GPU(s) "
                f"({f['required_bytes'] / GIB:.1f} of {f['gpu_memory_bytes'] / GIB:.1f} GiB)")
    if r.code == "budget":
        return (f"${f['cost_usd']:,.2f} is {f['cost_usd'] / f['budget_usd']:.0%} of the ${f['budget_usd']:,.2f} "
                "budget")
    if r.code == "deadline":
        return f"{f['hours']:.1f} h is within the {f['deadline_hours']:g} h deadline"
    if r.code == "quality":
        return f"quality tier {f['tier']} for {f['task']} ({f['basis']}): {f['evidence']}"
    if r.code == "single_instance_kept":
        return (f"one instance rather than {f['instances']} x {f['instance_type']}: that plan is only "
                f"{f['saving']:.0%} better, below the {f['margin']:.0%} a multi-instance plan must gain")
    if r.code == "multi_instance_wins":
        return (f"several instances: {f['saving']:.0%} better than the best single-instance plan "
                f"({f['single_instance_type']}), above the {f['margin']:.0%} margin")
    return r.code


def why_not(w: WhyNot) -> str:
    f, m = w.figures, w.method
    if w.code == "ranked_lower":
        return (f"{m}: best is {f['instances']} x {f['instance_type']} at ${f['cost_usd']:,.2f} and "
                f"{f['hours']:.1f} h ({_relative(f['cost_usd'], f['vs_cost_usd'])} cost, "
                f"{_relative(f['hours'], f['vs_hours'])} time, quality tier {f['quality_tier']} ({f['basis']}) vs "
                f"{f['vs_quality_tier']})")
    if w.code == "misses_limits":
        limits = []
        if f["budget_usd"] is not None:
            limits.append(f"cheapest ${f['cheapest_usd']:,.2f} vs the ${f['budget_usd']:,.2f} budget")
        if f["deadline_hours"] is not None:
            limits.append(f"fastest {f['fastest_hours']:.1f} h vs the {f['deadline_hours']:g} h deadline")
        return f"{m}: every plan that fits misses the limits ({'; '.join(limits)})"
    if w.code == "needs_more_gpus":
        return (f"{m}: the smallest instance that holds it is {f['instance_type']} ({f['gpus']} x {f['gpu']}), "
                f"more GPUs than --max-gpus {f['max_gpus']}; raise --max-gpus to {f['gpus']}")
    if w.code == "needs_more_memory":
        return (f"{m}: needs at least {f['least_bytes'] / GIB:.1f} GiB per GPU even sharded over "
                f"{f['max_gpus']} GPU(s); the largest GPU searched has {f['largest_gpu_bytes'] / GIB:.1f} GiB "
                f"({f['short_bytes'] / GIB:.1f} GiB short)")
    if w.code == "unsupported":
        return f"{m}: no plan ({rejection(f['reason'])}: {f['combinations']} combinations)"
    if w.code == "all_linear_not_searched":
        return (f"{m}: all-linear not searched: PEFT adapts {f['model_type']}'s fused MoE parameters without "
                f"dropout, and --lora-dropout is {f['dropout']:g}; pass --lora-dropout 0 to search it")
    return f"{m}: no instance searched supports its settings"


def assumption(a: Assumption) -> str:
    f = a.figures
    texts = {
        "data": lambda: (f"data: {f['tokens']:,} tokens per epoch from {f['source']} ({f['counting']}), "
                         + ("packed into full sequences" if f["packing"] else
                            "one example per sequence, padded per micro-batch")),
        "time_model": lambda: (
            "time per micro-batch = FLOPs (forward, backward, recomputation, attention) / (dense peak x u), where "
            + (f"attention's FLOPs run at {f['attention_kernel_ratio']:.0%} of the matmuls' rate (its fused kernel) "
               "and " if f.get("attention_kernel_ratio", 1.0) < 1 else "")
            + f"utilisation u = u_max x T / (T + t_half) rises with the tokens T of a micro-batch and saturates; "
            f"this plan: u_max {f['u_max']:.0%} ({f['source']}), T {f['tokens_per_micro_batch']:,.0f}, t_half "
            f"{f['t_half_tokens']:,.0f} tokens, {f['utilization']:.0%} of peak over the whole step, "
            f"{f['bound']}-bound; each micro-batch adds memory-bound elementwise kernels "
            f"({f['elementwise_bytes_per_hidden']:g} bytes per token, layer and hidden unit per pass: "
            f"{f['elementwise_seconds']:.3f} s)"
            + (f", eager attention's writes of every score ({f['eager_bytes_per_score']:g} bytes per score over a "
               f"forward and a backward: {f['attention_seconds']:.3f} s; SDPA and FlashAttention write none)"
               if f.get("attention_seconds") else "")
            + " and each step the optimizer's memory-bound update "
            f"({f['optimizer_seconds']:.2f} s) and no micro-batch is shorter than "
            f"{f['launch_floor_seconds_per_layer_pass'] * 1000:.2f} ms of kernel launches per layer and pass"),
        "dequantization": lambda: ("QLoRA adds the memory-bound dequantization of every 4-bit weight in each pass "
                                   f"({f['bytes_per_weight']} bytes per weight at {f['bandwidth_efficiency']:.0%} of "
                                   "peak bandwidth)"),
        "host_ram": lambda: "host RAM must hold the checkpoint as loaded: once per process, or once per node with FSDP",
        "parallelism": lambda: (
            f"several GPUs ({f['sharding']}): data parallel with a whole replica per GPU (DDP) when it fits, else "
            "FSDP with parameters, gradients and optimizer states sharded over all GPUs; FSDP gathers the weights "
            f"{f['gathers_per_micro_batch']} times per micro-batch as stored (4-bit weights as 4-bit, fp32 ones in "
            "the compute dtype), prefetched behind compute, and with gradient accumulation reduce-scatters the "
            "gradients every micro-batch (sync_each_batch: each GPU holds only its shard; the Trainer's default "
            "no_sync would hold them whole); DDP gradients all-reduced once per optimizer step, "
            f"{f['allreduce_overlap']:.0%} of it hidden behind the last backward; NVLink/NVSwitch or PCIe inside "
            "an instance, the whole instance network between instances (half of it without EFA)"),
        "setup": lambda: (f"billed time adds {f['setup_seconds'] / 60:.0f} minutes of setup per instance (boot, "
                          f"model download and load), and {f['cluster_launch_seconds'] / 60:.0f} more per instance "
                          "of a multi-instance plan; per-second billing"),
        "global_batch": lambda: (f"global batch {f['sequences']} sequences per optimizer step (micro-batch x GPUs x "
                                 "accumulation); with accumulation the gradients are held through every "
                                 "micro-batch, and the memory counts them"),
        "quality_weighing": lambda: f"quality weighing: {f['about']}",
        "multi_instance_margin": lambda: f"multi-instance plans must gain {f['margin']:.0%}: {f['source']}",
        "spot": lambda: f"spot: {f['caveat']}",
        "stale_price": lambda: str(f["warning"]),
    }
    if a.code not in texts:
        return a.code
    try:
        return texts[a.code]()
    except (KeyError, TypeError, ValueError):  # a hand-edited plan: say what it holds rather than fail
        return f"{a.code}: " + ", ".join(f"{k} {v}" for k, v in f.items())


BACKEND_REASONS = {
    "requested": "as --backend asked; the search covered only what it supports",
    "platform": "the platform's own backend",
    "skypilot": "launches the plan's instances on EC2 through SkyPilot",
    "hf_without_skypilot": ("skypilot is not installed, so the plan names hf, which trains where `ftplan run` is "
                            "typed; pip install 'ftplan[skypilot]' to launch it on EC2"),
    "plugin_platform": "the plugin backend registered for this platform",
}


def backend_line(name: str | None, why: str | None) -> str:
    return f"Backend: {name} ({BACKEND_REASONS.get(why or '', why or '')})" if name else ""
