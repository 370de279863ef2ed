"""Constructors (TAPO spec step 4): turn (query, wrong rollout, correct rollout) into a reconstruction text.

    constructor.construct(requests: list[ConstructionRequest]) -> list[Construction]   # one per request, in order

Every constructor answers in the same textual form, ``<analysis>...</analysis><reconstruction>...</reconstruction>``,
parsed by ``parse.parse_construction``; the reconstruction is the wrong solution copied verbatim up to and including
its first faulty step, a short self-correction, and correct reasoning to the answer. Splicing comes later.

Registered constructors (``build_constructor(tapo_cfg, engine=..., tokenizer=...)`` picks ``tapo_cfg.constructor``):

- ``"policy"`` (``PolicyConstructor``): the current policy itself, served by the rollout engine, answers a
  construction prompt rendered from a template file (default ``templates/construction_prompt.txt``, placeholders
  ``{problem}``, ``{wrong_solution}``, ``{reference_solution}``) in the tokenizer's chat format. One engine call per
  step for all requests.
- ``"policy_located"`` (``LocatedPolicyConstructor``): for a task with a step verifier (the arithmetic demo, whose
  20-token vocabulary cannot express a construction prompt): the step checker only LOCATES the first faulty step;
  the current policy, through the rollout engine, is shown its original query, its own wrong solution up to and
  including that step and the task's correction marker, and writes the correction and the corrected continuation
  itself. The policy's continuation is scored like any other construction, so its corrections can be wrong.
- ``"step_verifier"`` (``StepVerifierConstructor``): for a task with a step verifier (``Task.step_verifier``, e.g.
  the arithmetic demo's): the verifier finds the first wrong step programmatically and writes the correction. This is
  an oracle, not the method: the program, not the policy, writes the correction.

Add one with ``@register_constructor("name")`` on a ``Constructor`` subclass implementing ``construct`` and
``from_config``; names are unique, and an unknown name lists the registered ones.
"""
from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from tapo_megatron.config import TapoConfig
from tapo_megatron.errors import ConfigError
from tapo_megatron.data.tokenizer import Tokenizer
from tapo_megatron.records import FinishReason, Query, Rollout, SamplingParams
from tapo_megatron.registry import Registry
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.trajectory.parse import DEFAULT_MAX_CHARS, Construction, FailureReason, parse_construction
from tapo_megatron.trajectory.splice import response_body_ids

__all__ = [
    "DEFAULT_TEMPLATE_PATH",
    "ConstructionRequest",
    "Constructor",
    "PolicyConstructor",
    "StepVerifierTask",
    "StepVerifierConstructor",
    "LocatedPolicyConstructor",
    "render_construction_prompt",
    "register_constructor",
    "get_constructor",
    "available_constructors",
    "build_constructor",
]

DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "construction_prompt.txt"
_PLACEHOLDERS = ("problem", "wrong_solution", "reference_solution")
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(_PLACEHOLDERS) + r")\}")


def stopping_at_eos(sampling: SamplingParams, eos_id: int) -> SamplingParams:
    """``sampling`` with the tokenizer's EOS among its stop tokens (a construction ends where the policy ends)."""
    if eos_id in sampling.stop_token_ids:
        return sampling
    return dataclasses.replace(sampling, stop_token_ids=tuple(sampling.stop_token_ids) + (eos_id,))


@dataclass
class ConstructionRequest:
    """One wrong rollout to repair, with a correct rollout of the same group as the reference."""

    query: Query
    wrong: Rollout
    correct: Rollout
    wrong_text: str = ""  # decoded wrong response (no eos); "" -> wrong.response_text
    correct_text: str = ""  # decoded correct response (no eos); "" -> correct.response_text

    @classmethod
    def from_rollouts(cls, query: Query, wrong: Rollout, correct: Rollout, tokenizer: Tokenizer) -> ConstructionRequest:
        """Decode both responses up to their eos with ``tokenizer``: the same text the splice compares against."""
        return cls(
            query=query,
            wrong=wrong,
            correct=correct,
            wrong_text=tokenizer.decode(response_body_ids(wrong.response_ids, tokenizer)),
            correct_text=tokenizer.decode(response_body_ids(correct.response_ids, tokenizer)),
        )

    @property
    def wrong_solution(self) -> str:
        return self.wrong_text or self.wrong.response_text

    @property
    def reference_solution(self) -> str:
        return self.correct_text or self.correct.response_text


