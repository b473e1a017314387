"""The run's progress record (sap_jax.train.state.Progress): what a checkpoint's meta holds."""

import json

from sap_jax.train import Progress

#: A checkpoint's meta (fine-tuning phase, after a preemption).
META = {
    "phase": "finetune", "epoch": 1, "step": 57, "agn_steps": 14, "ckpt": 6,
    "config_hash": "0123456789abcdef", "history": {"epoch": [1, 2], "test_acc": [0.5, 0.75]},
    "times": {"dense": 1.5, "search": 3.0, "cut": 0.5}, "dense_widths": [4, 8, 16],
    "skipped_steps": 0, "best_subnet_val_acc": 0.625, "best_subnet_epoch": 2,
    "dense_acc": 0.75, "arch_source": "generator",
    "arch_ratio_chosen": 0.49, "trimmed_channels": 0, "round_to": 1, "cut_acc": 0.5,
    "cut_acc_bn": 0.625, "subnet_acc_at_cut": 0.5, "alignment_ratio_at_cut": 0.02,
    "widths": [2, 4, 9], "step_in_epoch": 3,
    "partial": [{"loss": 0.5, "finite": 1.0}] * 3, "partial_agn": [], "saturated_epochs": 0,
    "lam_capped_steps": 3, "finetune_examples": 1437,
}


def test_a_checkpoint_meta_reads_back_and_writes_back_unchanged():
    p = Progress.from_json(json.loads(json.dumps(META)))
    assert p.phase == "finetune" and p.ckpt == 6 and p.widths == [2, 4, 9]
    assert p.to_json() == META
    assert Progress.from_json(p.to_json()) == p


def test_a_new_run_leaves_unset_fields_out_and_partial_epochs_are_consumed_once():
    p = Progress()
    d = p.to_json()
    assert d["phase"] == "search" and d["ckpt"] == 0
    assert "cut_acc" not in d and "best_subnet_val_acc" not in d  # the report reads them as absent
    p.step_in_epoch, p.partial = 2, [{"loss": 1.0, "finite": 1.0}] * 2
    assert p.pop_partial() == (2, [{"loss": 1.0, "finite": 1.0}] * 2, [])
    assert p.pop_partial() == (0, [], [])
    p.log(epoch=1, test_acc=0.5)
    p.log(epoch=2, test_acc=0.75)
    assert p.history == {"epoch": [1, 2], "test_acc": [0.5, 0.75]}
    p.add_time("dense", 1.0)
    p.add_time("dense", 0.5)
    assert p.times == {"dense": 1.5}


def test_the_typed_state_is_saved_under_the_checkpoint_keys(tmp_path):
    """The run's arrays are typed records; a checkpoint still holds the dict of pytrees with
    the keys of state.py (SEARCH_KEYS / FINETUNE_KEYS), and restores into the same type."""
    import jax
    import numpy as np

    from sap_jax.runtime import parallel
    from sap_jax.train import checkpoints
    from sap_jax.train import state as state_lib

    arrays = {k: np.full(2, i, np.float32) for i, k in enumerate(state_lib.SEARCH_KEYS)}
    s = state_lib.SearchState.from_dict(arrays)
    assert set(s.to_dict()) == set(state_lib.SEARCH_KEYS)
    assert set(state_lib.Weights.from_dict(arrays).to_dict()) == set(state_lib.FINETUNE_KEYS)
    moved = s.replace(arch=s.prev_arch)  # steps and hooks rebind; nothing is mutated
    assert moved.arch is s.prev_arch and s.arch is arrays["arch"]
    assert jax.tree.leaves(s)  # a pytree: jax.tree.map and replication reach every array

    ckpts = checkpoints.Checkpoints(parallel.path(tmp_path), keep=1, config_hash="h")
    ckpts.save(s, {"phase": "search", "epoch": 1, "step": 3})
    mesh = parallel.make_mesh()
    as_dict = ckpts.restore(arrays, mesh)  # the layout on disk: the plain dict of pytrees
    assert set(as_dict) == set(state_lib.SEARCH_KEYS)
    back = ckpts.restore(s, mesh)
    assert isinstance(back, state_lib.SearchState)
    for k, v in arrays.items():
        np.testing.assert_array_equal(np.asarray(getattr(back, k)), v)
        np.testing.assert_array_equal(np.asarray(as_dict[k]), v)
    ckpts.manager.close()
