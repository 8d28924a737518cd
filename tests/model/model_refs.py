"""Hand-written references of the model's formulas, coded independently of pgolf.model (dense masks, explicit
head loops, RoPE as complex rotation, python-int hashing) and reading only the model's parameters."""
from __future__ import annotations

import math

import torch

BOS = 1


def tiny_cfg(**kw):
    from pgolf.model import ModelConfig

    base = dict(vocab_size=61, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0, seq_len=16,
                rope_dims=4, gate_window=5, parallel_from_layer=4, loop_start=1, loop_end=2, loop_count=3)
    base.update(kw)
    return ModelConfig(**base)


@torch.no_grad()
def perturb(model, seed: int = 0, scale: float = 0.3) -> None:
    """Move every parameter off its (often neutral) init so each switch has a visible effect."""
    gen = torch.Generator().manual_seed(seed)
    groups = model.param_groups()
    matrices = {id(p) for p in groups["matrix"]}
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen)
        if id(p) in matrices:
            p.copy_(noise / math.sqrt(p.shape[1]))
        elif p.dim() == 2 and p.shape[0] > 8:  # embedding tables and untied head
            p.copy_(noise)
        else:
            p.add_(scale * noise)


def docs_batch(b: int, t: int, vocab: int, starts: dict[int, list[int]], seed: int = 0) -> torch.Tensor:
    """Random non-BOS tokens with BOS at the given positions of each row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (b, t), generator=gen)
    for row, cols in starts.items():
        ids[row, cols] = BOS
    return ids


def segment_ids(ids: torch.Tensor, doc_mask: bool = True) -> torch.Tensor:
    """(B, T): index of the document each token belongs to within its row."""
    seg = torch.zeros_like(ids)
    for r in range(ids.shape[0]):
        cur = 0
        for c in range(ids.shape[1]):
            if c > 0 and doc_mask and int(ids[r, c]) == BOS:
                cur += 1
            seg[r, c] = cur
    return seg


def ref_rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def ref_rope(x: torch.Tensor, rope_dims: int, base: float) -> torch.Tensor:
    """x (B, T, H, D): pair (i, i + r/2) as the complex number x_i + j x_{i+r/2}, multiplied by exp(-j t w_i)."""
    t = x.shape[1]
    half = rope_dims // 2
    w = torch.tensor([base ** (-2 * i / rope_dims) for i in range(half)], dtype=torch.float64)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * w[None, :]
    rot = torch.polar(torch.ones_like(ang), -ang).to(torch.complex64)[None, :, None, :]
    z = torch.complex(x[..., :half], x[..., half:rope_dims]) * rot
    return torch.cat([z.real, z.imag, x[..., rope_dims:]], dim=-1)


def ref_attention(attn, x, ids, cfg, ve=None, v0=None, doc_mask=True, rope_base=None):
    """The Attention module's formula on x (B, T, dim); returns (out, own values)."""
    b, t, dim = x.shape
    h, hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = (x @ attn.w_q.T).view(b, t, h, d)
    k = (x @ attn.w_k.T).view(b, t, hk, d)
    v = x @ attn.w_v.T
    if attn.ve_scale is not None and ve is not None:
        v = v + attn.ve_scale * ve
    own = v
    if attn.vr_lambda is not None and v0 is not None:
        v = attn.vr_lambda[0] * v + attn.vr_lambda[1] * v0
    v = v.view(b, t, hk, d)
    if cfg.qk_norm:
        q, k = ref_rms(q), ref_rms(k)
    r = cfg.rope_dims or d
    q = ref_rope(q, r, rope_base or cfg.rope_base)
    k = ref_rope(k, r, rope_base or cfg.rope_base)
    if attn.q_gain is not None:
        q = q * attn.q_gain.view(1, 1, h, 1)
    seg = segment_ids(ids, doc_mask)
    pos = torch.arange(t)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[None, :, None] >= pos[None, None, :])
    y = torch.empty(b, t, h, d)
    group = h // hk
    for head in range(h):
        g = head // group
        s = torch.einsum("btd,bsd->bts", q[:, :, head], k[:, :, g]) / math.sqrt(d)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        o = torch.einsum("bts,bsd->btd", p, v[:, :, g])
        if attn.xsa:
            vh = v[:, :, g] / v[:, :, g].norm(dim=-1, keepdim=True).clamp_min(1e-6)
            o = o - (o * vh).sum(-1, keepdim=True) * vh
        y[:, :, head] = o
    if attn.gate == "sparse":
        y = y * torch.sigmoid(x[..., : cfg.gate_window] @ attn.gate_w.T)[..., None]
    elif attn.gate == "dense":
        y = y * torch.sigmoid(x @ attn.gate_w.T)[..., None]
    return y.reshape(b, t, dim) @ attn.w_o.T, own


