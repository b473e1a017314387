"""Run configs: validation (every error at once, before anything compiles), the workdir's config
guard, and workdirs of other releases."""

import hashlib
import importlib
import json
import os
import re
import sys

import numpy as np
import pytest
from conftest import tiny_config

import sap_jax
from sap_jax import train
from sap_jax.train import checkpoints, spec
from sap_jax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


tiny = tiny_config  # tests/support/tiny_config.py with dotted overrides

def test_config_validation_lists_every_error():
    c = tiny(**{"budget.p": 1.5, "sap.e_start": 3, "model": "resnet57", "dataset": "mnist",
                "batch_size": 15, "agn.tau": 0.0, "budget.form": "hinge",
                "speed.batch_sizes": (1, 0), "speed.reps": 0, "host_memory": "keep"})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, device_count=2, process_count=1)
    msg = str(e.value)
    for part in ("budget: budget p = 1.5", "sap.e_start = 3", "num_epochs = 3",
                 "unknown model 'resnet57'", "dataset = 'mnist'",
                 "batch_size = 15 does not divide by the 2 devices",
                 "agn.tau = 0.0", "'hinge'", "speed.batch_sizes = (1, 0)", "speed.reps = 0",
                 "host_memory = 'keep' must be one of 'retain', 'system'"):
        assert part in msg, part
    with pytest.raises(config_lib.ConfigError, match="image_size"):
        config_lib.validate(tiny(image_size=18))
    config_lib.validate(tiny())  # the tiny config itself is valid


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and f != "__init__.py"))
def test_every_shipped_config_is_valid(name):
    config_lib.validate(importlib.import_module(f"configs.{name}").get_config(),
                        device_count=1, process_count=1)


@pytest.mark.parametrize("name", ["default", "cifar10_resnet56", "imagenet_r50",
                                  "imagenet_r34", "cifar10_mobilenetv2"])
def test_paper_configs_hold_out_no_validation_split_and_best_asks_for_one(name):
    """As the paper: every training image trains the model (final_arch = "last" chooses
    nothing on a validation split); choosing the best architecture needs one."""
    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.val_size == 0 and c.sap.final_arch == "last"
    c.sap.final_arch = "best"
    with pytest.raises(config_lib.ConfigError, match="set val_size > 0 .*paper configs hold none"):
        config_lib.validate(c, device_count=1, process_count=1)
    c.val_size = 5000
    config_lib.validate(c, device_count=1, process_count=1)


def test_config_validation_checks_sizes_against_the_dataset():
    with pytest.raises(config_lib.ConfigError, match="val_size = 1430 leaves 7 of digits.s 1437"):
        config_lib.validate(tiny(val_size=1430))
    with pytest.raises(config_lib.ConfigError, match="mnist5k images are 28 px"):
        config_lib.validate(tiny(dataset="mnist5k", image_size=16))
    config_lib.validate(tiny(dataset="mnist5k", image_size=28))


def test_workdir_with_a_different_config_is_refused(tmp_path):
    """Once a run has saved a checkpoint, a result-affecting field may not change unasked."""
    started = tiny(**{"budget.p": 0.3})
    checkpoints.check_workdir_config(tmp_path, started)
    ckpts = checkpoints.Checkpoints(tmp_path, keep=1, config_hash=checkpoints.config_hash(started))
    ckpts.save({"x": np.zeros(3, np.float32)}, {"phase": "search", "epoch": 1, "step": 0})
    ckpts.manager.close()
    with pytest.raises(config_lib.ConfigError, match=r"different config \(fields budget.p differ\)"
                                                     r".*--allow_config_change"):
        train.train_and_evaluate(tiny(), str(tmp_path))


def test_every_budget_error_is_listed_through_the_constructors_the_run_uses():
    c = tiny(**{"budget.scope": "layers", "budget.round_to": -1, "budget.measure": "noisy",
                "budget.lam_max_scale": 0.5})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    msg = str(e.value)
    for part in ("budget.round_to = -1", "budget.measure = 'noisy'", "budget.lam_max_scale = 0.5",
                 "budget: budget scope = 'layers'"):
        assert part in msg, part
    with pytest.raises(config_lib.ConfigError,
                       match=r"budget.target_margin = 0.6 must lie in \[0, p\)"):
        config_lib.validate(tiny(**{"budget.target_margin": 0.6}))
    with pytest.raises(config_lib.ConfigError, match="sap.selector = 'random'"):
        config_lib.validate(tiny(**{"sap.selector": "random"}))
    with pytest.raises(config_lib.ConfigError,
                       match="sap.widths is only used with sap.selector = 'norm'"):
        config_lib.validate(tiny(**{"sap.widths": (4, 4, 4)}))


