"""DeepSpeed ZeRO's partitioned weights and optimizer states, gathered and scattered whole, by parameter name.

ZeRO-1/2 split the fp32 master weights and the optimizer states over the processes, ZeRO-3 the 16-bit weights
too. So neither `optimizer.state_dict()` (this process's flat partition, beside a LossScaler object) nor the
module's parameters (empty tensors under ZeRO-3) make a checkpoint or a saved model. DeepSpeed's public API
(deepspeed.utils.safe_get/set_full_fp32_param and ..._optimizer_state, deepspeed.zero.GatheredParameters)
reads and writes them whole, parameter by parameter; with it a ZeRO checkpoint takes the FSDP one's form:
name-keyed tensors that process 0 writes, independent of the process count's partitioning.
"""

from __future__ import annotations

from typing import Any


def is_zero(model) -> bool:
    """Parameters managed by a DeepSpeed ZeRO optimizer (stage 3: partitioned; 1/2: mapped to fp32 fragments)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in model.parameters())


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer under accelerate's wrapper, and the torch optimizer it steps."""
    zero = getattr(optimizer, "optimizer", optimizer)  # accelerate's DeepSpeedOptimizerWrapper
    return zero, zero.optimizer


def _state_keys(base) -> tuple[list[str], dict[str, Any]]:
    """The base optimizer's per-element states (exp_avg, exp_avg_sq for AdamW) and its scalars ('step')."""
    import torch

    flat, first = next(((p, s) for p, s in base.state.items() if s), (None, {}))
    keys = sorted(k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    blockwise = [k for k in keys if first[k].shape != flat.shape]
    if blockwise:  # backend.check refuses 8-bit optimizers under ZeRO; any other such optimizer stops here
        raise ValueError(f"the optimizer's {blockwise[0]!r} state is kept per block of ZeRO's flat partition, not "
                         "per element, so it cannot be saved by parameter")
    scalars = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in first.items() if k not in keys}
    return keys, scalars


def _scaler_state(zero) -> dict[str, Any]:
    """fp16's dynamic loss scale (cur_scale, cur_iter, ...): numbers only, so it travels as JSON."""
    scaler = getattr(zero, "loss_scaler", None)
    return {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))} if scaler else {}


def gathered(model, optimizer, main: bool) -> tuple[dict, dict]:
    """The trainable parameters' fp32 master weights and optimizer states, whole, on process 0 (empty elsewhere).
    Every process must call it: each parameter is a collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero, base = _zero_optimizer(optimizer)
    keys, scalars = _state_keys(base)
    weights: dict = {}
    state: dict = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        weight = safe_get_full_fp32_param(param)
        moments = {k: safe_get_full_optimizer_state(param, k) for k in keys}
        if main:
            weights[name] = weight.detach().to("cpu", copy=True).contiguous()
            state[name] = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in moments.items()}
    return weights, {"state": state, "scalars": scalars, "loss_scaler": _scaler_state(zero),
                     "param_groups": {str(i): _hyperparameters(g) for i, g in enumerate(base.param_groups)}}


def _hyperparameters(group: dict) -> dict[str, Any]:
    """A parameter group's numbers - the scheduler's current lr above all, which a torch optimizer's state_dict
    carries and its scheduler's does not."""
    return {k: v for k, v in group.items() if k != "params" and (v is None or isinstance(v, (bool, int, float, str)))}


def load(model, optimizer, weights: dict, optim_state: dict) -> None:
    """Scatter a gathered() checkpoint into this process's partitions: fp32 masters, optimizer states and the
    16-bit weights the next forward uses. Every process calls it with the whole checkpoint (each keeps its part)."""
    import torch

    zero, base = _zero_optimizer(optimizer)
    states = optim_state.get("state", {})
    _create_states(zero, base, sorted(next(iter(states.values()), {})), optim_state.get("scalars", {}))
    # ZeRO-1/2 point each parameter's fragments at the states once, at a step; linked to no states (a checkpoint
    # taken before any step was applied, as fp16's skipped overflow steps allow) they would never be linked again
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state") and any(base.state.values()):
        zero._lazy_init_hp_params_optimizer_state()
    for name, param in model.named_parameters():
        if not param.requires_grad or name not in weights:
            continue
        device = param.ds_tensor.device if hasattr(param, "ds_id") else param.device
        weight = weights[name].to(device=device, dtype=torch.float32)
        _set_whole(param, weight)
        _set_working_copy(param, weight)
        for key, value in states.get(name, {}).items():
            _set_whole(param, value.to(device=device, dtype=torch.float32), key)
    for key, value in optim_state.get("scalars", {}).items():
        for entry in base.state.values():
            if isinstance(entry.get(key), torch.Tensor):
                entry[key].fill_(value)
            else:
                entry[key] = value
    for index, values in optim_state.get("param_groups", {}).items():
        base.param_groups[int(index)].update(values)
    scaler = getattr(zero, "loss_scaler", None)
    for key, value in optim_state.get("loss_scaler", {}).items():
        setattr(scaler, key, value)


