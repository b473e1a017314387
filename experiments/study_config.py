"""The alignment study (docs/results.md): arms, budgets, gamma sweep and seeds.

    python -m experiments.alignment_study            # this config
    python -m experiments.alignment_study --tiny     # seconds-long version (tests)
"""

import ml_collections


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Every run starts from this training config (digits, ResNet-20, 20 epochs, fine-tune 6).
    c.base = "test_tiny" if tiny else "quickstart"
    c.budgets = (0.5,) if tiny else (0.5, 0.3)  # p: fraction of prunable MACs kept
    c.gammas = (0.0, 1e-2) if tiny else (0.0, 1e-3, 1e-2, 5e-2)  # gamma sweep, at budgets[0]
    c.seeds = (0,) if tiny else (0, 1)  # every arm runs once per seed; tables show the mean
    # AGN schedule of every AGN arm: the settings the recorded study was run with (the
    # quickstart has since moved to every 4 steps at batch 32, docs/benchmarks.md).
    c.agn_every = 2  # one AGN step every this many weight steps
    c.agn_batch_size = 16 if tiny else 64  # test_tiny has 16
    # Classic group lasso on all channels uses the base config's gamma, like SAP.
    c.stable_hamming = 0.05  # the stability threshold of supp. §D
    return c
