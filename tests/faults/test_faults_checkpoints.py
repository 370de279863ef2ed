"""Damaged save directories (real actor checkpoints of a tiny Qwen3, damaged on disk): truncated and bit-flipped
shards, a missing or dangling pointer, a missing ``.metadata``, a truncated ``state.json``, every checkpoint bad;
NaN gradients and NaN weights at the actor; ``tapo convert`` / ``export`` into an existing directory and from a
truncated shard. Each asserts the line the user sees and which checkpoint a resume would load."""
import shutil

import pytest
import torch

from tapo_megatron.commands import main
from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.convert.checkpoints import LATEST_FILE, has_checkpoint, resolve_checkpoint
from tapo_megatron.errors import CheckpointError
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import init_parallel
from tapo_megatron.training.actor import MegatronActor, NonFiniteLossError, NonFiniteWeightsError

SHAPE = Qwen3Shape(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=32)
TOKENS = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))


def mean_loss(lp, mb):
    return -lp.sum() / 28.0, {}


def nan_grad_loss(lp, mb):  # finite loss, NaN gradient
    poisoned = lp.clone()
    poisoned.register_hook(lambda g: g * float("nan"))
    return -poisoned.sum() / 28.0, {}


def new_actor(seed=2) -> MegatronActor:
    return MegatronActor(SHAPE, init_parallel(1, 1, seed=seed), OptimizerConfig(lr=1e-2), ParallelConfig())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save directory with iter_0 (before any optimizer step), iter_1 and iter_2, and the weights of each."""
    save = tmp_path_factory.mktemp("ckpts") / "save"
    actor, weights = new_actor(), {}
    for step in range(3):
        if step:
            actor.train_step({"tokens": TOKENS}, mean_loss)
        actor.save_checkpoint(save)
        weights[step] = {k: v.clone() for k, v in actor.module.state_dict().items() if torch.is_tensor(v)}
    return save, weights


@pytest.fixture
def save_dir(saved, tmp_path):
    copy = tmp_path / "save"
    shutil.copytree(saved[0], copy)
    return copy


def error_lines(capsys) -> list[str]:
    """stderr without the progress bar's redraws (a terminal shows them in place)."""
    return [line for line in capsys.readouterr().err.splitlines() if "tensor/s]" not in line and line.strip()]


def resolved(save_dir):
    messages = []
    return resolve_checkpoint(save_dir, report=messages.append).name, messages


def test_intact_directory_loads_the_pointer_target_silently(save_dir):
    assert resolved(save_dir) == ("iter_0000002", [])


def test_truncated_shard_is_skipped_with_its_path(save_dir):
    shard = save_dir / "iter_0000002" / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    name, messages = resolved(save_dir)
    assert name == "iter_0000001"
    assert "skipping" in messages[0] and "model/__0_0.distcp is 100 bytes" in messages[0] and "truncated" in messages[0]
    assert "names iter_0000002" in messages[1]


def test_bit_flipped_shard_is_skipped(save_dir):
    shard = save_dir / "iter_0000002" / "optim" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0x01
    shard.write_bytes(bytes(data))
    name, messages = resolved(save_dir)
    assert name == "iter_0000001" and "optim/__0_0.distcp does not match its sha256" in messages[0]


def test_missing_metadata_and_truncated_state_are_named(save_dir):
    (save_dir / "iter_0000002" / "model" / ".metadata").unlink()
    state = save_dir / "iter_0000001" / "state.json"
    state.write_text(state.read_text()[:10])
    name, messages = resolved(save_dir)
    assert name == "iter_0000000"
    assert "model/.metadata is missing" in messages[0] and "state.json is 10 bytes" in messages[1]


def test_missing_or_dangling_pointer_uses_the_newest_complete_checkpoint(save_dir):
    (save_dir / LATEST_FILE).write_text("7")  # names a checkpoint that is not there
    assert resolved(save_dir) == ("iter_0000002", [f"[checkpoint] {save_dir / LATEST_FILE} names iter_0000007; "
                                                   f"using the newest intact checkpoint {save_dir / 'iter_0000002'}"])
    (save_dir / LATEST_FILE).unlink()
    name, messages = resolved(save_dir)
    assert name == "iter_0000002" and "is missing; using the newest complete checkpoint" in messages[0]


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(save_dir):
    for ckpt in save_dir.glob("iter_*"):
        (ckpt / "state.json").write_text("{")
    assert has_checkpoint(save_dir)  # a run resumes from it or fails; it never starts over silently
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*iter_0000002: .*state.json is 1 bytes"):
        resolve_checkpoint(save_dir, report=lambda m: None)


