"""``tapo coldstart build --config R.yaml [a.b=v ...]``: the cold-start SFT set from a query file."""
from tapo_megatron.commands._config import add_config_args, load


def add_parser(sub):
    p = sub.add_parser("coldstart", help="cold-start data")
    actions = p.add_subparsers(dest="action", required=True)
    add_config_args(actions.add_parser("build", help="build the cold-start SFT set from a query file"), required=False)
    return p


def run(args) -> None:
    from tapo_megatron.coldstart import build_coldstart

    report = build_coldstart(load(args))
    print(f"tapo coldstart build: {report.rows} rows in {report.output_dir} "
          f"({report.zpd_kept}/{report.queries_done} queries in the ZPD, "
          f"{report.constructions_spliced}/{report.constructions_attempted} constructions spliced)")
