"""The arithmetic task's step verifier: locates the first faulty step and writes the correction.

Used by the ``step_verifier`` constructor (an oracle ablation: the program, not the policy, writes the correction).
"""
from __future__ import annotations

from tapo_megatron.tasks.arithmetic.problems import StepErrorKind, check_steps, write_correction


class ArithmeticStepVerifier:
    """The arithmetic task's step checker behind ``trajectory.constructors.StepVerifierTask``."""

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