class StepVerifierTask(Protocol):
    """A task whose solutions can be checked step by step."""

    def write_correction(self, problem: str, response_text: str) -> str | None:
        """The reconstruction (wrong prefix + correction + correct continuation); None if nothing is wrong."""

    def describe_first_error(self, problem: str, response_text: str) -> str:
        """A one-sentence diagnosis of the first faulty step."""

    def correction_prefix(self, problem: str, response_text: str) -> str | None:
        """``response_text`` up to and including its first faulty step (the task may append a step terminator);
        None when nothing in it is wrong (a correct or merely unfinished response)."""

    correction_marker: str  # the task's reflection marker, written right after the faulty step


class Constructor(abc.ABC):
    """Turns construction requests into parsed constructions (one per request, same order)."""

    name: ClassVar[str] = ""  # set by @register_constructor

    @abc.abstractmethod
    def construct(self, requests: Sequence[ConstructionRequest]) -> list[Construction]:
        """One ``Construction`` per request, in order; a failed one has ``text=None`` and ``failure`` set."""

    @classmethod
    @abc.abstractmethod
    def from_config(
        cls, tapo: TapoConfig, *, engine: RolloutEngine | None = None, tokenizer: Tokenizer | None = None,
        step_verifier: StepVerifierTask | None = None,
    ) -> Constructor:
        """Build from the ``tapo`` config section, and what the constructor needs of the run: the rollout engine
        (serving the current policy), the policy's tokenizer, the task's step verifier (None when it has none)."""


def _check_constructor(cls, name: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Constructor)):
        raise TypeError(f"constructor {name!r}: {cls!r} is not a Constructor subclass")


CONSTRUCTORS: Registry[type[Constructor]] = Registry("constructor", check=_check_constructor)
get_constructor = CONSTRUCTORS.get  # unknown names raise KeyError listing the valid ones
available_constructors = CONSTRUCTORS.names


def register_constructor(name: str) -> Callable[[type[Constructor]], type[Constructor]]:
    """Class decorator registering a ``Constructor`` subclass under ``name`` (unique); sets ``cls.name``."""

    def decorator(cls: type[Constructor]) -> type[Constructor]:
        CONSTRUCTORS.register(name)(cls)
        cls.name = name
        return cls

    return decorator


def build_constructor(
    tapo: TapoConfig, *, engine: RolloutEngine | None = None, tokenizer: Tokenizer | None = None,
    step_verifier: StepVerifierTask | None = None,
) -> Constructor:
    """The constructor named by ``tapo.constructor`` (looked up in the registry), configured from ``tapo``."""
    return get_constructor(tapo.constructor).from_config(tapo, engine=engine, tokenizer=tokenizer,
                                                         step_verifier=step_verifier)


# ---------------------------------------------------------------------------------------------------------------
# Policy constructor
# ---------------------------------------------------------------------------------------------------------------


def render_construction_prompt(template: str, problem: str, wrong_solution: str, reference_solution: str) -> str:
    """Substitute ``{problem}``, ``{wrong_solution}``, ``{reference_solution}`` in one pass.

    Not ``str.format``: other braces in the template (``\\boxed{answer}``) stay literal, and braces or placeholder
    names inside the substituted texts (LaTeX, a solution quoting "{problem}") are never re-expanded.
    """
    values = {"problem": problem, "wrong_solution": wrong_solution, "reference_solution": reference_solution}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


def _load_template(path: str | Path | None) -> tuple[str, Path]:
    template_path = Path(path) if path else DEFAULT_TEMPLATE_PATH
    if not template_path.is_file():
        raise FileNotFoundError(f"construction prompt template not found: {template_path}")
    template = template_path.read_text(encoding="utf-8")
    missing = [p for p in _PLACEHOLDERS if "{" + p + "}" not in template]
    if missing:
        raise ValueError(
            f"construction prompt template {template_path} lacks placeholder(s) "
            f"{', '.join('{' + p + '}' for p in missing)}"
        )
    return template, template_path


