"""Stage (4) math: advantages (GRPO, DAE), OTS token weights, policy/SFT losses, eval metrics, reflection detector.

Pure torch / Python, no Megatron: every function here runs on CPU tensors and is unit-tested with hand-computed values.
"""
from tapo_megatron.algorithms.advantages import (
    AdvantageFn,
    AdvantageInput,
    AdvantageStats,
    ZeroVariancePolicy,
    decoupled_advantages,
    get_advantage,
    group_normalized_advantages,
    grpo_advantages,
    list_advantages,
    register_advantage,
)
from tapo_megatron.algorithms.losses import (
    KL_ESTIMATORS,
    PolicyLossFn,
    get_policy_loss,
    kl_penalty,
    list_policy_losses,
    policy_loss,
    register_policy_loss,
    sft_loss,
)
from tapo_megatron.algorithms.metrics import (
    direct_solution_rate,
    effective_reflection_rate,
    first_attempt_rate,
    format_rate,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
    spurious_reflection_rate,
)
from tapo_megatron.algorithms.ots import ots_weights, token_entropy_from_logits
from tapo_megatron.algorithms.reflection import DEFAULT_REFLECTION_PATTERNS, ReflectionDetector, ReflectionMatch

__all__ = [
    "AdvantageFn",
    "AdvantageInput",
    "AdvantageStats",
    "ZeroVariancePolicy",
    "decoupled_advantages",
    "get_advantage",
    "group_normalized_advantages",
    "grpo_advantages",
    "list_advantages",
    "register_advantage",
    "KL_ESTIMATORS",
    "PolicyLossFn",
    "get_policy_loss",
    "kl_penalty",
    "list_policy_losses",
    "policy_loss",
    "register_policy_loss",
    "sft_loss",
    "direct_solution_rate",
    "effective_reflection_rate",
    "first_attempt_rate",
    "spurious_reflection_rate",
    "format_rate",
    "mean_pass_at_k",
    "pass_at_1",
    "pass_at_k",
    "ots_weights",
    "token_entropy_from_logits",
    "DEFAULT_REFLECTION_PATTERNS",
    "ReflectionDetector",
    "ReflectionMatch",
]
