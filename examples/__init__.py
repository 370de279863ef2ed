"""Copyable plug-ins, one per place a user plugs in: a reward (``examples.reward``), an advantage estimator
(``examples.advantage``) and a constructor (``examples.constructor``); each is tested on CPU by
``tests/test_examples.py``. With the repository root on ``sys.path`` (it is when you run from it), a recipe or the
command line names them by import path, e.g. ``data.reward=examples.reward:strict_boxed_reward``."""