def test_a_field_the_spec_does_not_know_is_refused_with_close_matches():
    """A config still setting a 0.1 name (sap.p, now budget.p) is refused, naming the field the
    user meant, with every other error of the config."""
    c = tiny(**{"sap.gamma": -1.0})
    c.sap.p = 0.3
    c.budget.lamda = 2.0
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    msg = str(e.value)
    assert re.search(r"sap\.p is not a field .*did you mean budget\.p", msg), msg
    assert re.search(r"budget\.lamda is not a field .*budget\.lam\b", msg), msg
    assert "sap.gamma = -1.0" in msg  # the values are checked too: every error at once
    with pytest.raises(config_lib.ConfigError, match=r"sap\.p .*budget\.p"):
        spec.from_config(c)  # the one reader refuses it as well


def test_the_spec_reads_every_field_once_under_typed_names():
    c = tiny(**{"budget.p": 0.4, "budget.target_margin": 0.01, "optim.boundaries": [2]})
    run = spec.from_config(c)
    assert (run.budget.p, run.budget.generator_target) == (0.4, 0.4 - 0.01)
    assert (run.optim.num_epochs, run.finetune.num_epochs) == (c.num_epochs, c.finetune.num_epochs)
    assert run.optim.boundaries == (2,) and run.model.name == c.model
    assert run.data.batch_size == c.batch_size and run.sap.e_start == c.sap.e_start
    with pytest.raises(AttributeError):
        run.budget.p = 0.5  # frozen: read once, never changed
    del c.cut["bn_in_search"]
    with pytest.raises(config_lib.ConfigError, match="cut.bn_in_search is missing"):
        config_lib.validate(c)


def _sha(fields) -> str:
    """The checkpoint config hash, computed independently of sap_jax.train.checkpoints."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def test_a_workdir_resumes_with_the_hash_its_checkpoints_carry(tmp_path):
    """config.json and the version file written on the first start; a checkpoint saved under
    that config's hash (computed here independently) is found on the next."""
    c = tiny()
    accepted = checkpoints.check_workdir_config(tmp_path, c)
    assert _sha(config_lib.result_fields(config_lib.to_json_dict(c))) in accepted
    assert json.loads((tmp_path / checkpoints.VERSION_FILE).read_text()) == {
        "sap_jax": sap_jax.__version__}
    ckpts = checkpoints.Checkpoints(tmp_path, keep=1, config_hash=_sha(
        config_lib.result_fields(config_lib.to_json_dict(c))))
    ckpts.save({"x": np.zeros(3, np.float32)}, {"phase": "search", "epoch": 2, "step": 0})
    ckpts.manager.close()
    assert train.latest_progress(str(tmp_path), c)["epoch"] == 2


def test_a_workdir_of_another_release_is_refused_naming_that_release(tmp_path):
    c = tiny()
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_json_dict(c)))
    # 0.1 wrote no version file.
    with pytest.raises(config_lib.ConfigError, match=r"written by sap_jax 0\.1; this is sap_jax "
                       + re.escape(sap_jax.__version__)):
        checkpoints.check_workdir_config(tmp_path, c)
    with pytest.raises(config_lib.ConfigError, match=r"written by sap_jax 0\.1"):
        train.latest_progress(str(tmp_path), c)
    (tmp_path / checkpoints.VERSION_FILE).write_text(json.dumps({"sap_jax": "0.3.1"}))
    with pytest.raises(config_lib.ConfigError, match=r"sap_jax 0\.3\.1.*sap_jax==0\.3\.\*"):
        checkpoints.check_workdir_config(tmp_path, c)
    major, minor, *_ = sap_jax.__version__.split(".")
    (tmp_path / checkpoints.VERSION_FILE).write_text(json.dumps({"sap_jax": f"{major}.{minor}.9"}))
    checkpoints.check_workdir_config(tmp_path, c)  # a patch release of this one: accepted


def test_fields_that_cannot_change_results_may_change_and_any_may_before_the_first_checkpoint(
        tmp_path):
    c = tiny()
    (tmp_path / "fresh").mkdir()
    checkpoints.check_workdir_config(tmp_path / "fresh", c)
    # Nothing saved yet: even a result-affecting change simply replaces the config.
    other = tiny(**{"sap.gamma": 0.5})
    checkpoints.check_workdir_config(tmp_path / "fresh", other)
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["sap"]["gamma"] == 0.5
    assert checkpoints.config_changes(tmp_path / "fresh") == []
    # After a checkpoint: where data and caches live, logging, plots, speed and checkpoint
    # cadence may change (they are not the results); a result-affecting field may not.
    checkpoints.check_workdir_config(tmp_path, c)
    ckpts = checkpoints.Checkpoints(tmp_path, keep=1, config_hash=checkpoints.config_hash(c))
    ckpts.save({"x": np.zeros(3, np.float32)}, {"phase": "search", "epoch": 1, "step": 0})
    ckpts.manager.close()
    moved = tiny(**{"data_dir": "/elsewhere", "log_every_steps": 7, "plots": True,
                    "speed.enabled": True, "checkpoint_every_epochs": 2,
                    "host_memory": "retain"})
    assert checkpoints.config_hash(moved) == checkpoints.config_hash(c)
    assert checkpoints.config_hash(c) in checkpoints.check_workdir_config(tmp_path, moved)
    with pytest.raises(config_lib.ConfigError, match="fields sap.gamma differ"):
        checkpoints.check_workdir_config(tmp_path, other)
