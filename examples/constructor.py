"""A constructor where the policy writes the correction by *continuing its own wrong solution*.

Instead of answering a construction prompt (``"policy"``), the policy is shown its original query and the start of
its own wrong solution, followed by a reflection marker, and simply keeps writing:

    prompt   = wrong.prompt_ids + encode(prefix + marker)      # the ORIGINAL query's prompt, not a construction prompt
    answer   = <analysis>...</analysis><reconstruction>prefix + marker + continuation</reconstruction>

``prefix`` is the wrong solution up to the end of the line/step (any of ``step_ends``) nearest to ``cut_fraction`` of
its length (never empty; the fraction's character when there is no step end). The answer goes through
``parse_construction``, so splicing treats it exactly like the policy constructor's output: the prefix is copied
verbatim, hence reused as the rollout's own SAMPLED tokens, and ``marker + continuation`` is INJECTED. The cut is
blind: it does not know where the first faulty step is (compare ``"step_verifier"``), so this is the cheap,
prompt-free baseline of TAPO's construction.

Plug it in from a recipe or the command line, by import path (with the repository root on ``sys.path``) or, once
this module is imported, by its registered name:

    tapo.enabled=true tapo.constructor=examples.constructor:ContinuationConstructor      # or: continuation
    tapo.constructor=examples.constructor:ArithmeticContinuationConstructor              # the CPU demo task

Options. Sampling comes from the ``tapo`` section (``construction_temperature``, ``construction_top_p``,
``max_construction_tokens``; the tokenizer's eos stops it) and ``tapo.max_construction_chars`` caps the answer. A
continuation that hit the token limit is cut off and fails as ``too_long`` (an aborted one as ``aborted``).
``TapoConfig`` has no fields for the cut or the marker, so ``from_config`` takes them from the class attributes
``cut_fraction``, ``marker`` and ``step_ends``: subclass and override them (as ``ArithmeticContinuationConstructor``
does) and name the subclass in ``tapo.constructor``; in code, pass them to ``__init__`` instead.

Signature to keep (``tapo_megatron.trajectory.constructors.Constructor``): ``construct(requests) ->
list[Construction]``, one per request in order (failures as ``Construction(text=None, failure=reason)``), and the
classmethod ``from_config(tapo, *, engine=None, tokenizer=None, step_verifier=None)``.

Caveat: ``parse_construction`` strips the reconstruction, so a wrong solution that starts with whitespace cannot be
copied verbatim and fails to splice as ``prefix_mismatch``.
"""
from __future__ import annotations

from collections.abc import Sequence

from tapo_megatron.config import TapoConfig
from tapo_megatron.data.tokenizer import Tokenizer
from tapo_megatron.records import FinishReason, SamplingParams
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.tasks.arithmetic.tokenizer import CORRECTION_MARKER, STEP_END
from tapo_megatron.trajectory.constructors import (
    ConstructionRequest,
    Constructor,
    StepVerifierTask,
    register_constructor,
    stopping_at_eos,
)
from tapo_megatron.trajectory.parse import DEFAULT_MAX_CHARS, Construction, FailureReason, parse_construction

__all__ = ["ContinuationConstructor", "ArithmeticContinuationConstructor", "NO_PREFIX"]

# Failure reason of our own (the builder counts any string as tapo/fail/<reason>): an empty wrong solution
# leaves nothing to continue from.
NO_PREFIX = "no_prefix"


