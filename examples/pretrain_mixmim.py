#!/usr/bin/env python
"""MixMIM pretraining: ``examples/pretrain.py --method mixmim`` under its former name (every option of
pretrain.py works; see its docstring). MixMIM, UM-MAE and SimMIM now share examples/pretrain.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pretrain import main  # noqa: E402

if __name__ == "__main__":
    main(method="mixmim")
