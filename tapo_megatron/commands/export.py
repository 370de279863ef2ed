"""``tapo export --ckpt C --out D``: the final Megatron checkpoint as an HF directory for serving."""


def add_parser(sub):
    export = sub.add_parser("export", help="Megatron checkpoint -> HF directory")
    export.add_argument("--ckpt", required=True, help="a checkpoint dir (iter_N) or a save dir (its latest)")
    export.add_argument("--out", required=True)
    export.add_argument("--tokenizer-dir", default=None, help="tokenizer/generation-config folder to copy")
    export.add_argument("--overwrite", action="store_true")
    return export


def run(args) -> None:
    from tapo_megatron.convert.api import mcore_to_hf
    from tapo_megatron.convert.checkpoints import resolve_checkpoint

    mcore_to_hf(resolve_checkpoint(args.ckpt), args.out, tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite)
