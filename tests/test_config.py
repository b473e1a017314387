"""Run configs: validation (every error at once, before anything compiles), the workdir's config
guard, and the renamed fields of 0.1.0 (config files, command line, old workdirs)."""

import importlib
import hashlib
import json
import os
import sys
import warnings

import numpy as np
import pytest

from conftest import tiny_config
from sap_jax.train import config as config_lib
from sap_jax import train
from sap_jax.train import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


tiny = tiny_config  # configs/test_tiny.py with dotted overrides

def test_config_validation_lists_every_error():
    c = tiny(**{"budget.p": 1.5, "sap.e_start": 3, "model": "resnet57", "dataset": "mnist",
                "batch_size": 15, "agn.tau": 0.0, "budget.form": "hinge",
                "speed.batch_sizes": (1, 0), "speed.reps": 0})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, device_count=2, process_count=1)
    msg = str(e.value)
    for part in ("budget: budget p = 1.5", "sap.e_start = 3", "num_epochs = 3",
                 "unknown model 'resnet57'", "dataset = 'mnist'", "batch_size = 15 does not divide by the 2 devices",
                 "agn.tau = 0.0", "'hinge'", "speed.batch_sizes = (1, 0)", "speed.reps = 0"):
        assert part in msg, part
    with pytest.raises(config_lib.ConfigError, match="image_size"):
        config_lib.validate(tiny(image_size=18))
    config_lib.validate(tiny())  # the tiny config itself is valid


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f != "__init__.py"))
def test_every_shipped_config_is_valid(name):
    config_lib.validate(importlib.import_module(f"configs.{name}").get_config(),
                        device_count=1, process_count=1)


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
    with pytest.raises(config_lib.ConfigError, match=r"budget.target_margin = 0.6 must lie in \[0, p\)"):
        config_lib.validate(tiny(**{"budget.target_margin": 0.6}))
    with pytest.raises(config_lib.ConfigError, match="sap.selector = 'random'"):
        config_lib.validate(tiny(**{"sap.selector": "random"}))
    with pytest.raises(config_lib.ConfigError, match="sap.widths is only used with sap.selector = 'norm'"):
        config_lib.validate(tiny(**{"sap.widths": (4, 4, 4)}))


def _old_names(c):
    """``c`` as a config file of 0.1.0 would write it: the budget's fields in sap and agn."""
    b = c.budget
    with c.unlocked():
        c.sap.p, c.sap.enforce_budget, c.sap.round_to = b.p, b.enforce, b.round_to
        c.agn.lam, c.agn.lam_rate, c.agn.budget_scope = b.lam, b.lam_rate, b.scope
        c.agn.lam_max_scale, c.agn.budget_on, c.agn.resource_form = b.lam_max_scale, b.measure, b.form
        c.agn.resource_eps, c.agn.target_margin = b.eps, b.target_margin
        del c["budget"]
        del c.sap["selector"]
    return c


