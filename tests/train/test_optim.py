"""MuonAdam against hand-written single-matrix Muon and torch AdamW, on CPU with the reference Newton-Schulz."""
import copy
import math

import pytest
import torch

from pgolf.kernels.newton_schulz import newton_schulz_reference
from pgolf.train.optim import (OptimConfig, build_optimizer, momentum_at, row_normalize, update_scale)


def hand_muon(w, g, buf, lr, wd, mom, cfg):
    """One Muon step on one matrix, written out from the formulas."""
    buf = buf * mom + g
    u = torch.add(g, buf, alpha=mom) if cfg.nesterov else buf
    if cfg.muon_eq_r:
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    o = newton_schulz_reference(u, cfg.ns_steps, cfg.ns_schedule).float()
    w = w * (1 - lr * wd) - lr * math.sqrt(max(1.0, w.shape[0] / w.shape[1])) * o
    return w, buf


def make_params():
    torch.manual_seed(1)
    mats = [torch.nn.Parameter(torch.randn(24, 40) * 0.1), torch.nn.Parameter(torch.randn(40, 24) * 0.1),
            torch.nn.Parameter(torch.randn(24, 40) * 0.1)]
    bank = torch.nn.Parameter(torch.randn(3, 40, 24) * 0.1)
    embed = torch.nn.Parameter(torch.randn(50, 24) * 0.1)
    scal = torch.nn.Parameter(torch.ones(24))
    return mats, bank, embed, scal


@pytest.mark.parametrize("nesterov,eq_r,schedule", [
    (True, True, "polar_express"), (False, False, "classic"), (True, False, "polar_express"),
    (False, True, "classic"), (True, True, "classic"), (False, False, "polar_express")])
def test_muon_matches_hand_written(nesterov, eq_r, schedule):
    mats, bank, embed, scal = make_params()
    cfg = OptimConfig(nesterov=nesterov, muon_eq_r=eq_r, ns_schedule=schedule, grad_clip_norm=0.0,
                      muon_momentum_warmup_steps=3, matrix_lr=0.05)
    opt = build_optimizer({"matrix": mats + [bank], "embed": [embed], "scalar": [scal]}, cfg)
    ref_embed = torch.nn.Parameter(embed.detach().clone())
    ref_scal = torch.nn.Parameter(scal.detach().clone())
    ref_adam = torch.optim.AdamW([{"params": [ref_embed], "lr": cfg.embed_lr, "weight_decay": cfg.embed_wd},
                                  {"params": [ref_scal], "lr": cfg.scalar_lr, "weight_decay": cfg.scalar_wd}],
                                 betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    ref_w = [m.detach().clone() for m in mats] + [b.clone() for b in bank.detach()]
    ref_buf = [torch.zeros_like(w) for w in ref_w]
    for step in range(4):
        scale = 1.0 - 0.2 * step
        opt.set_step(step)
        opt.set_lr_scale(scale)
        grads = [torch.randn_like(w) for w in ref_w]
        for m, g in zip(mats, grads):
            m.grad = g.clone()
        bank.grad = torch.stack(grads[3:]).clone()
        embed.grad = torch.randn_like(embed)
        scal.grad = torch.randn_like(scal)
        ref_embed.grad, ref_scal.grad = embed.grad.clone(), scal.grad.clone()
        opt.step()
        opt.zero_grad()
        mom = momentum_at(cfg, step)
        for i, g in enumerate(grads):
            ref_w[i], ref_buf[i] = hand_muon(ref_w[i], g, ref_buf[i], cfg.matrix_lr * scale, cfg.muon_wd, mom, cfg)
        for grp in ref_adam.param_groups:
            grp["lr"] = (cfg.embed_lr if grp["params"][0] is ref_embed else cfg.scalar_lr) * scale
        ref_adam.step()
    got = [m.detach() for m in mats] + list(bank.detach())
    for a, b in zip(got, ref_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embed.detach(), ref_embed.detach())
    torch.testing.assert_close(scal.detach(), ref_scal.detach())
    assert all(p.grad is None for p in mats + [bank, embed, scal])


def test_grad_clip_is_global_norm():
    mats, bank, embed, scal = make_params()
    cfg = OptimConfig(grad_clip_norm=0.5)
    clipped = [p.detach().clone().requires_grad_() for p in mats + [bank, embed, scal]]
    opt = build_optimizer({"matrix": mats + [bank], "embed": [embed], "scalar": [scal]}, cfg)
    ref = build_optimizer({"matrix": clipped[:4], "embed": [clipped[4]], "scalar": [clipped[5]]},
                          OptimConfig(grad_clip_norm=0.0))
    for p, q in zip(mats + [bank, embed, scal], clipped):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(clipped, 0.5)
    assert norm > 0.5
    opt.step()
    ref.step()
    for p, q in zip(mats + [bank, embed, scal], clipped):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_row_normalize_rows_unit_and_zero_row_stays_zero():
    u = torch.randn(5, 7, 33)
    u[1, 3] = 0
    r = row_normalize(u)
    norms = r.norm(dim=-1)
    assert torch.all(norms[1, 3] == 0)
    mask = torch.ones_like(norms, dtype=torch.bool)
    mask[1, 3] = False
    torch.testing.assert_close(norms[mask], torch.ones(int(mask.sum())))
    torch.testing.assert_close(r * u.norm(dim=-1, keepdim=True), u)


def test_momentum_warmup_and_scale():
    cfg = OptimConfig(muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=100)
    assert momentum_at(cfg, 0) == pytest.approx(0.92)
    assert momentum_at(cfg, 50) == pytest.approx(0.945)
    assert momentum_at(cfg, 1000) == pytest.approx(0.97)
    assert momentum_at(OptimConfig(muon_momentum_warmup_steps=0), 0) == OptimConfig().muon_momentum
    assert update_scale(2048, 512) == 2.0 and update_scale(512, 2048) == 1.0


def test_state_dict_resume_gives_same_step():
    mats, bank, embed, scal = make_params()
    groups = {"matrix": mats + [bank], "embed": [embed], "scalar": [scal]}
    cfg = OptimConfig()
    opt = build_optimizer(groups, cfg)
    params = mats + [bank, embed, scal]
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    saved = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    fresh = build_optimizer(groups, cfg)
    fresh.load_state_dict(state)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    fresh.step()
    for p, a in zip(params, after):
        torch.testing.assert_close(p.detach(), a)


def test_bad_input_is_named():
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="2-D or a 3-D bank"):
        build_optimizer({"matrix": [p]}, OptimConfig())
    with pytest.raises(ValueError, match="unknown parameter groups"):
        build_optimizer({"weights": [p]}, OptimConfig())
    with pytest.raises(ValueError, match="ns_schedule"):
        OptimConfig(ns_schedule="cubic")
