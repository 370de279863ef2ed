"""The arithmetic task's step verifier: locates the first faulty step and writes the correction.

Used by the ``step_verifier`` constructor (an oracle ablation: the program, not the policy, writes the correction).
"""
from __future__ import annotations

from tapo_megatron.tasks.arithmetic.problems import StepErrorKind, check_steps, write_correction
from tapo_megatron.tasks.arithmetic.tokenizer import CORRECTION_MARKER, STEP_END


class ArithmeticStepVerifier:
    """The arithmetic task's step checker behind ``trajectory.constructors.StepVerifierTask``."""

    correction_marker = CORRECTION_MARKER

    def correction_prefix(self, problem: str, response_text: str) -> str | None:
        """The response up to and including its first faulty segment, ``;``-terminated (the marker always starts a
        fresh segment, as in ``write_correction``); None for a gold or an unfinished response.

        ``"5*3=15;7+15=21;21-4=17;A17"`` -> ``"5*3=15;7+15=21;"``; ``"5*3=15;A14"`` -> ``"5*3=15;A14;"``.
        """
        check = check_steps(problem, response_text)
        if check is None or check.kind is StepErrorKind.INCOMPLETE:
            return None
        prefix = response_text[:check.char_end]
        return prefix if prefix.endswith(STEP_END) else prefix + STEP_END

    def first_attempt_clean(self, problem: str, response_text: str, reflection_start: int | None) -> bool:
        """No faulty step before ``reflection_start`` (the whole text when None): the attempt before the first
        reflection is a prefix of the canonical solution, or the canonical solution itself."""
        head = response_text if reflection_start is None else response_text[:reflection_start]
        check = check_steps(problem, head)
        return check is None or check.kind is StepErrorKind.INCOMPLETE

    def write_correction(self, problem: str, response_text: str) -> str | None:
        return write_correction(problem, response_text)

    def describe_first_error(self, problem: str, response_text: str) -> str:
        check = check_steps(problem, response_text)
        if check is None:
            return "The solution is correct."
        kind, n, found, expected = check.kind, check.step_index + 1, check.found, check.expected
        K = StepErrorKind
        if kind is K.WRONG_RESULT:
            return f"Step {n}, '{found}', has a wrong result: it should be '{expected}'."
        if kind is K.WRONG_ORDER:
            return (f"Step {n}, '{found}', is not the next operation: multiplications come first, then left to "
                    f"right, so the next step is '{expected}'.")
        if kind is K.MALFORMED:
            return f"Step {n}, '{found}', is malformed; it should be '{expected}'."
        if kind is K.EXTRA_STEP:
            return f"All steps were already done; '{found}' is an extra step where the answer '{expected}' belongs."
        if kind is K.PREMATURE_ANSWER:
            return f"The answer '{found}' is given before step {n}, '{expected}', was computed."
        if kind is K.WRONG_ANSWER:
            return f"Every step is right, but the final answer '{found}' should be '{expected}'."
        return f"The solution stops before step {n}; it should continue with '{expected}'."  # INCOMPLETE
