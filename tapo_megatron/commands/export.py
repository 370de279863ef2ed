"""``tapo export --ckpt C --out D``: the final Megatron checkpoint as an HF directory for serving."""


def add_parser(sub):
    export = sub.add_parser("export", help="Megatron checkpoint -> HF directory")
    export.add_argument("--ckpt", required=True, help="a checkpoint dir (iter_N), a save dir (its latest) or "
                                                      "`tapo convert hf-to-mcore` output")
    export.add_argument("--out", required=True)
    export.add_argument("--tokenizer-dir", default=None, help="tokenizer/generation-config folder to copy")
    export.add_argument("--overwrite", action="store_true")
    return export


def run(args) -> None:
    from tapo_megatron.convert.api import find_mcore_checkpoint, mcore_to_hf

    mcore_to_hf(find_mcore_checkpoint(args.ckpt), args.out, tokenizer_dir=args.tokenizer_dir,
                overwrite=args.overwrite)
