"""Stage (3), TAPO's trajectory builder: scored rollouts -> training trajectories with per-token provenance.

    candidates.py    DCS online gate (is_candidate), offline ZPD filter (zpd_filter), wrong/correct pairing
    constructors.py  Constructor interface + registry: "policy" (the policy via the rollout engine),
                     "policy_located" (a step checker locates, the policy writes), "step_verifier" (oracle)
    parse.py         tolerant <analysis>/<reconstruction> parser, failure reasons
    splice.py        wrong rollout's own prefix tokens (SAMPLED) + reconstruction tail (INJECTED) + eos
    builder.py       TrajectoryBuilder.build(queries, rollouts, step) -> BuildResult (trajectories, metrics)

The splicing function is imported from its module, ``from tapo_megatron.trajectory.splice import splice``: a
package attribute named ``splice`` would shadow the ``splice`` submodule.
"""
from tapo_megatron.trajectory.builder import BuildResult, TrajectoryBuilder
from tapo_megatron.trajectory.candidates import is_candidate, select_pairs, zpd_filter
from tapo_megatron.trajectory.constructors import (
    ConstructionRequest,
    Constructor,
    LocatedPolicyConstructor,
    PolicyConstructor,
    StepVerifierConstructor,
    available_constructors,
    build_constructor,
    get_constructor,
    register_constructor,
)
from tapo_megatron.trajectory.parse import Construction, FailureReason, parse_construction
from tapo_megatron.trajectory.splice import SpliceResult

__all__ = [
    "BuildResult",
    "Construction",
    "ConstructionRequest",
    "Constructor",
    "FailureReason",
    "LocatedPolicyConstructor",
    "PolicyConstructor",
    "SpliceResult",
    "StepVerifierConstructor",
    "TrajectoryBuilder",
    "available_constructors",
    "build_constructor",
    "get_constructor",
    "is_candidate",
    "parse_construction",
    "register_constructor",
    "select_pairs",
    "zpd_filter",
]