def ref_mlp(mlp, x, slope):
    h = x @ mlp.w_up.T
    return torch.where(h > 0, h, slope * h).pow(2) @ mlp.w_down.T


def ref_bigram_index(ids: torch.Tensor, buckets: int, bos_mask: bool) -> torch.Tensor:
    out = torch.empty_like(ids)
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            cur = int(ids[r, c])
            if c == 0 or (bos_mask and cur == BOS):
                out[r, c] = buckets - 1
            else:
                out[r, c] = ((36313 * cur) ^ (27191 * int(ids[r, c - 1]))) % (buckets - 1)
    return out


def ref_embed(model, ids):
    """Token embedding + BigramHash + SmearGate + RMSNorm, written per position."""
    cfg = model.cfg
    x = model.tok_emb.weight[ids]
    if model.bigram is not None:
        bg = model.bigram
        idx = ref_bigram_index(ids, cfg.bigram_buckets, cfg.bigram_bos_mask)
        x = x + bg.scale * (bg.embed.weight[idx] @ bg.proj.T)
    if model.smear is not None:
        sm = model.smear
        rows = []
        for r in range(ids.shape[0]):
            cols = [x[r, 0]]
            for c in range(1, ids.shape[1]):
                gate = sm.lam * torch.sigmoid(x[r, c, : cfg.gate_window] @ sm.weight[0])
                if cfg.smear_bos_mask and int(ids[r, c]) == BOS:
                    gate = gate * 0
                cols.append(x[r, c] + gate * x[r, c - 1])
            rows.append(torch.stack(cols))
        x = torch.stack(rows)
    return ref_rms(x)


def ref_hidden(model, ids, encoder, decoder, lane_layers):
    """The whole stack with the schedule given by hand: encoder/decoder physical layer lists and the set of
    layers that run as two lanes."""
    cfg = model.cfg
    x = ref_embed(model, ids)
    x0 = x
    ve = None
    if model.value_embed is not None:
        vem = model.value_embed
        ve = vem.scale * (vem.embed.weight[ids] @ vem.proj.T)
    v0 = None

    def norm(z, layer):
        return ref_rms(z) * (1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0)

    def mix(blk, z):
        return blk.resid_mix[0] * z + blk.resid_mix[1] * x0 if blk.resid_mix is not None else z

    def attn_part(i, z):
        nonlocal v0
        blk = model.blocks[i]
        a, own = ref_attention(blk.attn, norm(z, i), ids, cfg, ve, v0, cfg.doc_mask)
        if cfg.value_residual and v0 is None:
            v0 = own
        return blk.attn_scale * a

    def mlp_part(i, z):
        blk = model.blocks[i]
        return blk.mlp_scale * ref_mlp(blk.mlp, norm(z, i), cfg.mlp_negative_slope)

    skips = []
    for i in encoder:
        xin = mix(model.blocks[i], x)
        x = xin + attn_part(i, xin)
        x = x + mlp_part(i, x)
        skips.append(x)
    lanes = None
    for j, i in enumerate(decoder):
        if i in lane_layers and lanes is None:
            lanes = [x, x]
        if skips:
            s = skips.pop()
            w = model.skip_weights[j]
            target = lanes[0] if lanes is not None else x
            if model.skip_gates is not None:
                g = torch.sigmoid(model.skip_gates[j])
                target = g * target + (1 - g) * (w * s)
            else:
                target = target + w * s
            if lanes is not None:
                lanes[0] = target
            else:
                x = target
        if lanes is None:
            xin = mix(model.blocks[i], x)
            x = xin + attn_part(i, xin)
            x = x + mlp_part(i, x)
        else:
            row = sorted(lane_layers).index(i)
            r, p = model.lane_resid[row], model.lane_post[row]
            a = attn_part(i, mix(model.blocks[i], lanes[0]))
            m = mlp_part(i, lanes[1])
            lanes = [r[0] * lanes[0] + p[0, 0] * a + p[1, 0] * m, r[1] * lanes[1] + p[0, 1] * a + p[1, 1] * m]
    if lanes is not None:
        x = {"mean": 0.5 * (lanes[0] + lanes[1]), "attn": lanes[0], "mlp": lanes[1]}[cfg.parallel_final_lane]
    return ref_rms(x)


def ref_logits(model, hidden):
    z = hidden @ model.head_weight().T
    c = model.cfg.logit_softcap
    return c * torch.tanh(z / c) if c > 0 else z


def assert_close(a, b, tol=1e-4):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-6
    assert err <= tol * max(1.0, scale), f"max abs err {err:.3e} (scale {scale:.3e})"
    assert not torch.isnan(a).any()

