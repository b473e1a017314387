"""Defaults for every SAP run: CIFAR-10 ResNet-56 with the supplement's values.

Other configs import this one and override fields. Any field can be changed
on the command line, e.g.

    python -m sap_jax.main --config=configs/default.py --workdir=/tmp/r56 --config.num_epochs=3
"""

import ml_collections


def optimizer(lr: float, boundaries: tuple, *, schedule: str = "step", weight_decay: float = 1e-4,
              momentum: float = 0.9) -> ml_collections.ConfigDict:
    """SGD settings of one phase (dense training or fine-tuning)."""
    return ml_collections.ConfigDict(dict(
        learning_rate=lr,  # peak LR at `base_batch_size`; scaled linearly with batch_size
        base_batch_size=128,  # images the LR refers to: LR x batch_size / base_batch_size
                              # (the paper's LRs are per 128 on CIFAR, per 256 on ImageNet)
        schedule=schedule,  # "step" (x decay at boundaries), "cosine" or "constant"
        boundaries=boundaries,  # epochs where the step schedule multiplies the LR by `decay`
        decay=0.1,  # step-schedule factor
        warmup_epochs=0,  # linear warm-up from 0 (any schedule)
        momentum=momentum,  # SGD momentum
        nesterov=False,  # Nesterov momentum
        weight_decay=weight_decay,  # L2 added to the gradient (PyTorch SGD style), all params
    ))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "resnet56"  # a name from sap_jax.models.names(), or your own network's factory
    # "package.module:function" (README, "Prune your own model"); num_classes comes from the data
    c.model_kwargs = "{}"  # JSON of more arguments for a factory, e.g. '{"width": 16}'
    # a factory's groups: "inner" (uncoupled, as the paper) | "all" (+ residual streams)
    c.model_prune = "inner"
    c.model_ignore = ()  # a factory's layers whose output channels are never pruned, e.g. ("stem",)
    # Start from trained weights: "torchvision:/path/resnet50.pth" (ResNet-18/34/50/101,
    # MobileNetV2) or "sap_jax:/path" (a saved model or a run's workdir); "" = random init.
    # The schedule is unchanged: shorten the dense phase yourself (e.g. sap.e_start = 0).
    c.init_from = ""
    c.dataset = "cifar10"  # "cifar10" | "imagenet2012" (TFDS) | "digits" (scikit-learn, offline)
    c.data_dir = ""  # TFDS data directory; "" = TFDS default (~/tensorflow_datasets)
    c.image_size = 32  # training/eval resolution (a multiple of the model's total stride)
    c.batch_size = 128  # global batch, split over all devices (must divide by device count)
    c.eval_batch_size = 256  # global eval batch (must divide by device count)
    c.num_epochs = 200  # epochs of dense training + search/alignment (E in docs/method.md §4)
    c.steps_per_epoch = 0  # 0 = one pass over the training split; >0 caps it (quick runs)
    c.seed = 0  # seeds init, data order, augmentation, AGN noise and the AGN sub-dataset
    c.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)
    c.shuffle_buffer = 16384  # tf.data shuffle buffer (streamed datasets only)
    # training examples held out as the validation split (a fixed draw; a slice of train on
    # ImageNet). Every choice a run makes (final_arch="best", sub-network accuracy during
    # search) reads it; the test split is only reported. 0 here, as in the paper: with
    # sap.final_arch = "last" the run chooses nothing, and dense training and the search keep
    # every training image; final_arch = "best" needs one (e.g. 5000; validation says so)
    c.val_size = 0
    # Fine-tuning also trains on the val_size validation images: after the cut no choice reads
    # them, so holding them out would only cost training data. False keeps them out (to
    # compare fine-tuning runs on the validation split yourself).
    c.val_in_finetune = True

    c.optim = optimizer(0.1, (100, 150))  # dense training: 0.1, x0.1 at 100 and 150 (supp. §A)

    c.budget = ml_collections.ConfigDict(dict(
        p=0.48,  # the budget: fraction of the metric kept, in (0, 1] (supp. Table 1: of MACs)
        metric="macs",  # what p bounds: "macs" (the paper) or "latency", the pruned model's
                        # estimated forward time on the device of budget.latency_table over the
                        # dense model's (not to be confused with budget.measure below)
        latency_table="",  # metric "latency": a table from python -m sap_jax.latency; "" = build
                           # one at the start on this run's backend, kept in the workdir as
                           # latency_table.json so that a resumed run reads the same one
        latency_points=9,  # a built table's grid: at most this many widths per prunable dimension
        latency_reps=10,  # a built table's timed calls per grid point (the median is kept)
        scope="prunable",  # metric "macs": p is read over the "prunable" layers (paper) or the
                           # "total" network. A latency budget always bounds the whole forward
        enforce=True,  # at the cut, an architecture over p loses its lowest-norm kept channels
                       # (score: sap.norm) until it meets p; False = cut as chosen
        round_to=0,  # round kept widths at the cut, within p. 0 = auto (default; so that no
                     # shipped config cuts a model slower than its dense original): with metric
                     # "latency", to the widths where the table's latency steps up; else to
                     # multiples of 8 on GPUs and CPUs, 128 on TPUs (or the largest half of it
                     # that meets p). 1 = off: the paper's protocol (the same architecture on
                     # every backend; unrounded widths ran 0.95x dense on an H200). N = multiples
                     # of N
        # The generator's resource loss lam * R(T(v)/T_full, p) (docs/method.md §6):
        form="two_sided",  # "two_sided" (ATO, dead band eps: also pulls an architecture far
                           # under p back up) or "one_sided" (NPPM)
        eps=0.005,  # dead band of the two-sided form; the adaptive lam holds still inside it
        lam=4.0,  # weight of the resource loss (lineage: 4-8)
        # > 0: dual ascent on log(lam) after each AGN step, by lam_rate * (r - p) / p, so a
        # generator held above p feels a growing pull until it meets p; 0 = a fixed lam (lineage)
        lam_rate=0.05,
        lam_max_scale=64.0,  # the adaptive lam stays within [lam, lam * lam_max_scale]
        measure="deterministic",  # the resource loss measures the noise-free v that is cut, or
                                  # the "sampled" v the CE sees (lineage; Gumbel noise keeps more)
        target_margin=0.005,  # the generator aims at p - target_margin, so that its wobble
                              # around the target stays within p (0 = aim at p)
    ))

    c.sap = ml_collections.ConfigDict(dict(
        e_start=40,  # first epoch of search + alignment; 0 <= e_start < num_epochs
        gamma=5e-4,  # weight of the partial group lasso (CIFAR < 1e-3, ImageNet ~5e-4)
        penalty="gradient",  # "gradient" (loss term) or "proximal" (soft-threshold after SGD)
        include_bn=True,  # also penalise BN scale/bias of dropped channels (lineage, ATO): without
                          # them the producing conv's slice is inert (BN is scale-invariant)
        agn_every=10,  # one AGN step every this many weight steps (lineage: 10-20)
        subset_fraction=0.1,  # fraction of the training split the AGN trains on (5-10%)
        selector="agn",  # who chooses v: "agn" (the generator, SAP) or "norm" (no generator: the
                         # largest-norm channels, a baseline)
        final_arch="last",  # which of the selector's architectures is cut: the "last" one, or the
                            # "best" by sub-network accuracy on the validation split
        # "partial": dropped channels only (SAP); "all": classic group lasso
        penalty_scope="partial",
        norm="group_l2",  # channel score of selector "norm" and of budget trimming: "group_l2"
                          # or "l1" (producing filters)
        widths=(),  # selector "norm": kept widths per group; () = meet the budget p instead
    ))

    c.agn = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,  # AdamW learning rate (lineage)
        weight_decay=1e-2,  # AdamW weight decay (lineage)
        b1=0.9,  # AdamW first-moment decay
        b2=0.9,  # AdamW second-moment decay; 0.9 (not Adam's 0.999) keeps a saturated generator
                 # moving: its small late gradients are not scaled down by early large ones
        batch_size=128,  # global batch of an AGN step (sub-dataset)
        tau=0.4,  # Gumbel-sigmoid temperature (supp. §A)
        offset=3.0,  # logit offset b, so pruning starts from the whole model (supp. §A)
        z_dim=32,  # width of the fixed AGN input z (supp. Table 2)
        hidden=64,  # GRU hidden width (supp. Table 2)
        deterministic_v=True,  # v after each AGN step: True = no Gumbel noise
    ))

    c.cut = ml_collections.ConfigDict(dict(
        bn_batches=20,  # training batches whose forward passes re-estimate BN statistics (no
                        # gradient step) of the extracted model before it is evaluated and
                        # fine-tuned; cut accuracy is reported raw and re-estimated. 0 = off
        bn_in_search=True,  # also re-estimate for the sub-network's accuracy each search epoch
    ))

    c.finetune = optimizer(0.1, (80, 120))  # fine-tuning: 0.1, x0.1 at 80 and 120 (supp. §A)
    c.finetune.num_epochs = 160  # epochs of fine-tuning the extracted model

    c.speed = ml_collections.ConfigDict(dict(
        enabled=True,  # at the end, time the extracted model's inference against the dense one
        batch_sizes=(1, 256),  # batch 1 = latency; the larger ones give throughput (images/s)
        reps=10,  # timed forward passes per model and batch size, after a warm-up; medians
    ))

    # Before the first training step: cut a trial pruned model, save and reload it, place its
    # state on the mesh, trace the pruned step there and compile the first dense step (which the
    # run then reuses), so that a model the cut, saving, the mesh or XLA cannot handle stops at
    # once (exit 2, naming the layer) instead of after training. It takes seconds; False skips it
    c.preflight = True
    # NaN/Inf loss or gradients: "stop" (keep last checkpoint) or "skip" the step
    c.on_nonfinite = "stop"
    # multi-host: how often hosts agree on a SIGTERM (1 host: every step)
    c.preemption_check_every_steps = 10
    c.log_every_steps = 50  # train-metric and progress logging interval
    c.checkpoint_every_epochs = 1  # periodic checkpoints (phase boundaries are always saved)
    c.keep_checkpoints = 2  # how many recent checkpoints orbax keeps
    c.plots = True  # write PNG plots into the workdir at the end
    # persistent XLA compilation cache: "workdir" = <workdir>/compile_cache (a resumed run loads
    # its programs instead of compiling), a directory to share between runs, or "" = JAX's own
    # (JAX_COMPILATION_CACHE_DIR)
    c.compile_cache = "workdir"
    # host memory of XLA:CPU's buffers: "retain" keeps freed memory in the process (glibc), so
    # programs with large activations do not page-fault them in afresh on every call (CPU
    # inference and latency tables: docs/benchmarks.md "Host memory"), but resident memory stays
    # at its peak and compiling is slower; "system" leaves malloc as it is. A process setting,
    # applied before JAX starts (by python -m sap_jax.main, or by train_and_evaluate if JAX has
    # not started yet); results.json's speed.host_memory says what took effect
    c.host_memory = "system"
    return c
