"""The AOQ loss family against a direct, loop-by-loop transcription of SPEC §4."""
import math
import random

import pytest
import torch

from pipeline.errors import InputError
from pipeline.losses.aoq import AOQSettings, aoq_loss
from pipeline.losses.registry import loss_names


def transcription(S, s_it, s_ti, s_nn, s_pp, variant, *, g=0.2, g_off=0.0, alpha=0.3, beta=1.5,
                  accidental=None, not_neg=None):
    """The formula with Python floats, one anchor at a time."""
    B = len(S)
    hinge = lambda x: max(0.0, x)  # noqa: E731
    total = 0.0
    for b in range(B):
        negs_c = [j for j in range(B) if j != b and not (not_neg and not_neg[b][j])]
        negs_i = [j for j in range(B) if j != b and not (not_neg and not_neg[j][b])]
        pos = S[b][b]
        on_i2t = max(S[b][j] for j in negs_c)
        on_t2i = max(S[j][b] for j in negs_i)
        h_c = hinge(g + on_i2t - pos)
        h_i = hinge(g + on_t2i - pos)
        w_c = beta - (s_it[b] - on_i2t) / alpha if variant == "aoq" else 1.0
        w_i = beta - (s_ti[b] - on_t2i) / alpha if variant == "aoq" else 1.0
        total += w_c * h_c + w_i * h_i
        if variant in ("offtri", "offquin", "aoq"):
            total += hinge(g_off + s_it[b] - pos) + hinge(g_off + s_ti[b] - pos)
        if variant in ("offquin", "aoq") and not (accidental and accidental[b]):
            total += hinge(g_off + s_nn[b] - pos) + hinge(g_off + s_pp[b] - pos)
    return total


def _inputs(B, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(B, B, generator=g, dtype=torch.float64) * 1.6 - 0.6
    vecs = [torch.rand(B, generator=g, dtype=torch.float64) * 1.6 - 0.6 for _ in range(4)]
    return S, vecs


@pytest.mark.parametrize("variant", loss_names())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_transcription(variant, seed):
    B = 7
    S, (s_it, s_ti, s_nn, s_pp) = _inputs(B, seed)
    acc = torch.tensor([random.Random(seed).random() < 0.3 for _ in range(B)])
    got, logs = aoq_loss(S, s_it, s_ti, s_nn, s_pp, AOQSettings(loss=variant), accidental=acc)
    want = transcription(S.tolist(), s_it.tolist(), s_ti.tolist(), s_nn.tolist(), s_pp.tolist(),
                         variant, accidental=acc.tolist())
    assert math.isclose(float(got), want, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("variant", ["offquin", "aoq"])
def test_reference_parity_counts_accidental_pairs(variant):
    B = 6
    S, (s_it, s_ti, s_nn, s_pp) = _inputs(B, 5)
    s_nn = S.diagonal() + 0.1  # every quintuplet pair term active
    acc = torch.ones(B, dtype=torch.bool)
    parity = AOQSettings(loss=variant, mask_accidental_positives=False)
    got, _ = aoq_loss(S, s_it, s_ti, s_nn, s_pp, parity, accidental=acc)
    want = transcription(S.tolist(), s_it.tolist(), s_ti.tolist(), s_nn.tolist(), s_pp.tolist(),
                         variant, accidental=None)
    assert math.isclose(float(got), want, rel_tol=1e-12)
    masked, _ = aoq_loss(S, s_it, s_ti, s_nn, s_pp, AOQSettings(loss=variant), accidental=acc)
    assert float(masked) < float(got)


def test_same_image_mask_and_other_margins():
    B = 6
    S, (s_it, s_ti, s_nn, s_pp) = _inputs(B, 9)
    img = torch.tensor([0, 0, 1, 2, 2, 3])
    pm = img.view(-1, 1) == img.view(1, -1)
    s = AOQSettings(loss="aoq", margin=0.3, offline_margin=0.05, alpha=0.5, beta=2.0)
    got, _ = aoq_loss(S, s_it, s_ti, s_nn, s_pp, s, positive_mask=pm)
    want = transcription(S.tolist(), s_it.tolist(), s_ti.tolist(), s_nn.tolist(), s_pp.tolist(),
                         "aoq", g=0.3, g_off=0.05, alpha=0.5, beta=2.0, not_neg=pm.tolist())
    assert math.isclose(float(got), want, rel_tol=1e-12)


def test_weights_are_not_detached_and_can_go_negative():
    # s_it far above the online hardest: w_c < 0, and its gradient pushes s_it up (-h/alpha)
    S = torch.tensor([[0.5, 0.45], [0.1, 0.6]], dtype=torch.float64)
    s_it = torch.tensor([0.99, -1.0], dtype=torch.float64, requires_grad=True)
    s_ti = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    loss, logs = aoq_loss(S, s_it, s_ti, s_ti, s_ti, AOQSettings(loss="aoq"))
    loss.backward()
    h = 0.2 + 0.45 - 0.5
    # d/ds_it of w_c*h + [s_it - pos]+ = -h/alpha + 1
    assert math.isclose(float(s_it.grad[0]), -h / 0.3 + 1.0, rel_tol=1e-12)
    assert logs["weight_negative"] == pytest.approx(0.25)  # w_c of anchor 0 of the four weights


def test_detached_weights_only_rescale_the_online_terms():
    S = torch.tensor([[0.5, 0.45], [0.1, 0.6]], dtype=torch.float64)
    s_it = torch.tensor([0.99, -1.0], dtype=torch.float64, requires_grad=True)
    low = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    loss, _ = aoq_loss(S, s_it, low, low, low, AOQSettings(loss="aoq", detach_weights=True))
    loss.backward()
    assert float(s_it.grad[0]) == 1.0 and float(s_it.grad[1]) == 0.0  # the offline hinge only
    ref, _ = aoq_loss(S, s_it.detach(), low, low, low, AOQSettings(loss="aoq"))
    assert math.isclose(float(loss.detach()), float(ref), rel_tol=1e-12)  # same value


def test_aoq_without_max_violation_is_refused():
    with pytest.raises(InputError, match="max-violation"):
        AOQSettings(loss="aoq", max_violation=False).check()
    AOQSettings(loss="offquin", max_violation=False).check()  # defined for the ablations
    with pytest.raises(InputError, match="unknown loss"):
        AOQSettings(loss="quintuplet").check()


def test_sum_over_negatives_for_ablations():
    B = 5
    S, (s_it, s_ti, s_nn, s_pp) = _inputs(B, 3)
    got, _ = aoq_loss(S, s_it, s_ti, s_nn, s_pp, AOQSettings(loss="triplet", max_violation=False))
    want = sum(max(0.0, 0.2 + float(S[b, j]) - float(S[b, b])) + max(0.0, 0.2 + float(S[j, b]) - float(S[b, b]))
               for b in range(B) for j in range(B) if j != b)
    assert math.isclose(float(got), want, rel_tol=1e-12)