def test_a_config_file_with_the_old_field_names_still_works_with_a_deprecation_warning():
    old = _old_names(tiny())
    with old.unlocked():
        old.sap.p, old.agn.lam, old.sap.final_arch = 0.4, 6.0, "norm"
    with pytest.warns(FutureWarning, match="config field sap.p is now budget.p"):
        config_lib.validate(old)
    assert old.budget.p == 0.4 and old.budget.lam == 6.0 and "p" not in old.sap
    assert old.sap.selector == "norm" and old.sap.final_arch == "last"
    # Apart from the values set above, the upgraded config is the current one, field for field.
    new = tiny(**{"budget.p": 0.4, "budget.lam": 6.0, "sap.selector": "norm"})
    assert config_lib.to_json_dict(old) == config_lib.to_json_dict(new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_lib.validate(new)  # a current config: no message


def test_old_command_line_overrides_are_renamed():
    assert config_lib.upgrade_override("--config.agn.lam=6") == (
        ["--config.budget.lam=6"], "--config.agn.lam is now --config.budget.lam")
    assert config_lib.upgrade_override("--config.sap.final_arch=norm")[0] == [
        "--config.sap.selector=norm", "--config.sap.final_arch=last"]  # what "norm" meant
    assert config_lib.upgrade_override("--config.sap.final_arch=best") == (
        ["--config.sap.final_arch=best"], None)
    assert config_lib.upgrade_override("--workdir=/tmp/x") == (["--workdir=/tmp/x"], None)


def test_a_new_name_set_on_the_command_line_wins_over_the_old_name_in_the_file():
    c = tiny(**{"budget.p": 0.4})  # --config.budget.p=0.4 on the command line
    with c.unlocked():
        c.sap.p = 0.3  # and the old name in the config file
    notes = config_lib.upgrade(c, keep={"budget.p"})
    assert c.budget.p == 0.4 and "p" not in c.sap
    assert any("the command line's budget.p wins" in n for n in notes)
    c = tiny()
    with c.unlocked():
        c.sap.p = 0.3
    config_lib.upgrade(c)  # nothing on the command line: the file's value moves over
    assert c.budget.p == 0.3



def _sha(fields) -> str:
    """The checkpoint config hash, computed independently of sap_jax.train.checkpoints."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def test_a_workdir_from_before_the_model_fields_resumes(tmp_path):
    """A config.json without model_kwargs/model_prune/model_ignore means their defaults, and
    its checkpoints' hash (computed without them) is accepted."""
    c = tiny()
    before = config_lib.to_json_dict(tiny())
    for name in config_lib.NEW_FIELDS:
        del before[name]
    (tmp_path / "config.json").write_text(json.dumps(before))
    accepted = checkpoints.check_workdir_config(tmp_path, c)
    assert _sha(config_lib.result_fields(before)) in accepted
    ckpts = checkpoints.Checkpoints(tmp_path, keep=1, config_hash=_sha(config_lib.result_fields(before)))
    ckpts.save({"x": np.zeros(3, np.float32)}, {"phase": "search", "epoch": 2, "step": 0})
    ckpts.manager.close()
    assert train.latest_progress(str(tmp_path), c)["epoch"] == 2


def test_a_workdir_written_under_the_old_field_names_resumes(tmp_path):
    """Its config.json has the 0.1.0 layout and its checkpoints carry that layout's hash."""
    c = tiny()
    legacy = config_lib.to_json_dict(_old_names(tiny()))
    for name in config_lib.NEW_FIELDS:  # 0.1.0 had none of the fields added since
        del legacy[name]
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    accepted = checkpoints.check_workdir_config(tmp_path, c)  # the same config: accepted
    old_hash = _sha(config_lib.result_fields(legacy, config_lib.NOT_RESULT_FIELDS_0_1))
    assert old_hash in accepted  # and the hash 0.1.0 gave it
    ckpts = checkpoints.Checkpoints(tmp_path, keep=1, config_hash=old_hash)  # as 0.1.0 wrote it
    ckpts.save({"x": np.zeros(3, np.float32)}, {"phase": "search", "epoch": 1, "step": 0})
    ckpts.manager.close()
    assert train.latest_progress(str(tmp_path), c)["epoch"] == 1
    # A different value under an old name is still a different config.
    legacy["sap"]["p"] = 0.3
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(config_lib.ConfigError, match=r"fields budget.p differ"):
        checkpoints.check_workdir_config(tmp_path, c)


def test_fields_that_cannot_change_results_may_change_and_any_may_before_the_first_checkpoint(tmp_path):
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
                    "speed.enabled": True, "checkpoint_every_epochs": 2})
    assert checkpoints.config_hash(moved) == checkpoints.config_hash(c)
    assert checkpoints.config_hash(c) in checkpoints.check_workdir_config(tmp_path, moved)
    with pytest.raises(config_lib.ConfigError, match="fields sap.gamma differ"):
        checkpoints.check_workdir_config(tmp_path, other)
