"""``tapo sft --config R.yaml [a.b=v ...]``: cold-start SFT on the Megatron actor."""
from tapo_megatron.commands._config import add_config_args, load


def add_parser(sub):
    return add_config_args(sub.add_parser("sft", help="cold-start SFT"))


def run(args) -> int:
    from tapo_megatron.runguard import PREEMPTED_EXIT_CODE
    from tapo_megatron.sft import run_sft

    return PREEMPTED_EXIT_CODE if run_sft(load(args)).preempted else 0
