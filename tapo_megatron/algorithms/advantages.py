"""Per-trajectory advantages: GRPO group normalisation and TAPO's Decoupled Advantage Estimation (DAE).

Inputs are 1-D tensors over the N trajectories of one RL step (all queries, originals and constructed):

    rewards         float [N]   verifier reward of each trajectory
    group_ids       int   [N]   arbitrary ints (unsorted, ragged groups); samples sharing an id are normalised together
    is_constructed  bool  [N]   True for TAPO's spliced micro-reflective trajectories

Outputs are per-trajectory advantages [N] (the collate stage broadcasts them over the response tokens) and, for the
registered estimators, an :class:`AdvantageStats` record for logging. Registered estimators take one typed record,
:class:`AdvantageInput`, so a user's estimator never has to mirror keyword lists (``examples/advantage.py``).

DAE (TAPO spec step 6): originals are normalised only among originals of the same group id, constructed trajectories
only among constructed ones of the same group id. The split is done *here* by keying groups on the pair
(group_id, is_constructed), so callers may pass either the query index for both kinds or already-distinct ids (as
``Trajectory.advantage_group`` does); both give the same result. A constructed group whose rewards are all equal
(std = 0, singletons included) is handled by the explicit :class:`ZeroVariancePolicy` (the paper leaves this open).

Everything is vectorised with ``index_add_`` / ``scatter_reduce_``; there is no Python loop over groups.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable

import torch

from tapo_megatron.registry import Registry

__all__ = [
    "ZeroVariancePolicy",
    "AdvantageStats",
    "AdvantageFn",
    "AdvantageInput",
    "advantage_stats",
    "dae_estimator",
    "grpo_estimator",
    "group_normalized_advantages",
    "decoupled_advantages",
    "grpo_advantages",
    "register_advantage",
    "get_advantage",
    "list_advantages",
]


class ZeroVariancePolicy(str, enum.Enum):
    """What DAE does with a constructed group whose rewards are all equal (std = 0; singletons included).

    ZERO:  all-zero advantages, as GRPO does for its own zero-variance groups (the group teaches nothing).
    POOL:  normalise the group's members against the mean/std pooled over *all* constructed trajectories of the batch,
           so an all-correct construction group still gets a positive signal when other constructions failed.
           If the pooled std is 0 too, the advantages are 0.
    FIXED: correct constructions (reward > 0) get +fixed_value, wrong ones (reward <= 0) get -fixed_value.
    """

    ZERO = "zero"
    POOL = "pool"
    FIXED = "fixed"

    @classmethod
    def parse(cls, value: ZeroVariancePolicy | str) -> ZeroVariancePolicy:
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"constructed_zero_variance={value!r} is not a zero-variance policy; valid: {valid}") from None


@dataclass
class AdvantageStats:
    """What an advantage estimator did, for logging. Fractions are NaN when their denominator is 0."""

    num_samples: int  # N
    num_constructed: int  # samples with is_constructed
    num_groups: int  # normalisation groups actually used (DAE: originals and constructed counted separately)
    num_zero_variance_groups: int  # of those, groups whose rewards are all equal (singletons included)
    num_constructed_groups: int  # groups holding at least one constructed sample
    num_constructed_zero_variance_groups: int  # of those, zero-variance ones (the ZeroVariancePolicy's input)
    frac_zero_advantage_original: float  # share of original samples whose advantage is exactly 0
    frac_zero_advantage_constructed: float  # share of constructed samples whose advantage is exactly 0


def _check_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, is_constructed: torch.Tensor | None = None) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} does not match rewards shape {tuple(rewards.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if is_constructed is not None:
        if is_constructed.shape != rewards.shape:
            raise ValueError(
                f"is_constructed shape {tuple(is_constructed.shape)} does not match rewards shape {tuple(rewards.shape)}"
            )
        if is_constructed.dtype != torch.bool:
            raise ValueError(f"is_constructed must be a bool tensor, got dtype {is_constructed.dtype}")
    finite = torch.isfinite(rewards.double())
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"rewards[{bad}] = {rewards[bad].item()} is not finite")


def _output_dtype(rewards: torch.Tensor) -> torch.dtype:
    return rewards.dtype if rewards.dtype.is_floating_point else torch.float32


@dataclass
class _GroupMoments:
    """Per-group statistics; all tensors are [G] float64 except ``zero_var`` (bool [G])."""

    count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # population std (divides by the group size, not size - 1)
    zero_var: torch.Tensor  # max == min: exact, so 0.1 + 0.1 + 0.1 round-off cannot leak a tiny advantage


def _group_moments(values: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> _GroupMoments:
    """values: float64 [N]; inverse: long [N] dense group index in [0, num_groups)."""
    zeros = values.new_zeros(num_groups)
    count = zeros.index_add(0, inverse, torch.ones_like(values))
    mean = zeros.index_add(0, inverse, values) / count
    dev = values - mean[inverse]
    # two-pass variance: sum of squared deviations is exact for equal values and avoids E[x^2] - E[x]^2 cancellation
    var = zeros.index_add(0, inverse, dev * dev) / count
    gmax = values.new_full((num_groups,), -math.inf).scatter_reduce(0, inverse, values, "amax", include_self=True)
    gmin = values.new_full((num_groups,), math.inf).scatter_reduce(0, inverse, values, "amin", include_self=True)
    return _GroupMoments(count=count, mean=mean, std=var.sqrt(), zero_var=gmax == gmin)


def _normalise(values: torch.Tensor, inverse: torch.Tensor, m: _GroupMoments, eps: float, normalize_std: bool) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps), or r - mean_g; exactly 0 in zero-variance groups. float64 [N]."""
    adv = values - m.mean[inverse]
    if normalize_std:
        adv = adv / (m.std[inverse] + eps)
    return torch.where(m.zero_var[inverse], torch.zeros_like(adv), adv)


