"""A run whose budget bounds estimated latency (budget.metric = "latency"), end to end."""

import json

import pytest
from conftest import tiny_config

from sap_jax import models, train
from sap_jax.method import cut, latency
from sap_jax.runtime.errors import ConfigError
from sap_jax.train import checkpoints, tables
from sap_jax.train import config as config_lib
from sap_jax.train import spec as spec_lib

LATENCY = {"budget.metric": "latency", "budget.latency_points": 3, "budget.latency_reps": 2,
           "budget.round_to": 0}


@pytest.mark.slow
def test_a_latency_budgeted_run_meets_p_under_its_table(tmp_path):
    c = tiny_config(**LATENCY, **{"speed.enabled": True, "speed.batch_sizes": (1,),
                                  "speed.reps": 2})
    spec = spec_lib.from_config(c)
    dense = models.create_abstract("resnet_cifar_tiny", num_classes=10).structure(16)
    # The table the run builds at its start (the same call), measured first so that p can be
    # set within reach: a tiny model's time is mostly fixed costs, so even one channel per
    # group keeps much of it.
    built = []
    table = tables.for_run(spec, tmp_path, lambda: built.append(1) or models.create(
        "resnet_cifar_tiny", num_classes=10))
    assert built == [1] and (tmp_path / tables.TABLE_FILE).exists()
    table.check_matches(dense)
    assert table.batch == c.batch_size and table.device["platform"] == "cpu"
    floor = table.ratio(dense, [1] * dense.num_groups, "total")
    assert floor < 1
    c.budget.p = round(float(floor + 0.6 * (1 - floor)), 4)
    before = (tmp_path / tables.TABLE_FILE).read_bytes()
    r = train.train_and_evaluate(c, str(tmp_path))
    # The run read the table kept in its workdir instead of measuring a new one.
    assert (tmp_path / tables.TABLE_FILE).read_bytes() == before
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budget_metric"] == "latency" and saved["round_to"] == 0
    assert saved["budget_scope"] == "total"  # the config's scope is "prunable"
    assert saved["latency_table"]["created"] == table.created
    # The cut meets p under the same estimate, with widths where the table's time steps up.
    estimated = table.ratio(dense, saved["widths"], "total")
    assert estimated <= c.budget.p
    assert saved["latency_ratio_estimated"] == pytest.approx(estimated)
    assert saved["budget_ratio"] == pytest.approx(estimated) and saved["budget_met"] is True
    assert (saved["latency_table"]["points"], saved["latency_table"]["reps"]) == (
        table.points, table.reps)
    steps = cut.table_steps(dense, table, "cpu")
    assert all(w in s for w, s in zip(saved["widths"], steps)), (saved["widths"], steps)
    # ... and is measured at the table's batch, next to the estimate.
    assert [b["batch"] for b in saved["speed"]["batches"]] == [1, c.batch_size]
    row = saved["speed"]["batches"][1]
    assert saved["latency_ratio_measured"] == pytest.approx(1 / row["speedup"])
    text = (tmp_path / "summary.txt").read_text()
    assert "of total estimated latency" in text and "forward time, pruned over dense" in text
    assert r["widths"] == saved["widths"]


def test_a_latency_budget_bounds_the_whole_forward_whatever_the_scope():
    """Layers timed alone do not add up to the model's time, so budget.scope "prunable" (the
    default, the paper's MAC scope) would bound a sum that is not the model's latency."""
    macs = spec_lib.from_config(tiny_config(**{"budget.scope": "prunable"})).budget
    lat = spec_lib.from_config(tiny_config(**LATENCY, **{"budget.scope": "prunable"})).budget
    assert (macs.scope, lat.scope) == ("prunable", "total")
    assert spec_lib.resource_loss(lat).scope == "total"
    assert spec_lib.cut_policy(lat, backend="cpu").scope == "total"
    with pytest.raises(ConfigError, match="budget scope = 'layers'"):
        config_lib.validate(tiny_config(**LATENCY, **{"budget.scope": "layers"}))
    # ... so a resumed latency run may change budget.scope (it changes nothing); a MAC run not.
    hashes = {(metric, scope): checkpoints.config_hash(tiny_config(**{
        "budget.metric": metric, "budget.scope": scope})) for metric in ("macs", "latency")
        for scope in ("prunable", "total")}
    assert hashes["latency", "prunable"] == hashes["latency", "total"]
    assert hashes["macs", "prunable"] != hashes["macs", "total"]


def test_latency_budget_fields_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="budget.metric = 'flops'"):
        config_lib.validate(tiny_config(**{"budget.metric": "flops"}))
    with pytest.raises(ConfigError, match="budget.latency_points = 1"):
        config_lib.validate(tiny_config(**{"budget.latency_points": 1}))
    # A table under a MAC budget would be ignored: said, not silently dropped.
    with pytest.raises(ConfigError, match="budget.latency_table = .* is read only with "
                                          "budget.metric = \"latency\""):
        config_lib.validate(tiny_config(**{"budget.latency_table": str(tmp_path / "t.json")}))
    # A bad round_to is reported once, not again by the cut's own check.
    with pytest.raises(ConfigError) as e:
        config_lib.validate(tiny_config(**{"budget.round_to": -3}))
    assert str(e.value).count("round_to") == 1, str(e.value)
    missing = str(tmp_path / "none.json")
    with pytest.raises(ConfigError, match="budget.latency_table: latency table .* does not exist"):
        config_lib.validate(tiny_config(**LATENCY, **{"budget.latency_table": missing}))


def test_a_table_of_another_model_is_refused_before_the_run(tmp_path):
    """A table built for other widths fails validation, before anything trains."""
    other = models.create("resnet_cifar_tiny", num_classes=10, widths=[2, 4, 8])
    table = latency.build_table(other, 16, 1, points=2, reps=1, train=False, check=False)
    table.save(tmp_path / "t.json")
    with pytest.raises(ConfigError, match="does not match this model"):
        config_lib.validate(tiny_config(**LATENCY, **{"budget.latency_table":
                                                      str(tmp_path / "t.json")}))
