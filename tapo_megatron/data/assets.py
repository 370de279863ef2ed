"""The data the project ships (``data/files/``, provenance and licences in its README.md), found the same way in a
checkout and in an installed wheel, so nothing is read from outside the package and nothing is downloaded.

    data_file("aime2024.jsonl")          a shipped file (FileNotFoundError names what is shipped)
    resolve_dataset("aime24")            a shipped set by short name (EVAL_SETS, TRAIN_SETS), or a JSONL path
    qwen3_tokenizer_dir()                the Qwen3 tokenizer folder, ``tokenizer.json`` built on first use

``tokenizer.json`` (11 MB) is not shipped: it is built from ``vocab.json`` + ``merges.txt`` + the added tokens of
``tokenizer_config.json`` with the ``tokenizers`` library, byte-identical to Qwen's published file (its sha256 is
checked), into the package folder when it is writable, else into a cache folder.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tapo_megatron.errors import DataError

FILES_DIR = Path(__file__).resolve().parent / "files"
EVAL_SETS = {"aime24": "aime2024.jsonl", "aime25": "aime2025.jsonl", "hmmt25": "hmmt_feb2025.jsonl"}
TRAIN_SETS = {"deepscaler": "deepscaler_sample.jsonl", "math": "math_train.jsonl"}
QWEN3_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"  # Qwen's tokenizer.json
QWEN3_TOKENIZER_SIZE = 11_422_654
_TOKENIZER_SOURCES = ("vocab.json", "merges.txt", "tokenizer_config.json")
# Qwen2/2.5/3 pre-tokenisation regex (the published tokenizer.json's Split pattern).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def data_file(name: str) -> Path:
    """The shipped file ``FILES_DIR / name``."""
    path = FILES_DIR / name
    if not path.exists():
        shipped = sorted(p.name for p in FILES_DIR.iterdir() if not p.name.startswith("."))
        raise FileNotFoundError(f"{path}: not a shipped data file; shipped: {', '.join(shipped)}")
    return path


def resolve_dataset(name: str | os.PathLike) -> Path:
    """A shipped set's short name (``aime24``, ``aime25``, ``hmmt25``, ``deepscaler``, ``math``) -> its file; any
    other name is a path to a JSONL file, which must exist."""
    key = str(name)
    if key in EVAL_SETS or key in TRAIN_SETS:
        return data_file(EVAL_SETS.get(key) or TRAIN_SETS[key])
    path = Path(name)
    if not path.is_file():
        raise DataError(f"data set {key!r}: not a shipped set ({', '.join([*TRAIN_SETS, *EVAL_SETS])}) and no such "
                        "file")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_qwen3_tokenizer_json(src_dir: Path, out_path: Path) -> None:
    """Write Qwen3's ``tokenizer.json`` from ``src_dir``'s vocab.json, merges.txt and tokenizer_config.json,
    atomically (a unique temp file in the same folder, fsync, rename: concurrent ranks may race here safely)."""
    import tokenizers
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    bpe = models.BPE.from_file(str(src_dir / "vocab.json"), str(src_dir / "merges.txt"), dropout=None,
                               unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = json.loads((src_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"]
    for token_id in sorted(added, key=int):  # in id order: each lands on the next id (151643, 151644, ...)
        t = added[token_id]
        token = AddedToken(t["content"], single_word=t["single_word"], lstrip=t["lstrip"], rstrip=t["rstrip"],
                           normalized=t["normalized"], special=t["special"])
        (tok.add_special_tokens if t["special"] else tok.add_tokens)([token])
    spec = json.loads(tok.to_str())
    # decoders.ByteLevel() takes no options in the Python API; Qwen's file spells them out, so set them in the spec.
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json.tmp", dir=out_path.parent)
    os.close(fd)
    try:
        Tokenizer.from_str(json.dumps(spec)).save(tmp, pretty=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other users of a shared install or cache must read it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = _sha256(Path(tmp))
        if digest != QWEN3_TOKENIZER_SHA256:
            # A different tokenizers release may serialise differently; never install a file that is not Qwen's.
            raise RuntimeError(f"{out_path}: the built tokenizer.json has sha256 {digest}, not Qwen's "
                               f"{QWEN3_TOKENIZER_SHA256}, with tokenizers {tokenizers.__version__}; install the "
                               "pinned tokenizers version (requirements-cpu.txt / versions.env)")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_dir() -> Path:
    root = os.environ.get("TAPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tapo-megatron")
    return Path(root) / f"qwen3_tokenizer-{QWEN3_TOKENIZER_SHA256[:12]}"


def _is_built(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == QWEN3_TOKENIZER_SIZE and _sha256(path) == QWEN3_TOKENIZER_SHA256


@functools.lru_cache(maxsize=None)
def qwen3_tokenizer_dir() -> Path:
    """A folder with the Qwen3 tokenizer (``transformers.AutoTokenizer.from_pretrained`` loads it offline)."""
    shipped = FILES_DIR / "qwen3_tokenizer"
    folder = shipped if os.access(shipped, os.W_OK) else _cache_dir()
    if folder != shipped:
        folder.mkdir(parents=True, exist_ok=True)
        for name in _TOKENIZER_SOURCES:
            if not (folder / name).is_file():  # copy then rename, so a racing rank never sees half a file
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
                os.close(fd)
                shutil.copyfile(shipped / name, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, folder / name)
    if not _is_built(folder / "tokenizer.json"):
        build_qwen3_tokenizer_json(shipped, folder / "tokenizer.json")
    return folder
