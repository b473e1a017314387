"""The cut's arithmetic (sap_jax.method.cut): trimming to the budget, rounding widths, resizing."""

import numpy as np
import pytest

from sap_jax import models
from sap_jax.method import baselines, cut
from sap_jax.structure import flops
from sap_jax.structure import norms as norms_lib


def test_rounded_widths_are_multiples_within_the_budget():
    s = models.create_abstract("resnet50").structure(224)
    uniform = baselines.uniform_widths(s, 0.37)
    rounded = cut.round_widths(s, uniform, 8, 0.37)
    assert all(w % 8 == 0 or w == c for w, c in zip(rounded, s.widths))
    full = flops.count(s)
    assert flops.count(s, rounded).prunable_macs / full.prunable_macs <= 0.37
    assert flops.count(s, uniform).prunable_macs / full.prunable_macs <= 0.37


def test_filled_uniform_widths_reach_the_budget_and_stay_as_uniform_as_they_can():
    """Rounded down per group, one keep fraction lands well under p on a small model; filled
    channel by channel it reaches p (no further channel fits) and no two groups' kept
    fractions differ by more than one channel's worth."""
    s = models.create_abstract("resnet20").structure(16)
    for p in (0.5, 0.3, 0.2):
        plain, filled = baselines.uniform_widths(s, p), baselines.uniform_widths(s, p, fill=True)
        assert cut.widths_ratio(s, plain) <= cut.widths_ratio(s, filled) <= p
        assert all(f >= w for f, w in zip(filled, plain))
        for k in range(len(filled)):  # nothing more fits
            more = [w + (i == k) for i, w in enumerate(filled)]
            assert filled[k] == s.widths[k] or cut.widths_ratio(s, more) > p
        frac = [w / c for w, c in zip(filled, s.widths)]
        assert max(frac) - min(frac) <= 1 / min(s.widths) + 1e-9
    assert cut.widths_ratio(s, baselines.uniform_widths(s, 0.3)) < 0.28  # what fill is for
    assert cut.widths_ratio(s, baselines.uniform_widths(s, 0.3, fill=True)) > 0.29


def test_random_widths_meet_the_budget_and_differ_by_seed():
    s = models.create_abstract("resnet20").structure(16)
    draws = [baselines.random_widths(s, 0.3, seed) for seed in range(3)]
    assert len({tuple(w) for w in draws}) == 3
    for w in draws:
        assert 0.29 <= cut.widths_ratio(s, w) <= 0.3
        assert all(1 <= x <= c for x, c in zip(w, s.widths))
        for k in range(len(w)):  # filled: no group takes one more channel within p
            assert w[k] == s.widths[k] or cut.widths_ratio(
                s, [x + (i == k) for i, x in enumerate(w)]) > 0.3
    assert baselines.random_widths(s, 0.3, 1) == draws[1]  # seeded


def test_auto_rounding_uses_the_backends_multiple_or_the_largest_half_that_meets_p():
    s = models.create_abstract("resnet56").structure(32)
    full, p = flops.count(s), 0.48
    ratio = lambda w: flops.count(s, w).prunable_macs / full.prunable_macs  # noqa: E731
    uniform = baselines.uniform_widths(s, p)
    # GPU: multiples of 8, which ResNet-56 (16-64 channels) can meet; the CPU's multiple is 8 too.
    m, gpu = cut.auto_round_widths(s, uniform, p, "gpu")
    assert m == 8 and ratio(gpu) <= p and all(w % 8 == 0 or w == c for w, c in zip(gpu, s.widths))
    assert gpu != uniform and cut.auto_round_widths(s, uniform, p, "cpu") == (8, gpu)
    # A backend with no known multiple: widths unchanged.
    assert cut.auto_round_widths(s, uniform, p, "metal") == (1, uniform)
    # TPU: 128 leaves every group whole, and so do 64, 32; 16 keeps the 16-wide first stage
    # whole (over p), so the multiple falls to 8, the same widths as the GPU's.
    for too_coarse in (128, 64, 32, 16):
        assert ratio(cut.round_widths(s, uniform, too_coarse, p, warn=False)) > p
    assert cut.auto_round_widths(s, uniform, p, "tpu") == (8, gpu)


