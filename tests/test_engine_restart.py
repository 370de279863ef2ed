"""An engine server killed while it generates is restarted and its requests retried: nothing lost, nothing twice.

Two servers speaking SGLang's protocol (tests/_sync_fake_sglang.py: no model, starts in under a second; its answer
is a fixed function of the prompt) share the prompts; server 1 is SIGKILLed while its request is in flight (the
server sleeps ``--generate-delay-s`` before answering, and the kill waits until its log shows the request arrived).
``SGLangEngine.generate`` must restart it, resend its shard under fresh request ids, and return every prompt's
answer exactly once and in its slot. The server logs prove each prompt was answered by exactly one response.
"""
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from tapo_megatron.records import FinishReason, SamplingParams
from tapo_megatron.rollout.sglang import SGLangEngine, ServerLaunch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _sync_fake_sglang import answer  # noqa: E402  (the fake server's answer function: the expected outputs)

VOCAB = 32


def _served(log_dir: Path) -> list[str]:
    return [m for p in sorted(log_dir.glob("engine*.log")) for m in re.findall(r"served rid=(\S+)", p.read_text())]


def test_killed_engine_is_restarted_and_its_requests_retried(tmp_path):
    argv = [sys.executable, str(TESTS / "_sync_fake_sglang.py"), "--host", "{host}", "--port", "{port}",
            "--generate-delay-s", "1.0", "--vocab-size", str(VOCAB)]
    launch = ServerLaunch(argv=argv, log_dir=str(tmp_path))
    engine = SGLangEngine.launch([launch, launch], startup_timeout_s=60, request_timeout_s=60)
    prompts = [[(3 * i + j) % VOCAB for j in range(3 + i % 4)] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_new_tokens=5, stop_token_ids=(7,))
    victim = engine.servers[1]
    results: dict = {}
    try:
        worker = threading.Thread(target=lambda: results.update(out=engine.generate(prompts, params)))
        worker.start()
        deadline = time.monotonic() + 60
        while "received rids=" not in victim.log_tail(100_000):  # the shard's request is in flight
            assert time.monotonic() < deadline, victim.log_tail()
            time.sleep(0.05)
        old_pid = victim.process.pid
        os.killpg(old_pid, signal.SIGKILL)
        worker.join(timeout=120)
        assert not worker.is_alive(), "generate did not return after the restart"
        assert victim.process is not None and victim.process.pid != old_pid and victim.alive()
    finally:
        engine.shutdown()

    out = results["out"]
    assert len(out) == len(prompts)
    for i, (prompt, got) in enumerate(zip(prompts, out)):
        want = answer(prompt, {"max_new_tokens": 5, "stop_token_ids": [7]}, "", VOCAB)
        assert got.token_ids == want["output_ids"], i
        assert got.logprobs == [e[0] for e in want["meta_info"]["output_token_logprobs"]], i
        assert got.finish_reason == (FinishReason.STOP if want["meta_info"]["finish_reason"]["type"] == "stop"
                                     else FinishReason.LENGTH)
        assert got.weight_version == 0
    assert {g.finish_reason for g in out} == {FinishReason.STOP, FinishReason.LENGTH}  # both paths exercised
    assert engine.stats.restarts == 1 and engine.stats.retried_prompts == 4 and engine.stats.generated_prompts == 8
    # Every prompt answered by exactly one successful response across all server logs (the killed attempt never
    # answered; the retry used fresh request ids).
    served = _served(tmp_path)
    per_prompt = [sum(1 for rid in served if rid.startswith(f"tapo-0-{i}-")) for i in range(len(prompts))]
    assert per_prompt == [1] * len(prompts), served
    assert all(rid.split("-")[3] == "a1" for rid in served if int(rid.split("-")[2]) >= 4)  # retried shard
