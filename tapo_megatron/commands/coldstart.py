"""``tapo coldstart build|filter --config R.yaml [a.b=v ...]``: the cold-start SFT set from a query file, and the
offline ZPD filter of the RL queries with the cold-start model."""
from tapo_megatron.commands._config import add_config_args, load


def add_parser(sub):
    p = sub.add_parser("coldstart", help="cold-start data, and the ZPD filter of the RL queries")
    actions = p.add_subparsers(dest="action", required=True)
    add_config_args(actions.add_parser("build", help="build the cold-start SFT set from a query file"), required=False)
    add_config_args(actions.add_parser("filter", help="keep the RL queries the cold-start model solves 1..K-1 of K "
                                                      "times (coldstart.zpd_low..zpd_high)"), required=False)
    return p


def run(args) -> None:
    from tapo_megatron.coldstart import build_coldstart, filter_queries

    if args.action == "filter":
        report = filter_queries(load(args))
        print(f"tapo coldstart filter: kept {report.kept}/{report.queries} queries in {report.output_file} "
              f"({report.all_wrong} never solved, {report.all_correct} always solved, K={report.k})")
        return
    report = build_coldstart(load(args))
    print(f"tapo coldstart build: {report.rows} rows in {report.output_dir} "
          f"({report.zpd_kept}/{report.queries_done} queries in the ZPD, "
          f"{report.constructions_spliced}/{report.constructions_attempted} constructions spliced)")
