"""``python -m tapo_megatron.commands ...`` (what torchrun and NeMo-Run launch): the ``tapo`` command."""
import sys

from tapo_megatron.commands import main

sys.exit(main())
