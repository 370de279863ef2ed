"""The shipped data: every file present with its row count, the Qwen3 tokenizer built byte-identical to Qwen's, and
no module, test or recipe that names a path outside the repository (a clone has no sibling development folders beside it)."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tapo_megatron.data import assets
from tapo_megatron.data.assets import (
    FILES_DIR,
    QWEN3_TOKENIZER_SHA256,
    build_qwen3_tokenizer_json,
    data_file,
    qwen3_tokenizer_dir,
    resolve_dataset,
)
from tapo_megatron.errors import DataError

REPO = Path(__file__).resolve().parent.parent
ROWS = {"aime2024.jsonl": 30, "aime2025.jsonl": 30, "hmmt_feb2025.jsonl": 30, "deepscaler_sample.jsonl": 2769,
        "math_train.jsonl": 7470}


def test_shipped_sets_and_their_rows():
    for name, rows in ROWS.items():
        lines = [json.loads(line) for line in data_file(name).read_text(encoding="utf-8").splitlines() if line]
        assert len(lines) == rows and all(r["problem"] and r["answer"] for r in lines), name
    assert resolve_dataset("aime24") == FILES_DIR / "aime2024.jsonl"
    assert resolve_dataset("deepscaler") == FILES_DIR / "deepscaler_sample.jsonl"
    with pytest.raises(FileNotFoundError, match="shipped: .*aime2024.jsonl"):
        data_file("nope")
    with pytest.raises(DataError, match="not a shipped set"):
        resolve_dataset("aime99")
    assert (FILES_DIR / "README.md").is_file()


def test_tokenizer_json_is_qwens_byte_for_byte(tmp_path):
    out = tmp_path / "tokenizer.json"
    build_qwen3_tokenizer_json(FILES_DIR / "qwen3_tokenizer", out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == QWEN3_TOKENIZER_SHA256


def test_tokenizer_json_with_the_wrong_hash_is_never_installed(tmp_path, monkeypatch):
    """A tokenizers release that serialised differently must fail loudly, not leave a non-Qwen file behind."""
    import tokenizers

    monkeypatch.setattr(assets, "QWEN3_TOKENIZER_SHA256", "0" * 64)
    out = tmp_path / "tokenizer.json"
    with pytest.raises(RuntimeError, match=f"tokenizer.json.*tokenizers {re.escape(tokenizers.__version__)}"):
        build_qwen3_tokenizer_json(FILES_DIR / "qwen3_tokenizer", out)
    assert list(tmp_path.iterdir()) == []


def test_qwen3_tokenizer_loads_with_transformers():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()), local_files_only=True)
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                      "</think>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
                   "</think>": 151668}
    assert len(tok) == 151669 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_read_only_package_builds_into_the_cache_concurrently(tmp_path):
    """Two processes (like two torchrun ranks) build into a fresh cache folder at once; both get Qwen's bytes."""
    script = (f"import os; from pathlib import Path; from tapo_megatron.data import assets; "
              f"os.access = lambda p, m: False if Path(p) == assets.FILES_DIR / 'qwen3_tokenizer' else True; "
              f"d = assets.qwen3_tokenizer_dir(); print(d)")
    env = {**os.environ, "TAPO_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folder = Path(outs[0][0].strip())
    assert folder.parent == tmp_path / "cache"
    assert hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest() == QWEN3_TOKENIZER_SHA256
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "tokenizer.json", "tokenizer_config.json",
                                                         "vocab.json"]


# Paths that only exist on a development machine: the sibling source-data folder, the workspace, home directories.
OUTSIDE = re.compile(r"[.][.]/shared|shared/data|shared_data|TAPO_SHARED|/work/|/home/|/root/")


def test_nothing_names_a_path_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    checked, offenders = 0, []
    for name in files:
        path = REPO / name
        if not path.is_file() or not name.endswith((".py", ".yaml", ".yml", ".toml", ".cfg", ".ini")) \
                or name.startswith("tapo_megatron/data/files/") or name == "tests/test_assets.py":
            continue
        checked += 1
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{n}: {line.strip()}")
    assert checked > 50
    assert not offenders, "\n".join(offenders)
    assert assets.FILES_DIR.is_relative_to(REPO)
