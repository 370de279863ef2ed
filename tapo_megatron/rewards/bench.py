"""``tapo bench rewards``: verifications per second of the math verifier's process pool against calling math-verify
in-process one response at a time (what a script without the pool does), on the same responses in one run.

    tapo bench rewards [--workers 2] [--n 240]

Responses are shaped like real ones (a paragraph of reasoning, then a boxed answer; half correct) over AIME / HMMT
style gold answers. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

GOLDS = [r"\frac{9 \sqrt{23}}{23}", "204", r"\frac{-1+\sqrt{17}}{2}, \frac{-1-\sqrt{17}}{2}", r"2^{25} \cdot 26!",
         r"1-\frac{2}{\pi}", "-984"]
REASONING = "Let $x$ be the unknown. Then $x^2 - 3x + 2 = 0$, so we factor and check both roots. " * 20


def main(argv: list[str] | None = None) -> dict:
    from tapo_megatron.rewards.math_verifier import MathVerifier, verify_math_answer

    p = argparse.ArgumentParser(prog="tapo bench rewards", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n", type=int, default=240)
    args = p.parse_args(argv)
    golds = [GOLDS[i % len(GOLDS)] for i in range(args.n)]
    responses = [REASONING + "\\boxed{" + (g if i % 2 == 0 else "17") + "}" for i, g in enumerate(golds)]
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(args.n)]
    with MathVerifier(num_workers=args.workers, timeout_s=10.0) as pool:
        pool.score_batch(responses[:6], golds[:6])  # start the workers and warm their gold caches
        t = time.perf_counter()
        scores = pool.score_batch(responses, golds)
        pooled = time.perf_counter() - t
    assert scores == expected, "the pool scored the benchmark responses wrongly"
    t = time.perf_counter()
    serial = [float(verify_math_answer(r, g)) for r, g in zip(responses, golds)]
    serial_s = time.perf_counter() - t
    report = {"n": args.n, "workers": args.workers, "pool_per_s": args.n / pooled, "in_process_per_s": args.n / serial_s,
              "speedup_vs_in_process": serial_s / pooled, "in_process_agrees": serial == expected}
    print(json.dumps(report))
    return report
