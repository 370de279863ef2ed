"""``tapo convert hf-to-mcore | mcore-to-hf``: HF <-> Megatron checkpoint conversion (``convert.api``)."""


def add_parser(sub):
    conv = sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion")
    directions = conv.add_subparsers(dest="direction", required=True)
    h2m = directions.add_parser("hf-to-mcore")
    h2m.add_argument("--hf-dir", required=True)
    h2m.add_argument("--out", required=True)
    h2m.add_argument("--tp", type=int, default=1)
    h2m.add_argument("--pp", type=int, default=1)
    h2m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m2h = directions.add_parser("mcore-to-hf")
    m2h.add_argument("--ckpt", required=True, help="hf-to-mcore output, a checkpoint dir (iter_N) or a save dir")
    m2h.add_argument("--out", required=True)
    m2h.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return conv


def run(args) -> None:
    from tapo_megatron.convert.api import find_mcore_checkpoint, hf_to_mcore, mcore_to_hf

    if args.direction == "hf-to-mcore":
        hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
    else:
        mcore_to_hf(find_mcore_checkpoint(args.ckpt), args.out, overwrite=args.overwrite)
