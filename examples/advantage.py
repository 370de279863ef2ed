"""RLOO (REINFORCE leave-one-out) advantages as a registered advantage estimator.

    A_i = r_i - mean of the OTHER members of i's group = r_i - (S_g - r_i) / (n_g - 1)

where S_g and n_g are the reward sum and size of the group. Groups are keyed on (group_id, is_constructed), as TAPO's
DAE does, so constructed trajectories are baselined only against constructed ones of the same query and never shift
the originals' baseline. A singleton group has no "others" and gets 0; so does a group whose rewards are all equal
(set exactly, so round-off in S_g - r_i cannot leak a tiny advantage). Unlike GRPO there is no division by the
group std: RLOO's baseline is unbiased and the advantage keeps the reward's scale.

Plug it in from a recipe or the command line, by import path (with the repository root on ``sys.path``) or, once
this module is imported, by its registered name:

    algorithm.advantage_estimator=examples.advantage:rloo_advantages
    algorithm.advantage_estimator=rloo

Signature to keep (``tapo_megatron.algorithms.advantages.AdvantageFn``): one ``AdvantageInput`` record in,
``(advantages float [N], AdvantageStats)`` out. This estimator reads ``rewards``, ``group_ids`` and ``is_constructed``;
``eps``, ``normalize_std``, ``constructed_zero_variance`` and ``fixed_value`` are DAE/GRPO settings it ignores.
"""
from __future__ import annotations

import torch

from tapo_megatron.algorithms.advantages import AdvantageInput, AdvantageStats, advantage_stats, register_advantage


def _check(inp: AdvantageInput) -> None:
    r, g, c = inp.rewards, inp.group_ids, inp.is_constructed
    if r.dim() != 1 or g.shape != r.shape or c.shape != r.shape:
        raise ValueError(f"rloo: rewards, group_ids, is_constructed must all be [N]; got shapes {tuple(r.shape)}, "
                         f"{tuple(g.shape)}, {tuple(c.shape)}")
    if g.dtype.is_floating_point or g.dtype == torch.bool or c.dtype != torch.bool:
        raise ValueError(f"rloo: group_ids must be integer and is_constructed bool, got {g.dtype}, {c.dtype}")
    if not bool(torch.isfinite(r.double()).all()):
        raise ValueError("rloo: rewards contain a non-finite value")


@register_advantage("rloo")
def rloo_advantages(inp: AdvantageInput) -> tuple[torch.Tensor, AdvantageStats]:
    """Leave-one-out advantages over (group_id, is_constructed) groups; see the module docstring."""
    _check(inp)
    rewards, is_constructed = inp.rewards, inp.is_constructed
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    n = rewards.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=out_dtype, device=rewards.device)
        none = torch.zeros(0, dtype=torch.long, device=rewards.device)
        return empty, advantage_stats(empty, none, 0, none.bool(), is_constructed)

    values = rewards.double()  # sums in float64: S_g - r_i cancels, so keep the round-off small
    keys = torch.stack([inp.group_ids.long(), is_constructed.long()])  # [2, N]: the DAE split
    _, inverse = torch.unique(keys, dim=1, return_inverse=True)  # dense group index [N] in [0, G)
    num_groups = int(inverse.max()) + 1
    count = torch.bincount(inverse, minlength=num_groups).to(values.dtype)
    total = values.new_zeros(num_groups).index_add_(0, inverse, values)
    # max == min per group: exact zero-variance test (singletons included), as the built-in estimators do
    gmax = values.new_full((num_groups,), -torch.inf).scatter_reduce_(0, inverse, values, "amax")
    gmin = values.new_full((num_groups,), torch.inf).scatter_reduce_(0, inverse, values, "amin")
    zero_var = gmax == gmin

    others = (count[inverse] - 1).clamp(min=1)  # singletons: any non-zero divisor; they are zeroed below
    adv = values - (total[inverse] - values) / others
    adv = torch.where(zero_var[inverse], torch.zeros_like(adv), adv).to(out_dtype)
    return adv, advantage_stats(adv, inverse, num_groups, zero_var, is_constructed)