def test_auto_rounding_prefers_a_finer_multiple_to_cutting_deeper():
    """ResNet-20 at p = 0.3: its 16-wide groups keep 4 of 16. Rounding those up to 8 fits p only
    if the 64-wide stage falls from 19 to 8; a multiple of 4 fits p by rounding alone, each
    width on one of the two multiples around it."""
    s = models.create_abstract("resnet20").structure(16)
    p = 0.3
    uniform = baselines.uniform_widths(s, p)
    assert uniform == [4, 4, 4, 9, 9, 9, 19, 19, 19]
    deep = cut.round_widths(s, uniform, 8, p, warn=False)
    assert deep == [8] * 9 and cut.widths_ratio(s, deep) <= p  # 19 -> 8: a second pruning
    assert cut.widths_ratio(s, cut.round_widths(s, uniform, 8, p, deeper=False, warn=False)) > p
    m, w = cut.auto_round_widths(s, uniform, p, "cpu")
    assert m == 4 and cut.widths_ratio(s, w) <= p
    assert all(u // 4 * 4 <= x <= -(-u // 4) * 4 for u, x in zip(uniform, w)), w


def test_rounding_goes_deeper_only_when_the_neighbouring_multiples_cannot_meet_p():
    """A start under a group's smallest multiple (3 of 16 at multiple 8) rounds up to 8; if the
    groups around their own multiples cannot pay for that, rounding cuts deeper to meet p (or,
    with deeper=False, stays over p). A full group whose size is not a multiple stays whole."""
    s = models.create_abstract("resnet20", widths=[16, 16, 16, 32, 32, 32, 60, 60, 60]
                               ).structure(16)
    start = [3, 3, 3, 8, 8, 8, 60, 60, 60]
    p = cut.widths_ratio(s, start)
    shallow = cut.round_widths(s, start, 8, p, deeper=False, warn=False)
    # The full 60-wide groups stay whole while rounding: 60 is their own width.
    assert shallow == [8] * 6 + [60] * 3 and cut.widths_ratio(s, shallow) > p
    deep = cut.round_widths(s, start, 8, p, warn=False)
    assert cut.widths_ratio(s, deep) <= p and deep[:6] == [8] * 6
    # The deeper cut: below their start, to multiples of 8.
    assert min(deep[6:]) < 60 and all(w % 8 == 0 or w == 60 for w in deep[6:]), deep


def test_resize_arch_keeps_decisions_and_uses_norms_to_change_counts():
    norms = [np.array([5.0, 1.0, 3.0, 2.0]), np.array([1.0, 2.0, 3.0])]
    arch = [np.array([1, 1, 0, 0], np.float32), np.array([0, 1, 0], np.float32)]
    out = cut.resize_arch(arch, [1, 3], norms)
    np.testing.assert_array_equal(out[0], [1, 0, 0, 0])  # drop the weaker kept channel
    np.testing.assert_array_equal(out[1], [1, 1, 1])     # add the dropped ones, strongest first


def test_trimming_an_over_budget_architecture_drops_its_lowest_norm_kept_channels():
    from flax import nnx

    model = models.create("resnet20", seed=1)
    s = model.structure(32)
    norms = norms_lib.channel_norms(nnx.state(model, nnx.Param), s, "group_l2")
    rng = np.random.default_rng(0)
    start = [(rng.random(w) < 0.85).astype(np.float32) for w in s.widths]
    for v in start:
        v[0] = 1.0
    assert cut.widths_ratio(s, [int(v.sum()) for v in start]) > 0.5
    out = baselines.arch_by_norm(norms, s, p=0.5, start=start)
    assert float(flops.mac_ratio(s, out)) <= 0.5
    assert all(np.all(o <= st) for o, st in zip(out, start))  # only removes channels
    removed = [(n[(st == 1) & (o == 0)], k) for k, (n, st, o) in enumerate(zip(norms, start, out))]
    top = max((x.max(), k) for x, k in removed if x.size)
    survivors = np.concatenate([n[o == 1] for n, o in zip(norms, out) if o.sum() > 1])
    assert top[0] <= survivors.min()  # lowest norms first
    # ... and no more than needed: putting back the last one removed breaks the budget.
    back = [o.copy() for o in out]
    k = top[1]
    back[k][np.flatnonzero((norms[k] == top[0]) & (start[k] == 1))[0]] = 1.0
    assert float(flops.mac_ratio(s, back)) > 0.5
    # An architecture already within the budget comes back unchanged.
    same = baselines.arch_by_norm(norms, s, p=0.5, start=out)
    assert all(np.array_equal(a, b) for a, b in zip(same, out))


def test_final_arch_keeps_an_architecture_within_p_and_trims_one_over_it():
    s = models.create_abstract("resnet20").structure(32)
    rng = np.random.default_rng(1)
    norms = [rng.random(w) for w in s.widths]
    calls = []

    def scores():
        calls.append(1)
        return norms

    within = baselines.arch_by_norm(norms, s, p=0.45)
    out, rep = cut.final_arch(s, within, scores, cut.CutPolicy(p=0.5))
    assert calls == [] and rep.trimmed_channels == 0 and rep.round_to == 1
    assert all(np.array_equal(o, w) for o, w in zip(out, within))
    assert rep.chosen_ratio == pytest.approx(float(flops.mac_ratio(s, within)))
    over = [np.ones(w, np.float32) for w in s.widths]
    out, rep = cut.final_arch(s, over, scores, cut.CutPolicy(p=0.5))
    assert len(calls) == 1 and rep.chosen_ratio == 1.0
    assert float(flops.mac_ratio(s, out)) <= 0.5
    assert rep.trimmed_channels == sum(s.widths) - sum(int(v.sum()) for v in out) > 0
    assert rep.widths == [int(v.sum()) for v in out]
    # Not enforced: the over-budget architecture is cut as chosen.
    out, rep = cut.final_arch(s, over, scores, cut.CutPolicy(p=0.5, enforce_budget=False))
    assert rep.trimmed_channels == 0 and rep.widths == list(s.widths)
    # Rounded: multiples of 4 (or the whole group), still within p.
    out, rep = cut.final_arch(s, within, scores, cut.CutPolicy(p=0.5, round_to=4))
    assert rep.round_to == 4 and float(flops.mac_ratio(s, out)) <= 0.5
    assert all(w % 4 == 0 or w == c for w, c in zip(rep.widths, s.widths))
