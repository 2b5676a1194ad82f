#!/usr/bin/env python
"""Safe NPT equivalence pre-training: the NPT student learns to reproduce the base model's layers.

    python pretrain_npt_safe.py                       # smollm2-135m on the builtin corpus
    torchrun --nproc_per_node 2 pretrain_npt_safe.py  # DDP (gloo on CPU, nccl on GPU)
    python pretrain_npt_safe.py --help                # every flag

The recipe lives in npt_tools.trainer (`train(TrainArgs(...))` from Python); this file only runs its command.
"""
from npt_tools.trainer import main

if __name__ == "__main__":
    main()