def _dense_groups(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group keys ([N] ints, or [2, N] pairs) to dense indices [N] in [0, G)."""
    if keys.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=keys.device), 0
    if keys.dim() == 1:
        uniq, inverse = torch.unique(keys, return_inverse=True)
        return inverse, uniq.numel()
    uniq, inverse = torch.unique(keys, dim=1, return_inverse=True)
    return inverse, uniq.shape[1]


def group_normalized_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """GRPO advantages: A_i = (r_i - mean_g) / (std_g + eps) within each group g (population std).

    Args:
        rewards: [N] rewards (float, int or bool).
        group_ids: [N] integer group id per sample; arbitrary values, any order, groups of any size.
        eps: added to the std, guards small but non-zero stds.
        normalize_std: False gives the mean-centred A_i = r_i - mean_g (Dr. GRPO style).

    Returns:
        [N] advantages, dtype of ``rewards`` (float32 for non-float rewards). Singletons and groups whose rewards
        are all equal get exactly 0.
    """
    _check_inputs(rewards, group_ids)
    if rewards.is_cuda:
        # On GPU: the fused Triton kernel (one launch for ragged, unsorted groups; same zero-variance rule).
        from tapo_kernels import grouped_advantage

        result = grouped_advantage(rewards.float(), group_ids, eps=eps, normalize_std=normalize_std)
        return result.sample_advantages.to(_output_dtype(rewards))
    values = rewards.double()
    inverse, num_groups = _dense_groups(group_ids)
    if num_groups == 0:
        return torch.zeros(0, dtype=_output_dtype(rewards), device=rewards.device)
    moments = _group_moments(values, inverse, num_groups)
    return _normalise(values, inverse, moments, eps, normalize_std).to(_output_dtype(rewards))


def advantage_stats(
    adv: torch.Tensor, inverse: torch.Tensor, num_groups: int, zero_var: torch.Tensor, is_constructed: torch.Tensor
) -> AdvantageStats:
    """Summarise one estimator call (everything lives on the driver's CPU; the .item() syncs are cheap there)."""
    group_has_constructed = torch.zeros(num_groups, dtype=torch.bool, device=adv.device)
    group_has_constructed[inverse[is_constructed]] = True
    zero_adv = adv == 0
    n_cons = int(is_constructed.sum())
    n_orig = adv.numel() - n_cons

    def frac(num: torch.Tensor, den: int) -> float:
        return float(num.sum()) / den if den else float("nan")

    return AdvantageStats(
        num_samples=adv.numel(),
        num_constructed=n_cons,
        num_groups=num_groups,
        num_zero_variance_groups=int(zero_var.sum()),
        num_constructed_groups=int(group_has_constructed.sum()),
        num_constructed_zero_variance_groups=int((zero_var & group_has_constructed).sum()),
        frac_zero_advantage_original=frac(zero_adv & ~is_constructed, n_orig),
        frac_zero_advantage_constructed=frac(zero_adv & is_constructed, n_cons),
    )


def decoupled_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    is_constructed: torch.Tensor,
    *,
    eps: float = 1e-6,
    normalize_std: bool = True,
    constructed_zero_variance: ZeroVariancePolicy | str = ZeroVariancePolicy.ZERO,
    fixed_value: float = 1.0,
) -> tuple[torch.Tensor, AdvantageStats]:
    """TAPO's Decoupled Advantage Estimation.

    Groups are keyed on (group_id, is_constructed): originals are normalised only among originals with the same id,
    constructed trajectories only among constructed ones with the same id, so the same query index may be passed for
    both kinds. Original zero-variance groups always get 0 (plain GRPO); constructed zero-variance groups follow
    ``constructed_zero_variance`` (see :class:`ZeroVariancePolicy`). POOL pools over the constructed samples of *this
    call*, so call it once on the whole step's batch, not per data-parallel shard.

    Args:
        rewards: [N] rewards.
        group_ids: [N] integer group ids (arbitrary, unsorted, ragged).
        is_constructed: bool [N].
        eps, normalize_std: as in :func:`group_normalized_advantages`.
        constructed_zero_variance: "zero" | "pool" | "fixed".
        fixed_value: magnitude used by "fixed" (must be >= 0); correct means reward > 0.

    Returns:
        (advantages [N], stats)
    """
    _check_inputs(rewards, group_ids, is_constructed)
    policy = ZeroVariancePolicy.parse(constructed_zero_variance)
    if fixed_value < 0:
        raise ValueError(f"fixed_value must be >= 0, got {fixed_value}")
    values = rewards.double()
    out_dtype = _output_dtype(rewards)
    keys = torch.stack([group_ids.long(), is_constructed.long()])  # [2, N]: the DAE split
    inverse, num_groups = _dense_groups(keys)
    if num_groups == 0:
        empty = torch.zeros(0, dtype=out_dtype, device=rewards.device)
        return empty, advantage_stats(empty, inverse, 0, torch.zeros(0, dtype=torch.bool, device=rewards.device), is_constructed)
    moments = _group_moments(values, inverse, num_groups)
    adv = _normalise(values, inverse, moments, eps, normalize_std)

    # constructed samples sitting in a zero-variance constructed group: the policy's domain
    special = is_constructed & moments.zero_var[inverse]
    if policy is ZeroVariancePolicy.POOL and bool(special.any()):
        pooled = values[is_constructed]
        p_mean = pooled.mean()
        p_dev = values - p_mean
        if normalize_std:
            p_dev = p_dev / (pooled.std(correction=0) + eps)
        if bool(pooled.max() == pooled.min()):  # every construction in the batch scored the same: no signal
            p_dev = torch.zeros_like(p_dev)
        adv = torch.where(special, p_dev, adv)
    elif policy is ZeroVariancePolicy.FIXED:
        signed = torch.where(values > 0, values.new_tensor(fixed_value), values.new_tensor(-fixed_value))
        adv = torch.where(special, signed, adv)
    adv = adv.to(out_dtype)
    return adv, advantage_stats(adv, inverse, num_groups, moments.zero_var, is_constructed)


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    is_constructed: torch.Tensor,
    *,
    eps: float = 1e-6,
    normalize_std: bool = True,
    constructed_zero_variance: ZeroVariancePolicy | str = ZeroVariancePolicy.ZERO,
    fixed_value: float = 1.0,
) -> tuple[torch.Tensor, AdvantageStats]:
    """Plain GRPO normalisation over ``group_ids`` as given, with the registry's signature.

    ``is_constructed`` is ignored for normalisation: constructed samples that share a group id with originals are
    mixed into the originals' group. That is the "no DAE" ablation the TAPO spec warns about; for a GRPO baseline
    there are no constructed samples and this is exactly GRPO. ``constructed_zero_variance`` and ``fixed_value`` are
    accepted for signature compatibility and unused.
    """
    _check_inputs(rewards, group_ids, is_constructed)
    ZeroVariancePolicy.parse(constructed_zero_variance)  # still reject typos in config
    values = rewards.double()
    inverse, num_groups = _dense_groups(group_ids)
    if num_groups == 0:
        empty = torch.zeros(0, dtype=_output_dtype(rewards), device=rewards.device)
        return empty, advantage_stats(empty, inverse, 0, torch.zeros(0, dtype=torch.bool, device=rewards.device), is_constructed)
    moments = _group_moments(values, inverse, num_groups)
    adv = _normalise(values, inverse, moments, eps, normalize_std).to(_output_dtype(rewards))
    return adv, advantage_stats(adv, inverse, num_groups, moments.zero_var, is_constructed)


