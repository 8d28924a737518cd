"""EMA and SWA of the weights, and which average the run exports."""
import pytest
import torch
from torch import nn

from pgolf.train.averaging import EMA, SWA, WeightAverager


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5, dtype=dtype))
        self.b = nn.Parameter(torch.randn(7, dtype=dtype))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))


def _set(model, fill):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(fill(p))


def test_ema_follows_its_formula():
    torch.manual_seed(1)
    model = Tiny()
    d = 0.9965
    expected = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    ema = EMA(model, d)
    for step in range(1, 6):
        _set(model, lambda p: torch.randn_like(p))
        ema.update(model, step)
        for k, v in model.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * v.detach().double()
    for k, v in expected.items():
        torch.testing.assert_close(ema.shadow[k].double(), v, rtol=1e-6, atol=1e-7)


def test_ema_warmup_follows_its_formula_and_meets_the_plain_decay():
    torch.manual_seed(3)
    model = Tiny()
    d = 0.9965
    expected = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    ema = EMA(model, d, warmup=True)
    init_share = 1.0
    for step in range(1, 31):
        _set(model, lambda p: torch.randn_like(p))
        ema.update(model, step)
        rate = min(d, (1 + step) / (10 + step))
        init_share *= rate
        for k, v in model.named_parameters():
            expected[k] = rate * expected[k] + (1 - rate) * v.detach().double()
    for k, v in expected.items():
        torch.testing.assert_close(ema.shadow[k].double(), v, rtol=1e-6, atol=1e-7)
    assert init_share < 0.01 < d ** 30  # a 30-step run keeps <1% of its initialization (plain decay: 90%)
    assert ema.decay_at(2561) < d == ema.decay_at(2562) == ema.decay_at(10**6)
    assert EMA(model, d).decay_at(1) == d
    avg = WeightAverager(model, d, ema_warmup=True)
    assert avg.ema.warmup and "warm-up" in avg.describe()


def test_ema_keeps_fp32_and_exports_model_dtypes():
    torch.manual_seed(2)
    model = Tiny(torch.bfloat16)
    avg = WeightAverager(model, ema_decay=0.5)
    w0 = model.w.detach().float().clone()
    _set(model, lambda p: p + 1)
    w1 = model.w.detach().float().clone()
    with torch.no_grad():
        model.count.fill_(7)
    avg.update(model, step=1, lr_scale=1.0)
    assert avg.ema.shadow["w"].dtype == torch.float32
    torch.testing.assert_close(avg.ema.shadow["w"], 0.5 * w0 + 0.5 * w1)
    out = avg.export_state(model)
    assert out["w"].dtype == torch.bfloat16
    assert out["count"].item() == 7 and "count" not in avg.ema.shadow  # non-float entries come from the model
    assert set(out) == set(model.state_dict())


def test_swa_snapshots_only_late_in_warmdown():
    model = Tiny()
    swa = SWA(every=2, start_scale=0.2)
    snaps = []
    for step, scale in enumerate([1.0, 0.5, 0.3, 0.19, 0.15, 0.1, 0.1, 0.1], start=1):
        _set(model, lambda p: torch.full_like(p, float(step)))
        if swa.due(step, scale):
            swa.add(model)
            snaps.append(step)
    assert snaps == [4, 6, 8]
    assert swa.count == 3
    torch.testing.assert_close(swa.averaged()["w"], torch.full((3, 5), 6.0))


def test_export_prefers_swa_then_ema_then_raw():
    model = Tiny()
    assert WeightAverager(model).source == "raw"
    torch.testing.assert_close(WeightAverager(model).export_state(model)["w"], model.w.detach())
    both = WeightAverager(model, ema_decay=0.9, swa=True, swa_every=1, swa_start_scale=0.2)
    both.update(model, step=1, lr_scale=1.0)
    assert both.source == "ema"                    # no SWA snapshot yet
    both.update(model, step=2, lr_scale=0.1)
    assert both.source == "swa"


def test_state_dict_round_trip():
    torch.manual_seed(3)
    model = Tiny()
    a = WeightAverager(model, ema_decay=0.9, swa=True, swa_every=1, swa_start_scale=1.0)
    for step in range(1, 4):
        _set(model, lambda p: torch.randn_like(p))
        a.update(model, step, 0.5)
    b = WeightAverager(Tiny(), ema_decay=0.9, swa=True, swa_every=1, swa_start_scale=1.0)
    b.load_state_dict(a.state_dict())
    for k in ("w", "b"):
        torch.testing.assert_close(b.export_state(model)[k], a.export_state(model)[k])
        torch.testing.assert_close(b.ema.shadow[k], a.ema.shadow[k])
    with pytest.raises(ValueError, match="averaging settings"):
        WeightAverager(model, ema_decay=0.9).load_state_dict(a.state_dict())
