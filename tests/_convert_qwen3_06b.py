"""Convert a randomly initialised model with the real Qwen3-0.6B shape HF -> Megatron -> HF on CPU and report
time and peak memory (JSON on the last stdout line).

    python tests/_convert_qwen3_06b.py --work /tmp/q06b [--pp 1]

Steps: build ``Qwen3ForCausalLM`` from ``FILES_DIR/qwen3_configs.json`` (bf16, like the release), save it
with the real tokenizer in 500 MB shards; run ``hf_to_mcore`` and ``mcore_to_hf`` each in a fresh process (or
``torchrun --nproc_per_node PP`` for ``--pp`` > 1) and record wall time and peak RSS (ru_maxrss of the child
processes); compare every tensor bit for bit one shard at a time; load the export with ``AutoModelForCausalLM``
and generate a few tokens from a tokenized prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tapo_megatron.data.assets import FILES_DIR  # noqa: E402


def _child(code: str, nproc: int = 1) -> tuple[float, float]:
    """Run ``code`` in fresh process(es); returns (seconds, peak RSS of the largest child in GiB)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    if nproc == 1:
        cmd = [sys.executable, "-c", code]
    else:
        script = Path(os.environ.get("TMPDIR", "/tmp")) / f"_convert_06b_{os.getpid()}.py"
        script.write_text(code)
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
               str(script)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-5000:])
    # ru_maxrss of RUSAGE_CHILDREN is the largest single descendant seen so far (KiB on Linux); each step runs
    # in order, so a later, smaller step would not show: steps are measured in separate processes of this script.
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--step", choices=["all", "make", "to_mcore", "to_hf"], default="all")
    args = parser.parse_args()
    work = args.work
    hf, ckpt, out = work / "hf", work / "ckpt", work / "out"
    if args.step != "all":  # one measured step in this process tree (so ru_maxrss is that step's own peak)
        code = {
            "make": f"import sys; sys.argv=['x', '--work', {str(work)!r}]; sys.path.insert(0, {str(REPO / 'tests')!r}); "
                    "import _convert_qwen3_06b as m; m.make()",
            "to_mcore": f"from tapo_megatron.convert import hf_to_mcore; hf_to_mcore({str(hf)!r}, {str(ckpt)!r}, "
                        f"tp=1, pp={args.pp})",
            "to_hf": f"from tapo_megatron.convert import mcore_to_hf; mcore_to_hf({str(ckpt)!r}, {str(out)!r}, "
                     "max_shard_bytes=500 * 2**20)",
        }[args.step]
        seconds, rss = _child(code, args.pp if args.step == "to_mcore" else 1)
        print(json.dumps({"step": args.step, "seconds": round(seconds, 1), "peak_rss_gib": round(rss, 2)}))
        return

    work.mkdir(parents=True, exist_ok=True)
    steps = {}
    for step in ("make", "to_mcore", "to_hf"):
        proc = subprocess.run([sys.executable, __file__, "--work", str(work), "--pp", str(args.pp), "--step", step],
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            raise RuntimeError(f"step {step} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        steps[step] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {"shape": "Qwen3-0.6B", "dtype": "bfloat16", "pp": args.pp, **{k: v for k, v in steps.items()}}
    report.update(verify(hf, out))
    print(json.dumps(report))


def make() -> None:
    """Write the random real-shape model and the real tokenizer into ``<work>/hf``."""
    import shutil

    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    work = Path(sys.argv[sys.argv.index("--work") + 1])
    torch.set_num_threads(2)
    data = FILES_DIR
    cfg = json.loads((data / "qwen3_configs.json").read_text())["models"]["Qwen3-0.6B"]["config"]
    gen = json.loads((data / "qwen3_configs.json").read_text())["generation_config_qwen3_4b"]["value"]
    torch.manual_seed(0)
    config = Qwen3Config(**cfg)
    model = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config = GenerationConfig(**{k: v for k, v in gen.items() if k != "transformers_version"})
    model.save_pretrained(work / "hf", max_shard_size="500MB")
    for f in (data / "qwen3_tokenizer").iterdir():
        shutil.copy(f, work / "hf" / f.name)


def verify(hf: Path, out: Path) -> dict:
    """Bit-exact comparison shard by shard, then load + generate with the copied tokenizer."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tapo_megatron.convert import HFCheckpointReader

    ref = HFCheckpointReader(hf)
    got_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    if sorted(got_index) != sorted(ref):
        raise AssertionError(f"key sets differ: {sorted(set(got_index) ^ set(ref))[:5]}")
    for shard in sorted(set(got_index.values())):
        with safe_open(str(out / shard), "pt") as f:
            for name in f.keys():
                if not torch.equal(f.get_tensor(name), ref[name]):
                    raise AssertionError(f"{name} differs after the round trip")
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = tok("The answer to 2 + 3 is", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    return {"bit_exact": True, "shards_out": len(set(got_index.values())),
            "generated_tokens": int(gen.shape[1] - ids.shape[1])}


if __name__ == "__main__":
    main()
