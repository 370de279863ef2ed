"""``tapo train --config R.yaml [a.b=v ...]``: RL (GRPO, or TAPO with tapo.enabled=true); under torchrun for TP/PP/DP."""
from tapo_megatron.commands._config import add_config_args, load


def add_parser(sub):
    return add_config_args(sub.add_parser("train", help="RL training (GRPO / TAPO)"))


def run(args) -> int:
    from tapo_megatron.runguard import PREEMPTED_EXIT_CODE
    from tapo_megatron.train import train

    return PREEMPTED_EXIT_CODE if train(load(args)).preempted else 0