@register_constructor("policy")
class PolicyConstructor(Constructor):
    """The current policy writes the construction, through the rollout engine (TAPO's constructor).

    Args:
        engine: the rollout engine serving the current policy weights.
        tokenizer: the policy's tokenizer; its ``chat_prompt_ids`` formats the prompt (Qwen3: non-thinking mode).
        template_path: construction prompt template file; None: ``templates/construction_prompt.txt``.
        sampling: sampling for the construction; None: temperature 1, top_p 1, 1024 new tokens. The tokenizer's eos
            is always added to the stop tokens (a construction ends at the end of the assistant turn).
        max_chars: answers longer than this fail as ``too_long`` (see ``parse_construction``).

    A construction whose generation hit ``max_new_tokens`` (or was aborted) before ``</reconstruction>`` fails as
    ``too_long`` (``aborted``): its reconstruction is cut off. One that stopped at eos without the closing tag is
    accepted (the tolerant-parser rule).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Tokenizer,
        template_path: str | Path | None = None,
        sampling: SamplingParams | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.template, self.template_path = _load_template(template_path)
        self.sampling = stopping_at_eos(sampling or SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=1024),
                                        tokenizer.eos_id)
        self.max_chars = max_chars
        try:  # fail at build time, not mid-training, when the tokenizer cannot express the prompt
            tokenizer.chat_prompt_ids(render_construction_prompt(self.template, "1+1", "2", "2"))
        except ValueError as exc:
            raise ValueError(
                f"PolicyConstructor: the tokenizer cannot encode the construction prompt {self.template_path} "
                f"({exc}); the arithmetic demo's char vocabulary has no room for it: use tapo.constructor="
                "'policy_located' there (its step checker locates the error, the policy writes the correction; "
                "'step_verifier' is the program-written oracle ablation)"
            ) from exc

    @classmethod
    def from_config(
        cls, tapo: TapoConfig, *, engine: RolloutEngine | None = None, tokenizer: Tokenizer | None = None,
        step_verifier: StepVerifierTask | None = None,
    ) -> PolicyConstructor:
        if engine is None or tokenizer is None:
            raise ValueError("tapo.constructor='policy' needs the rollout engine and the tokenizer")
        sampling = SamplingParams(
            temperature=tapo.construction_temperature,
            top_p=tapo.construction_top_p,
            max_new_tokens=tapo.max_construction_tokens,
            stop_token_ids=(tokenizer.eos_id,),
        )
        return cls(engine, tokenizer, template_path=tapo.construction_prompt or None, sampling=sampling,
                   max_chars=tapo.max_construction_chars)

    def prompt_text(self, request: ConstructionRequest) -> str:
        """The construction prompt (before chat formatting) for one request."""
        return render_construction_prompt(
            self.template, request.query.problem, request.wrong_solution, request.reference_solution
        )

    def construct(self, requests: Sequence[ConstructionRequest]) -> list[Construction]:
        if not requests:
            return []
        prompts = [self.tokenizer.chat_prompt_ids(self.prompt_text(r)) for r in requests]
        generations = self.engine.generate(prompts, self.sampling)  # one batch for the whole step
        if len(generations) != len(prompts):
            raise RuntimeError(f"rollout engine returned {len(generations)} generations for {len(prompts)} prompts")
        out: list[Construction] = []
        for gen in generations:
            parsed = parse_construction(self.tokenizer.decode(gen.token_ids), self.max_chars)
            out.append(parsed if parsed.closed else _cut_off(gen, parsed))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Step-verifier constructor (demo task)
# ---------------------------------------------------------------------------------------------------------------


@register_constructor("step_verifier")
class StepVerifierConstructor(Constructor):
    """Writes constructions programmatically for a step-verifiable task (default: the arithmetic demo).

    Each answer is rendered in exactly the policy's textual form, ``<analysis>`` + ``<reconstruction>``, and goes
    through the same parser, so both constructors reach splicing the same way. A "wrong" response without a
    faulty step fails as ``no_error``.
    """

    def __init__(self, task: StepVerifierTask) -> None:
        self.task = task

    @classmethod
    def from_config(
        cls, tapo: TapoConfig, *, engine: RolloutEngine | None = None, tokenizer: Tokenizer | None = None,
        step_verifier: StepVerifierTask | None = None,
    ) -> StepVerifierConstructor:
        if step_verifier is None:
            raise ConfigError("tapo.constructor='step_verifier' needs a task with a step verifier (the arithmetic "
                              "task has one; math tasks do not: use tapo.constructor='policy')")
        return cls(step_verifier)  # needs neither the engine nor the tokenizer

    def construct(self, requests: Sequence[ConstructionRequest]) -> list[Construction]:
        out: list[Construction] = []
        for request in requests:
            problem, wrong = request.query.problem, request.wrong_solution
            try:
                reconstruction = self.task.write_correction(problem, wrong)
            except ValueError as exc:
                raise ValueError(
                    f"step_verifier constructor cannot check query {request.query.id!r}: {exc}"
                ) from exc
            if reconstruction is None:
                out.append(Construction(None, "", FailureReason.NO_ERROR.value, ""))
                continue
            analysis = self.task.describe_first_error(problem, wrong)
            raw = f"<analysis>\n{analysis}\n</analysis>\n<reconstruction>\n{reconstruction}\n</reconstruction>"
            out.append(parse_construction(raw, max_chars=max(DEFAULT_MAX_CHARS, len(raw))))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Located policy constructor: the step checker locates, the policy writes
# ---------------------------------------------------------------------------------------------------------------


def _cut_off(gen, parsed: Construction) -> Construction:
    """A construction whose generation did not stop at eos is cut off: ``too_long`` (length) or ``aborted``."""
    if parsed.failure is None and gen.finish_reason is not FinishReason.STOP:
        reason = FailureReason.TOO_LONG if gen.finish_reason is FinishReason.LENGTH else FailureReason.ABORTED
        return Construction(None, parsed.analysis, reason.value, parsed.raw)
    return parsed


@register_constructor("policy_located")
class LocatedPolicyConstructor(Constructor):
    """The policy writes the correction after the faulty step its task's step checker located.

    For each request: ``prefix = step_verifier.correction_prefix(problem, wrong)`` (None: ``no_error``); the prompt
    is the wrong rollout's own prompt ids + ``encode(prefix + marker)`` (the original query, never a construction
    prompt); the policy continues from there in one engine call for the whole step, and the reconstruction is
    ``prefix + marker + continuation``. Splicing then reuses the rollout's own tokens for the copied prefix
    (SAMPLED) and injects ``marker + continuation``: everything injected except the one-character marker was
    written by the policy. A continuation that did not stop at eos fails as ``too_long`` / ``aborted``.

    Args:
        engine: the rollout engine serving the current policy.
        tokenizer: the policy's tokenizer (must encode the marker).
        step_verifier: locates the first faulty step and names the marker (``StepVerifierTask``).
        sampling: continuation sampling; None: temperature 1, top_p 1, 256 new tokens; eos always stops it.
        max_chars: answers longer than this fail as ``too_long``.
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Tokenizer, step_verifier: StepVerifierTask,
                 sampling: SamplingParams | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self.engine, self.tokenizer, self.step_verifier = engine, tokenizer, step_verifier
        self.marker = getattr(step_verifier, "correction_marker", "")
        if not self.marker or not callable(getattr(step_verifier, "correction_prefix", None)):
            raise ConfigError(f"tapo.constructor='policy_located': the task's step verifier {step_verifier!r} has no "
                              "correction_prefix() / correction_marker (see StepVerifierTask)")
        tokenizer.encode(self.marker)  # a marker the vocabulary cannot express fails here, not mid-training
        self.sampling = stopping_at_eos(sampling or SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=256),
                                        tokenizer.eos_id)
        self.max_chars = max_chars

    @classmethod
    def from_config(
        cls, tapo: TapoConfig, *, engine: RolloutEngine | None = None, tokenizer: Tokenizer | None = None,
        step_verifier: StepVerifierTask | None = None,
    ) -> LocatedPolicyConstructor:
        if step_verifier is None:
            raise ConfigError("tapo.constructor='policy_located' needs a task with a step verifier (the arithmetic "
                              "task has one; on math the policy's own <analysis> locates the error: use "
                              "tapo.constructor='policy')")
        if engine is None or tokenizer is None:
            raise ValueError("tapo.constructor='policy_located' needs the rollout engine and the tokenizer")
        sampling = SamplingParams(temperature=tapo.construction_temperature, top_p=tapo.construction_top_p,
                                  max_new_tokens=tapo.max_construction_tokens, stop_token_ids=(tokenizer.eos_id,))
        return cls(engine, tokenizer, step_verifier, sampling=sampling, max_chars=tapo.max_construction_chars)

    def construct(self, requests: Sequence[ConstructionRequest]) -> list[Construction]:
        out: list[Construction | None] = [None] * len(requests)
        prefixes: dict[int, str] = {}
        for i, request in enumerate(requests):
            wrong = request.wrong_solution
            try:
                prefix = self.step_verifier.correction_prefix(request.query.problem, wrong)
            except ValueError as exc:
                raise ValueError(f"policy_located constructor cannot check query {request.query.id!r}: {exc}") from exc
            if prefix is None:
                out[i] = Construction(None, "", FailureReason.NO_ERROR.value, "")
            else:
                prefixes[i] = prefix
        prompts = [list(requests[i].wrong.prompt_ids) + self.tokenizer.encode(prefix + self.marker)
                   for i, prefix in prefixes.items()]
        generations = self.engine.generate(prompts, self.sampling) if prompts else []  # one batch for the step
        if len(generations) != len(prompts):
            raise RuntimeError(f"rollout engine returned {len(generations)} generations for {len(prompts)} prompts")
        for (i, prefix), gen in zip(prefixes.items(), generations):
            request = requests[i]
            analysis = self.step_verifier.describe_first_error(request.query.problem, request.wrong_solution)
            continuation = self.tokenizer.decode(gen.token_ids)  # the eos dropped
            raw = (f"<analysis>\n{analysis}\n</analysis>\n"
                   f"<reconstruction>\n{prefix}{self.marker}{continuation}\n</reconstruction>")
            # We close the tag ourselves, so `closed` says nothing: what matters is whether the policy stopped.
            out[i] = _cut_off(gen, parse_construction(raw, self.max_chars))
        return out  # type: ignore[return-value]  # every slot was filled above
