"""The GPT: every technique of the seed systems behind a ModelConfig switch (see config.py for the list).

Forward, as in the record:
  x = tok_emb(ids) (+ BigramHash(ids)); SmearGate(x) (BOS-masked); x = RMSNorm(x); x0 = x
  serial block:   x_in = mix0*x + mix1*x0;  x = x_in + attn_scale*Attn(N(x_in)*s);  x = x + mlp_scale*MLP(N(x)*s)
                  (N = RMSNorm, s = 1/sqrt(layer+1) with ln_scale)
  U-Net:          encoder outputs pushed, decoder position j pops one: x <- lerp(w_j*skip, x, sigmoid(g_j))
  two lanes:      from parallel_from_layer on (decoder only), lane0 = lane1 = x at the first such layer, the
                  skip goes into lane0, attention reads mix(lane0, x0), the MLP reads lane1, and
                  lane_d <- r_d*lane_d + p[attn,d]*a + p[mlp,d]*m; at the end x = mean(lane0, lane1)
  recurrence:     layers loop_start..loop_end run loop_count times when set_recurrence(True) (layout.py)
  head:           RMSNorm, tied (or own) head, softcap c*tanh(z/c), fused with the cross-entropy when training.

Initialization (the records'): tied embedding ~ N(0, embed_init_std) (untied: N(0, 1) and a zero head);
q/k/v/MLP-up orthogonal; attention and MLP output projections zero, so every block starts as the identity
(and the residual stream as the normalized embedding); gains, gates and lambdas at their neutral values
(q_gain = qk_gain_init, scales 1, resid mix (1, 0), skip weights 1, skip gates 0 (lerp 0.5), lane residuals
1.1 and lane mixes 1, SmearGate 0, sparse attention gate 0, dense gate ~ N(0, 0.01)).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pgolf import BOS_ID
from pgolf.kernels.cross_entropy import softcap, softcap_cross_entropy
from pgolf.model.attention import Attention
from pgolf.model.config import ModelConfig
from pgolf.model.embeddings import BigramHash, SmearGate, ValueEmbedding
from pgolf.model.layout import doc_cu_seqlens, layer_sequence, num_skip_weights, parse_layers, split_encoder_decoder
from pgolf.model.mlp import MLP
from pgolf.model.norms import rms_norm
from pgolf.model.rotary import Rotary

LANE_RESID_INIT = 1.1
EMBED_NAMES = ("tok_emb.weight", "bigram.embed.weight", "value_embed.embed.weight")
_COMPILED_METHODS = ("forward", "forward_lanes")
"""The Block methods `GPT.compile_blocks` replaces by compiled ones (instance attributes over the class methods)."""

MATRIX_SUFFIXES = (".w_q", ".w_k", ".w_v", ".w_o", ".w_up", ".w_down")
MATRIX_NAMES = ("bigram.proj", "value_embed.proj")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, xsa: bool, value_embed: bool, mixes_value_residual: bool):
        super().__init__()
        dim = cfg.model_dim
        self.layer = layer
        self.scales_input = cfg.ln_scale
        # a buffer, not a Python float: compiled block by block, the blocks then share one graph instead of one per
        # distinct constant
        self.register_buffer("ln", torch.tensor(1.0 / math.sqrt(layer + 1)), persistent=False)
        self.attn = Attention(cfg, xsa, value_embed, mixes_value_residual)
        self.mlp = MLP(dim, cfg.mlp_hidden, cfg.mlp_negative_slope)
        self.attn_scale = nn.Parameter(torch.empty(dim))
        self.mlp_scale = nn.Parameter(torch.empty(dim))
        self.resid_mix = nn.Parameter(torch.empty(2, dim)) if cfg.resid_mix else None

    def reset_parameters(self, ortho: bool) -> None:
        self.attn.reset_parameters(ortho)
        self.mlp.reset_parameters(ortho)
        nn.init.ones_(self.attn_scale)
        nn.init.ones_(self.mlp_scale)
        if self.resid_mix is not None:
            with torch.no_grad():
                self.resid_mix[0].fill_(1.0)
                self.resid_mix[1].fill_(0.0)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_norm(x)
        return (y.float() * self.ln).to(y.dtype) if self.scales_input else y

    def mix(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.resid_mix is None:
            return x
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def attend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor,
               max_seqlen: int, ve: torch.Tensor | None, v0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, v = self.attn(self._norm(x), rope[0], rope[1], cu_seqlens, max_seqlen, ve, v0)
        return self.attn_scale.to(a.dtype) * a, v

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp(self._norm(x))
        return self.mlp_scale.to(m.dtype) * m

    def forward(self, x: torch.Tensor, x0: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cu_seqlens: torch.Tensor, max_seqlen: int, ve: torch.Tensor | None = None,
                v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Serial block: returns (x, this block's values)."""
        x_in = self.mix(x, x0)
        a, v = self.attend(x_in, rope, cu_seqlens, max_seqlen, ve, v0)
        x = x_in + a
        return x + self.feed(x), v

    def forward_lanes(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor, resid: torch.Tensor,
                      post: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor,
                      max_seqlen: int, ve: torch.Tensor | None = None,
                      v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two-lane block: attention reads lane0 (mixed with x0), the MLP reads lane1; resid (2,), post
        (2 sources: attn, mlp; 2 destination lanes)."""
        a, v = self.attend(self.mix(lane0, x0), rope, cu_seqlens, max_seqlen, ve, v0)
        m = self.feed(lane1)
        r, p = resid.to(lane0.dtype), post.to(lane0.dtype)
        new0 = r[0] * lane0 + p[0, 0] * a + p[1, 0] * m
        new1 = r[1] * lane1 + p[0, 1] * a + p[1, 1] * m
        return new0, new1, v


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        n = cfg.num_layers
        xsa = set(parse_layers(cfg.xsa_layers, n))
        ve_layers = set(parse_layers(cfg.value_embed_layers, n))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = (BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim,
                                  BOS_ID if cfg.bigram_bos_mask else None) if cfg.bigram_buckets else None)
        self.smear = SmearGate(cfg.gate_window, BOS_ID if cfg.smear_bos_mask else None) if cfg.smear_gate else None
        self.value_embed = ValueEmbedding(cfg.vocab_size, cfg.value_embed_dim, cfg.kv_dim) if ve_layers else None
        self.blocks = nn.ModuleList(Block(cfg, i, i in xsa, i in ve_layers, cfg.value_residual and i > 0)
                                    for i in range(n))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_dims, cfg.rope_base, cfg.seq_len, cfg.yarn_scale)
        self.num_skips = num_skip_weights(cfg)
        self.skip_weights = nn.Parameter(torch.empty(self.num_skips, cfg.model_dim)) if self.num_skips else None
        self.skip_gates = (nn.Parameter(torch.empty(self.num_skips, cfg.model_dim))
                           if self.num_skips and cfg.skip_gates else None)
        lane_layers = sorted({i for looping in (False, True) for i in split_encoder_decoder(cfg, looping)[1]
                              if cfg.parallel_from_layer >= 0 and i >= cfg.parallel_from_layer})
        self.lane_row = {layer: row for row, layer in enumerate(lane_layers)}
        self.lane_resid = nn.Parameter(torch.empty(len(lane_layers), 2)) if lane_layers else None
        self.lane_post = nn.Parameter(torch.empty(len(lane_layers), 2, 2)) if lane_layers else None
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.model_dim))
        self.tap_head = nn.Identity()
        """Hook point for quantization calibration: the head's input (final normalized hidden states)."""
        self.set_recurrence(False)
        self.reset_parameters()

    # ---------------------------------------------------------------- setup
    def reset_parameters(self) -> None:
        cfg = self.cfg
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=cfg.embed_init_std)
        else:
            nn.init.normal_(self.tok_emb.weight, std=1.0)
            nn.init.zeros_(self.lm_head)
        for part in (self.bigram, self.value_embed):
            if part is not None:
                part.reset_parameters(cfg.ortho_init)
        if self.smear is not None:
            self.smear.reset_parameters()
        for block in self.blocks:
            block.reset_parameters(cfg.ortho_init)
        if self.skip_weights is not None:
            nn.init.ones_(self.skip_weights)
        if self.skip_gates is not None:
            nn.init.zeros_(self.skip_gates)
        if self.lane_resid is not None:
            nn.init.constant_(self.lane_resid, LANE_RESID_INIT)
            nn.init.ones_(self.lane_post)

    def set_recurrence(self, active: bool) -> None:
        """Turn the layer loop on or off (a no-op schedule change when loop_count is 1). Under torch.compile
        the switch costs one recompile."""
        self.looping = bool(active) and self.cfg.looped
        self._encoder, self._decoder = split_encoder_decoder(self.cfg, self.looping)

    def virtual_layers(self) -> int:
        """Blocks executed per forward in the current recurrence state."""
        return len(layer_sequence(self.cfg, self.looping))

    # ---------------------------------------------------------------- forward
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head

    def _skip(self, x: torch.Tensor, skip: torch.Tensor, j: int) -> torch.Tensor:
        w = self.skip_weights[j].to(x.dtype)
        if self.skip_gates is None:
            return x + w * skip
        return torch.lerp(w * skip, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> final normalized hidden states (B, T, dim), before the head."""
        if input_ids.dim() != 2:
            raise ValueError(f"pgolf.model.gpt: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        cfg = self.cfg
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids).to(x.dtype)
        if self.smear is not None:
            x = self.smear(x, input_ids)
        x = rms_norm(x)
        x0 = x
        cu = doc_cu_seqlens(input_ids, BOS_ID, cfg.doc_mask, cfg.max_docs_per_row)
        rope = self.rotary.cos_sin(t, input_ids.device)
        ve = self.value_embed(input_ids) if self.value_embed is not None else None
        keep_v0 = cfg.value_residual
        v0 = None
        skips: list[torch.Tensor] = []
        for i in self._encoder:
            x, v = self.blocks[i](x, x0, rope, cu, t, ve, v0)
            if keep_v0 and v0 is None:
                v0 = v
            skips.append(x)
        lane0 = lane1 = None
        for j, i in enumerate(self._decoder):
            row = self.lane_row.get(i)
            if row is not None and lane0 is None:
                lane0 = lane1 = x
            if skips and j < self.num_skips:
                if row is None:
                    x = self._skip(x, skips.pop(), j)
                else:
                    lane0 = self._skip(lane0, skips.pop(), j)
            if row is None:
                x, v = self.blocks[i](x, x0, rope, cu, t, ve, v0)
            else:
                lane0, lane1, v = self.blocks[i].forward_lanes(lane0, lane1, x0, self.lane_resid[row],
                                                               self.lane_post[row], rope, cu, t, ve, v0)
            if keep_v0 and v0 is None:
                v0 = v
        if lane0 is not None:
            final = cfg.parallel_final_lane
            x = lane0 if final == "attn" else lane1 if final == "mlp" else 0.5 * (lane0 + lane1)
        return self.tap_head(rms_norm(x))

    def hessian_targets(self) -> dict[str, tuple[nn.Module, str]]:
        """Weight name -> (tap module, "input"/"output") whose activations are that weight's GPTQ inputs."""
        targets: dict[str, tuple[nn.Module, str]] = {}
        for i, block in enumerate(self.blocks):
            for w in ("w_q", "w_k", "w_v"):
                targets[f"blocks.{i}.attn.{w}"] = (block.attn.tap_qkv, "input")
            targets[f"blocks.{i}.attn.w_o"] = (block.attn.tap_o, "input")
            targets[f"blocks.{i}.mlp.w_up"] = (block.mlp.tap_up, "input")
            targets[f"blocks.{i}.mlp.w_down"] = (block.mlp.tap_down, "input")
        targets["lm_head" if self.lm_head is not None else "tok_emb.weight"] = (self.tap_head, "output")
        return targets

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """With targets: softcapped cross-entropy ("mean" scalar, "sum", or "none" per-token (B, T); targets
        equal to -100 are ignored). Without: softcapped logits (B, T, V) in fp32."""
        h = self.hidden(input_ids)
        w = self.head_weight().to(h.dtype)
        if targets is None:
            return softcap(F.linear(h, w).float(), self.cfg.logit_softcap)
        if targets.shape != input_ids.shape:
            raise ValueError(f"pgolf.model.gpt: targets {tuple(targets.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        loss = softcap_cross_entropy(h.reshape(-1, h.size(-1)), w, targets.reshape(-1), self.cfg.logit_softcap,
                                     reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def compile_blocks(self, fullgraph: bool = True, backend: str = "inductor") -> None:
        """Regional compilation: torch.compile each block's forward (and two-lane forward) instead of the whole
        model. Dynamo compiles Block.forward once per distinct set of switches (XSA, value embedding, first
        layer, ...) and reuses the graph across the blocks that share them, so the compile takes a fraction of
        a whole-model compile; the embedding, skips and head run eager between the blocks."""
        limit = 8 * len(self.blocks)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        self.uncompile_blocks()  # compiling again (e.g. without fullgraph) starts from the methods
        for block in self.blocks:
            for name in _COMPILED_METHODS:
                setattr(block, name, torch.compile(getattr(block, name), fullgraph=fullgraph, dynamic=False,
                                                   backend=backend))

    @property
    def blocks_compiled(self) -> bool:
        return any(name in block.__dict__ for block in self.blocks for name in _COMPILED_METHODS)

    def uncompile_blocks(self) -> dict[tuple[int, str], Any]:
        """Back to the eager block methods (for evaluation shapes, calibration hooks, export); returns what was
        removed, for `eager_blocks` to put back."""
        return {(i, name): block.__dict__.pop(name) for i, block in enumerate(self.blocks)
                for name in _COMPILED_METHODS if name in block.__dict__}

    @contextlib.contextmanager
    def eager_blocks(self) -> Iterator[None]:
        """Run the blocks eagerly inside the `with`, compiled again after it (validation between training steps
        must not compile graphs for its own shapes)."""
        removed = self.uncompile_blocks()
        try:
            yield
        finally:
            for (i, name), fn in removed.items():
                setattr(self.blocks[i], name, fn)

    # ---------------------------------------------------------------- bookkeeping
    @staticmethod
    def group_of(name: str) -> str:
        """Optimizer group of a parameter name: matrix (Muon), embed, scalar, head."""
        if name in EMBED_NAMES:
            return "embed"
        if name == "lm_head":
            return "head"
        if name.endswith(MATRIX_SUFFIXES) or name in MATRIX_NAMES:
            return "matrix"
        return "scalar"

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter in exactly one group: "matrix" (2-D block weights and the bigram/value-embedding
        projections: Muon), "embed" (token, bigram and value embedding tables), "scalar" (gains, gates, skip
        weights, lambdas, scales, including the 2-D attention gate weights), "head" (untied head)."""
        groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "scalar": [], "head": []}
        for name, p in self.named_parameters():
            groups[self.group_of(name)].append(p)
        return groups

    def num_params(self, group: str | None = None) -> int:
        if group is None:
            return sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.param_groups()[group])

    def describe(self) -> str:
        """One line for the start of a run: size, depth and the switches that are on."""
        cfg = self.cfg
        counts = {k: sum(p.numel() for p in ps) for k, ps in self.param_groups().items()}
        sizes = " ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items() if v)
        depth = f"{cfg.num_layers}L"
        if cfg.looped:
            depth += (f" -> {len(layer_sequence(cfg, True))} virtual (layers {cfg.loop_start}-{cfg.loop_end} "
                      f"x{cfg.loop_count}, {'on' if self.looping else 'off'})")
        act = f"leaky{cfg.mlp_negative_slope:g}^2" if cfg.mlp_negative_slope else "relu^2"
        on = [f"xsa {cfg.xsa_layers}" if parse_layers(cfg.xsa_layers, cfg.num_layers) else "",
              f"rope {cfg.rope_dims or cfg.head_dim}/{cfg.head_dim}",
              "qk-norm" if cfg.qk_norm else "",
              f"qk-gain {cfg.qk_gain_init:g}" if cfg.qk_gain_init > 0 else "",
              "ln-scale" if cfg.ln_scale else "",
              f"attn-gate {cfg.attn_out_gate}" if cfg.attn_out_gate != "none" else "",
              "value-residual" if cfg.value_residual else "",
              f"ve{cfg.value_embed_dim} {cfg.value_embed_layers}" if self.value_embed is not None else "",
              f"bigram {cfg.bigram_buckets}x{cfg.bigram_dim}" if self.bigram is not None else "",
              ("smear" + ("(bos-mask)" if cfg.smear_bos_mask else "(NO bos-mask)")) if cfg.smear_gate else "",
              ("unet+gates" if cfg.skip_gates else "unet") if cfg.unet_skips else "",
              f"lanes from {cfg.parallel_from_layer}" if self.lane_resid is not None else "",
              "resid-mix" if cfg.resid_mix else "",
              "doc-mask" if cfg.doc_mask else "NO doc-mask",
              f"yarn {cfg.yarn_scale:g}" if cfg.yarn_scale != 1 else ""]
        return (f"GPT {self.num_params() / 1e6:.2f}M params ({sizes}) | {depth} | d{cfg.model_dim} "
                f"h{cfg.num_heads}/kv{cfg.num_kv_heads} hd{cfg.head_dim} mlp {cfg.mlp_mult:g}x {act} | "
                f"vocab {cfg.vocab_size} {'tied' if cfg.tie_embeddings else 'untied'} softcap "
                f"{cfg.logit_softcap:g} seq {cfg.seq_len} | " + ", ".join(s for s in on if s))
