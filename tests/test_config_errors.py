"""Bad input gives one clear error line naming the field (or file:line), not a traceback from inside Megatron."""
from pathlib import Path

import pytest

from tapo_megatron.commands import main
from tapo_megatron.config import ConfigError, load_config
from tapo_megatron.data.assets import qwen3_tokenizer_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

DEMO = str(REPO_ROOT / "tapo_megatron" / "recipes" / "demo.yaml")


def _run(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_tp_not_dividing_heads(capsys):
    err = _run(capsys, "train", "--config", DEMO, "parallel.tensor_model_parallel_size=3",
               "logging.wandb_mode=disabled")
    assert "tensor_model_parallel_size=3" in err and "num_attention_heads=4" in err


def test_missing_model_field(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hf_config:\n    vocab_size: 20\n    num_hidden_layers: 2\n")
    err = _run(capsys, "train", "--config", str(recipe), "logging.wandb_mode=disabled")
    assert "missing required field" in err and "hidden_size" in err


def test_missing_model_section(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train_iters: 3\n")
    assert "model.hf_config" in _run(capsys, "train", "--config", str(recipe))


def test_unknown_and_mistyped_fields():
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        load_config(DEMO, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="optimizer.lr: expected float"):
        load_config(DEMO, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="tapo.n_pos \\+ tapo.n_neg"):
        load_config(DEMO, ["tapo.enabled=true", "tapo.n_pos=5", "tapo.n_neg=5"])


def test_malformed_data_rows_refused_with_file_and_line(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "no answer"}\n')
    err = _run(capsys, "train", "--config", DEMO, "data.task=math", f"data.train_file={data}",
               "data.on_bad_row=raise", "data.reward=math", "logging.wandb_mode=disabled",
               f"model.tokenizer={qwen3_tokenizer_dir()}")
    assert f"{data}:2" in err and "answer" in err