# ---------------------------------------------------------------------------------------------------------------------
# Registry: the one place users plug in their own estimator.


@dataclass(frozen=True)
class AdvantageInput:
    """What every registered advantage estimator receives: one RL step's trajectories and the settings."""

    rewards: torch.Tensor  # float [N]: verifier reward of each trajectory
    group_ids: torch.Tensor  # int [N]: trajectories sharing an id are normalised together (query index)
    is_constructed: torch.Tensor  # bool [N]: True for TAPO's spliced trajectories
    eps: float = 1e-6  # added to the group std
    normalize_std: bool = True  # divide by the group std (False: mean-centring only, Dr. GRPO style)
    constructed_zero_variance: ZeroVariancePolicy | str = ZeroVariancePolicy.ZERO  # DAE: all-equal constructed groups
    fixed_value: float = 1.0  # DAE "fixed": the advantage magnitude of such groups


# An estimator: AdvantageInput -> (advantages float [N], AdvantageStats). Register with @register_advantage("name").
AdvantageFn = Callable[[AdvantageInput], tuple[torch.Tensor, AdvantageStats]]


def _check_estimator(fn: object, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"advantage estimator {name!r}: {fn!r} is not callable")


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator", check=_check_estimator)
register_advantage = ADVANTAGES.register  # decorator: @register_advantage("name")
get_advantage = ADVANTAGES.get  # unknown names raise KeyError listing the valid ones
list_advantages = ADVANTAGES.names


@register_advantage("grpo")
def grpo_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, AdvantageStats]:
    """GRPO over ``inp.group_ids`` (constructed trajectories mixed in: the no-DAE ablation)."""
    return grpo_advantages(inp.rewards, inp.group_ids, inp.is_constructed, eps=inp.eps,
                           normalize_std=inp.normalize_std, constructed_zero_variance=inp.constructed_zero_variance,
                           fixed_value=inp.fixed_value)


@register_advantage("dae")
def dae_estimator(inp: AdvantageInput) -> tuple[torch.Tensor, AdvantageStats]:
    """TAPO's Decoupled Advantage Estimation (``decoupled_advantages``)."""
    return decoupled_advantages(inp.rewards, inp.group_ids, inp.is_constructed, eps=inp.eps,
                                normalize_std=inp.normalize_std,
                                constructed_zero_variance=inp.constructed_zero_variance, fixed_value=inp.fixed_value)