def _create_states(zero, base, keys: list[str], scalars: dict[str, Any]) -> None:
    """torch creates an optimizer's states at its first step, and a resumed run has taken none: zeros of the saved
    kinds are loaded first (torch's load_state_dict puts them on each flat partition's device and dtype), so
    DeepSpeed's setters have fragments to fill."""
    import torch

    if not keys or any(base.state.values()):  # DeepSpeed's lookups leave empty entries behind
        return
    stage3 = hasattr(zero, "_set_fp32_optimizer_param_groups")
    if stage3:  # ZeRO-3 hands the torch optimizer its flat partitions only around a step, as around its own loads
        zero._set_fp32_optimizer_param_groups()
    saved = base.state_dict()
    indices = [i for group in saved["param_groups"] for i in group["params"]]
    flat = [p for group in base.param_groups for p in group["params"]]
    saved["state"] = {i: {**{k: torch.zeros_like(p, dtype=torch.float32) for k in keys},
                          **{k: torch.tensor(float(v)) for k, v in scalars.items()}} for i, p in zip(indices, flat)}
    base.load_state_dict(saved)
    if stage3:
        zero._clear_fp32_optimizer_param_groups()


def _set_whole(param, value, key: str | None = None) -> None:
    """This process's fragment of a whole fp32 master weight (key None) or optimizer state. Under ZeRO-3 the
    fragment is cut here: DeepSpeed's whole-tensor setter reads past the end of a parameter whose last partition
    is padded (deepspeed 0.19.8, any size that the process count does not divide)."""
    import torch
    import torch.distributed as dist
    from deepspeed import utils

    if not hasattr(param, "ds_id"):
        if key:
            utils.safe_set_full_optimizer_state(param, value, key)
        else:
            utils.safe_set_full_fp32_param(param, value)
        return
    size = param.ds_tensor.numel()  # every partition's, padding included
    rank, count = dist.get_rank(group=param.ds_process_group), dist.get_world_size(group=param.ds_process_group)
    padded = torch.zeros(size * count, dtype=value.dtype, device=value.device)
    padded[: value.numel()] = value.flatten()
    local = padded.narrow(0, rank * size, size)
    if key:
        utils.safe_set_local_optimizer_state(param, local, key)
    else:
        utils.safe_set_local_fp32_param(param, local)


def _set_working_copy(param, weight) -> None:
    """The 16-bit weight the forward reads: under ZeRO-3 re-partitioned from process 0's copy (every process holds
    the same checkpoint), under ZeRO-1/2 a view into DeepSpeed's flat buffer, written in place."""
    import torch

    if hasattr(param, "ds_id"):
        import deepspeed
        import torch.distributed as dist

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:
                with torch.no_grad():
                    param.data.copy_(weight.view(param.ds_shape))
    else:
        with torch.no_grad():
            param.data.copy_(weight.view(param.shape))


def model_state(model, full: bool, main: bool) -> dict:
    """ZeRO-3: the model's 16-bit weights (every parameter for full fine-tuning, the trainable ones otherwise),
    gathered one parameter at a time so no process ever holds the whole model; on process 0 (empty elsewhere)."""
    import deepspeed

    out: dict = {}
    for name, param in model.named_parameters():
        if not (full or param.requires_grad):
            continue
        with deepspeed.zero.GatheredParameters([param]):
            if main:
                out[name] = param.detach().to("cpu", copy=True).contiguous()
    return out


def partitioned(model) -> bool:
    """ZeRO-3: the module's own parameters are empty placeholders; saving needs model_state()."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def full_shape(param) -> tuple[int, ...]:
    """A parameter's whole shape (ZeRO-3 keeps it in ds_shape; the tensor itself is empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))
