import torch

from engine.loop import LossNormalizer


def test_matches_hand_computation():
    norm = LossNormalizer(alpha=1.0, decay=0.5)
    # step 1: averages start at the first values: mavg_h=2, mavg_p=4
    # L = 1/2 * (2 + 1 * (2/4) * 4) = 2
    assert torch.isclose(norm(torch.tensor(2.0), torch.tensor(4.0)), torch.tensor(2.0))
    # step 2: mavg_h = .5*2 + .5*1 = 1.5, mavg_p = .5*4 + .5*1 = 2.5
    # L = 1/2 * (1 + (1.5/2.5) * 1) = 0.8
    lh = torch.tensor(1.0, requires_grad=True)
    lp = torch.tensor(1.0, requires_grad=True)
    out = norm(lh, lp)
    assert torch.isclose(out, torch.tensor(0.8))
    out.backward()
    # the ratio of moving averages is a constant: no gradient flows through it
    assert torch.isclose(lh.grad, torch.tensor(0.5)) and torch.isclose(lp.grad, torch.tensor(0.3))


def test_alpha_weights_pseudo_loss():
    norm = LossNormalizer(alpha=3.0, decay=0.0)
    # decay 0: averages are the current values, ratio = 2/8
    # L = 1/4 * (2 + 3 * 0.25 * 8) = 2
    assert torch.isclose(norm(torch.tensor(2.0), torch.tensor(8.0)), torch.tensor(2.0))


def test_disabled_is_plain_sum():
    norm = LossNormalizer(alpha=2.0, enabled=False)
    assert torch.isclose(norm(torch.tensor(1.0), torch.tensor(3.0)), torch.tensor(7.0))
    assert norm.mavg_h is None


def test_state_roundtrip():
    a = LossNormalizer(1.0, 0.9)
    a(torch.tensor(1.0), torch.tensor(2.0))
    b = LossNormalizer(1.0, 0.9)
    b.load_state_dict(a.state_dict())
    x, y = torch.tensor(0.7), torch.tensor(0.3)
    assert torch.equal(a(x, y), b(x, y))


def test_a_first_pseudo_loss_of_zero_does_not_blow_up_the_ratio():
    # e.g. a segmentation batch whose pseudo crops are all ignore
    norm = LossNormalizer(alpha=1.0, decay=0.99)
    out = norm(torch.tensor(2.0), torch.tensor(0.0))
    assert norm.mavg_p is None and norm.ratio == 1.0
    assert torch.isclose(out, torch.tensor(1.0))  # 1/2 * (2 + 1 * 0)
    # the pseudo average starts at the first positive value: ratio mavg_h / 4, not ~1/(0.01*4)
    out = norm(torch.tensor(2.0), torch.tensor(4.0))
    assert norm.mavg_p == 4.0 and norm.mavg_h == 2.0
    assert norm.ratio == 0.5
    assert torch.isclose(out, torch.tensor(2.0))  # 1/2 * (2 + 0.5 * 4)


def test_a_first_human_loss_of_zero_starts_the_human_average_later():
    norm = LossNormalizer(alpha=1.0, decay=0.5)
    norm(torch.tensor(0.0), torch.tensor(3.0))
    assert norm.mavg_h is None and norm.mavg_p == 3.0 and norm.ratio == 1.0
    norm(torch.tensor(6.0), torch.tensor(3.0))
    assert norm.mavg_h == 6.0 and norm.ratio == 2.0
    # once started, zeros enter the average as usual
    norm(torch.tensor(0.0), torch.tensor(3.0))
    assert norm.mavg_h == 3.0 and norm.ratio == 1.0
    b = LossNormalizer(alpha=1.0, decay=0.5)
    b.load_state_dict(norm.state_dict())
    assert b.ratio == norm.ratio