def test_legacy_checkpoint_without_manifest_with_truncated_state(save_dir):
    ckpt = save_dir / "iter_0000002"
    (ckpt / "manifest.json").unlink()
    (ckpt / "state.json").write_text('{"iteration": ')
    name, messages = resolved(save_dir)
    assert name == "iter_0000001" and "state.json is unreadable (JSONDecodeError" in messages[0]


def test_resume_after_fallback_loads_the_older_weights(saved, save_dir):
    shard = save_dir / "iter_0000002" / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    actor = new_actor(seed=5)
    actor.load_checkpoint(save_dir)
    assert actor.iteration == 1
    got = actor.module.state_dict()
    assert all(torch.equal(saved[1][1][k], got[k]) for k in saved[1][1])


def test_nan_gradient_leaves_weights_and_checkpoints_finite(tmp_path):
    actor = new_actor()
    before = {k: v.clone() for k, v in actor.module.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at iteration 0"):
        actor.train_step({"tokens": TOKENS}, lambda lp, mb: (lp.sum() * float("nan"), {}))
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at iteration 0 .finite loss."):
        actor.train_step({"tokens": TOKENS}, nan_grad_loss)
    assert actor.iteration == 0
    assert all(torch.equal(before[k], actor.module.state_dict()[k]) for k in before)
    actor.train_step({"tokens": TOKENS}, mean_loss)  # the next finite step trains normally
    assert all(torch.isfinite(p).all() for p in actor.module.parameters())
    # Weights that are not finite anyway (whatever put them there) are never saved.
    with torch.no_grad():
        next(actor.module.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="refusing to save .*iter_0000001: non-finite weights in"):
        actor.save_checkpoint(tmp_path / "save")
    assert not (tmp_path / "save").exists() or not list((tmp_path / "save").iterdir())


def test_convert_into_an_existing_directory_and_from_a_truncated_shard(saved, tmp_path, capsys):
    ckpt = saved[0] / "iter_0000002"
    out = tmp_path / "hf"
    out.mkdir()
    assert main(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tapo convert: error: {out} exists; pass --overwrite (overwrite=True) to replace it"
    assert main(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()  # the conversion's progress bar
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shard = broken / "model" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:200])
    assert main(["export", "--ckpt", str(broken), "--out", str(tmp_path / "hf2")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "is not usable: model/__0_0.distcp is 200 bytes" in err[0]
    (broken / "manifest.json").unlink()  # no manifest to catch it: the reader's error, named, and no .tmp left
    assert main(["convert", "mcore-to-hf", "--ckpt", str(broken), "--out", str(tmp_path / "hf2")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"reading Megatron checkpoint {broken / 'model'} failed" in err[0]
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf2.tmp").exists()


def test_saving_the_iteration_just_saved_rewrites_nothing(tmp_path):
    actor = new_actor()
    actor.train_step({"tokens": TOKENS}, mean_loss)
    first = actor.save_checkpoint(tmp_path / "save")
    stamp = (first / "manifest.json").stat().st_mtime_ns, (first / "model" / ".metadata").stat().st_ino
    assert actor.save_checkpoint(tmp_path / "save") == first  # the loop's final save right after an interval save
    assert ((first / "manifest.json").stat().st_mtime_ns, (first / "model" / ".metadata").stat().st_ino) == stamp
    assert sorted(p.name for p in (tmp_path / "save").iterdir()) == ["iter_0000001", LATEST_FILE]


def test_checkpoint_without_manifest_and_metadata_fails_naming_it(save_dir):
    ckpt = save_dir / "iter_0000002"
    (ckpt / "manifest.json").unlink()  # as written before manifests existed
    (ckpt / "model" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} could not be loaded .*checkpoint.load="):
        new_actor().load_checkpoint(save_dir)