@register_constructor("continuation")
class ContinuationConstructor(Constructor):
    """The policy continues its wrong solution after a reflection marker (see the module docstring).

    Args:
        engine: the rollout engine serving the current policy.
        tokenizer: the policy's tokenizer; it must be able to encode ``marker``.
        sampling: sampling for the continuation; None: temperature 1, top_p 1, 256 new tokens. The tokenizer's eos
            is always added to the stop tokens.
        cut_fraction, marker, step_ends: override the class attributes of the same names (None: keep them).
        max_chars: answers longer than this fail as ``too_long`` (``parse_construction``).
    """

    # Plain class attributes (not ClassVar): a subclass overrides them, __init__ kwargs shadow them per instance.
    cut_fraction: float = 0.5  # where in the wrong solution to cut, as a share of its characters
    marker: str = "\nWait, let me check that again.\n"  # what turns the continuation into a reflection
    step_ends: tuple[str, ...] = ("\n",)  # a cut goes right after one of these (the end of a line/step)

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Tokenizer,
        *,
        sampling: SamplingParams | None = None,
        cut_fraction: float | None = None,
        marker: str | None = None,
        step_ends: Sequence[str] | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        # Set only when given: otherwise the class's (a subclass's) defaults apply.
        if cut_fraction is not None:
            self.cut_fraction = cut_fraction
        if marker is not None:
            self.marker = marker
        if step_ends is not None:
            self.step_ends = tuple(step_ends)
        if not 0.0 < self.cut_fraction <= 1.0:
            raise ValueError(f"{type(self).__name__}: cut_fraction={self.cut_fraction} must be in (0, 1]")
        if not self.marker:
            raise ValueError(f"{type(self).__name__}: marker must be non-empty (it is what makes the continuation a "
                             "reflection, and without it the copy of the wrong solution would have nothing to splice)")
        if any(not end for end in self.step_ends):
            raise ValueError(f"{type(self).__name__}: step_ends must be non-empty strings, got {self.step_ends!r}")
        try:  # fail at build time, not mid-training, when the policy's vocabulary cannot express the marker
            tokenizer.encode(self.marker)
        except ValueError as exc:
            raise ValueError(
                f"{type(self).__name__}: the tokenizer cannot encode the marker {self.marker!r} ({exc}); set "
                "`marker` to text it can encode (the arithmetic demo: ArithmeticContinuationConstructor, marker 'W')"
            ) from exc
        self.engine = engine
        self.tokenizer = tokenizer
        self.sampling = stopping_at_eos(sampling or SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=256),
                                        tokenizer.eos_id)
        self.max_chars = max_chars

    @classmethod
    def from_config(
        cls, tapo: TapoConfig, *, engine: RolloutEngine | None = None, tokenizer: Tokenizer | None = None,
        step_verifier: StepVerifierTask | None = None,
    ) -> ContinuationConstructor:
        if engine is None or tokenizer is None:
            raise ValueError(f"tapo.constructor={cls.__name__!r} needs the rollout engine and the tokenizer")
        sampling = SamplingParams(
            temperature=tapo.construction_temperature,
            top_p=tapo.construction_top_p,
            max_new_tokens=tapo.max_construction_tokens,
            stop_token_ids=(tokenizer.eos_id,),
        )
        # cut_fraction / marker / step_ends: not config fields; the class attributes (a subclass's) apply.
        return cls(engine, tokenizer, sampling=sampling, max_chars=tapo.max_construction_chars)

    def cut_point(self, text: str) -> int:
        """Characters of ``text`` to keep: the step end nearest to ``cut_fraction * len(text)`` (the earlier one on
        a tie), or that character itself when ``text`` has no step end; always in [1, len(text)] for non-empty text."""
        target = self.cut_fraction * len(text)
        ends = set()
        for end in self.step_ends:
            start = text.find(end)
            while start >= 0:
                ends.add(start + len(end))
                start = text.find(end, start + 1)
        if ends:
            return min(ends, key=lambda e: (abs(e - target), e))
        return min(len(text), max(1, round(target)))

    def construct(self, requests: Sequence[ConstructionRequest]) -> list[Construction]:
        out: list[Construction | None] = [None] * len(requests)
        prefixes: dict[int, str] = {}
        prompts: list[list[int]] = []
        for i, request in enumerate(requests):
            wrong = request.wrong_solution
            if not wrong:
                out[i] = Construction(None, "", NO_PREFIX, "")
                continue
            prefixes[i] = wrong[: self.cut_point(wrong)]
            # The wrong rollout's own prompt: the continuation is conditioned on the query exactly as sampled.
            prompts.append(list(request.wrong.prompt_ids) + self.tokenizer.encode(prefixes[i] + self.marker))
        generations = self.engine.generate(prompts, self.sampling) if prompts else []  # one batch for the step
        if len(generations) != len(prompts):
            raise RuntimeError(f"rollout engine returned {len(generations)} generations for {len(prompts)} prompts")
        for (i, prefix), gen in zip(prefixes.items(), generations):
            wrong = requests[i].wrong_solution
            analysis = (f"Kept {len(prefix)} of {len(wrong)} characters of the wrong solution (the step end nearest "
                        f"{self.cut_fraction:.0%}); the policy continued after the marker {self.marker!r}.")
            continuation = self.tokenizer.decode(gen.token_ids)  # special tokens (the eos) dropped
            raw = (f"<analysis>\n{analysis}\n</analysis>\n"
                   f"<reconstruction>\n{prefix}{self.marker}{continuation}\n</reconstruction>")
            parsed = parse_construction(raw, self.max_chars)
            # We close the tag ourselves, so `closed` says nothing: a continuation that did not stop is cut off.
            if parsed.failure is None and gen.finish_reason is not FinishReason.STOP:
                reason = FailureReason.TOO_LONG if gen.finish_reason is FinishReason.LENGTH else FailureReason.ABORTED
                parsed = Construction(None, parsed.analysis, reason.value, raw)
            out[i] = parsed
        return out  # type: ignore[return-value]  # every slot was filled above


@register_constructor("continuation_arithmetic")
class ArithmeticContinuationConstructor(ContinuationConstructor):
    """``ContinuationConstructor`` for the arithmetic demo: its 20-token vocabulary has no newline or words, so the
    marker is the task's correction marker ``W`` and a step ends at ``;``. The pattern for any override: subclass,
    set the class attributes, name the subclass in ``tapo.constructor``."""

    marker = CORRECTION_MARKER
    step_ends = (STEP_END,)
