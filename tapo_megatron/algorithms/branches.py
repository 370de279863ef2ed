"""How TAPO's two loss branches are normalised, and how their gradients compare.

    d_orig, d_cons = branch_denominators(n_orig, n_cons, lam, "per_branch" | "joint")
    loss = sum_orig l_t / d_orig + lam * sum_cons w_t l_t / d_cons           (``policy_loss`` with these counts)

- ``per_branch`` (d_orig = N_orig, d_cons = N_cons): each branch is a token mean over its own tokens, so at lam = 1 a
  handful of constructed trajectories weigh as much as the whole GRPO batch.
- ``joint`` (d_orig = d_cons = N_orig + lam * N_cons): one token mean over both branches in which a constructed token
  counts lam times; the constructed branch weighs in proportion to its tokens. lam = 0 gives d_orig = N_orig: still
  exactly GRPO.

Both are expressed through the global token counts ``policy_loss`` already takes, so the loss itself is unchanged.

``gradient_comparison(|g_orig|^2, |g_cons|^2, g_orig . g_cons)``: the two branch gradients' norms, ratio and cosine.
"""
from __future__ import annotations

import math

__all__ = ["BRANCH_NORMALIZATIONS", "branch_denominators", "gradient_comparison"]

BRANCH_NORMALIZATIONS = ("per_branch", "joint")


def branch_denominators(n_orig: float, n_cons: float, coef: float, mode: str) -> tuple[float, float]:
    """(d_orig, d_cons) for the global token counts of the two branches; both >= 1 (an empty branch sums to 0)."""
    if mode not in BRANCH_NORMALIZATIONS:
        raise ValueError(f"tapo.branch_normalization={mode!r}: expected one of {', '.join(BRANCH_NORMALIZATIONS)}")
    if n_orig < 0 or n_cons < 0 or coef < 0:
        raise ValueError(f"branch_denominators: counts and coef must be >= 0, got {n_orig}, {n_cons}, {coef}")
    if mode == "per_branch":
        return max(n_orig, 1.0), max(n_cons, 1.0)
    joint = max(n_orig + coef * n_cons, 1.0)
    return joint, joint


def gradient_comparison(sq_orig: float, sq_cons: float, dot: float) -> dict[str, float]:
    """Norms of the two branch gradients (the constructed one already scaled by lambda), their ratio and cosine,
    from the squared norms and the dot product of the flattened gradients. Undefined ratios are NaN."""
    if sq_orig < 0 or sq_cons < 0:
        raise ValueError(f"gradient_comparison: squared norms must be >= 0, got {sq_orig}, {sq_cons}")
    na, nb = math.sqrt(sq_orig), math.sqrt(sq_cons)
    cos = max(-1.0, min(1.0, dot / (na * nb))) if na > 0 and nb > 0 else math.nan
    return {"branch/grad_norm_original": na, "branch/grad_norm_constructed": nb,
            "branch/grad_norm_ratio": nb / na if na > 0 else math.nan, "branch/grad_cosine": cos}
