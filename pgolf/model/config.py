"""ModelConfig: every technique of the seed systems as a switch, defaulting to the record (PR #1855).

Defaults reproduce the record's architecture: 11L 512d 8H/4KV (head 64), MLP 4x LeakyReLU(0.5)^2, tied sp8192
embeddings, softcap 30, LN scale 1/sqrt(l+1), Q/K RMS norm, partial RoPE 16/64, QK gain 5, XSA on all layers,
sparse attention output gate, BOS-masked SmearGate, U-Net skips with gates, two-lane parallel residuals from
layer 8, layers 3-5 looped 3 times once 35% of the time budget is spent, resid mix with x0, document-masked
attention. Other seeds are sets of these switches (e.g. PR #1123: value_residual, bigram_buckets=2048,
bigram_dim=128, logit_softcap=15; PR #1473: bigram 3072x112, value_embed_layers="9,10"; PR #578: xsa "last:4").

Every field carries `metadata["help"]`, which `pgolf.config.add_arguments` turns into `--flag` help and which
the environment (FIELD_NAME upper-case) can set. `validate()` checks combinations; GPT() calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ATTN_GATES = ("none", "sparse", "dense")
FINAL_LANES = ("mean", "attn", "mlp")


def _f(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    # shape
    vocab_size: int = _f(8192, "vocabulary size (must match the tokenizer)")
    num_layers: int = _f(11, "physical transformer blocks")
    model_dim: int = _f(512, "residual stream width")
    num_heads: int = _f(8, "query heads; head_dim = model_dim / num_heads")
    num_kv_heads: int = _f(4, "key/value heads (GQA: query head h reads KV head h // (num_heads/num_kv_heads))")
    mlp_mult: float = _f(4.0, "MLP hidden width = int(mlp_mult * model_dim)")
    mlp_negative_slope: float = _f(0.5, "MLP activation LeakyReLU(slope)^2; 0 gives ReLU^2")
    seq_len: int = _f(2048, "training sequence length (rows of the batch; RoPE/YaRN reference length)")
    # embeddings and head
    tie_embeddings: bool = _f(True, "output head shares the token embedding")
    embed_init_std: float = _f(0.005, "init std of the tied token embedding (untied: N(0,1), head zero-init)")
    logit_softcap: float = _f(30.0, "logits = c*tanh(z/c); <= 0 turns the cap off (PR #1123 uses 15)")
    bigram_buckets: int = _f(0, "BigramHash buckets (0 off; e.g. 2048 or 3072): hash of (prev, cur) token "
                                "-> embedding added to the token embedding")
    bigram_dim: int = _f(112, "BigramHash embedding width, projected to model_dim")
    bigram_bos_mask: bool = _f(True, "BigramHash treats a BOS position as having no previous token "
                                     "(never hashes across a document boundary)")
    smear_gate: bool = _f(True, "SmearGate: x_t += lam*sigmoid(W x_t[:gate_window]) * x_{t-1} on the embeddings")
    smear_bos_mask: bool = _f(True, "SmearGate gate is 0 at BOS positions (no smear across documents)")
    value_embed_layers: str = _f("", "layers whose attention values get a shared value embedding added "
                                     "('' off, e.g. '9,10'; same syntax as xsa_layers)")
    value_embed_dim: int = _f(128, "value embedding width, projected to the KV width")
    # attention
    qk_norm: bool = _f(True, "RMS-normalize q and k per head before RoPE")
    rope_dims: int = _f(16, "rotate only the first rope_dims dims of each head (0 = all head dims)")
    rope_base: float = _f(10000.0, "RoPE base")
    yarn_scale: float = _f(1.0, "RoPE context extension for evaluation: s > 1 scales the base to "
                                "base*s^(r/(r-2)) (the records' YaRN); 0 = automatic s = max(1, T/seq_len); 1 = off")
    qk_gain_init: float = _f(5.0, "learned per-head gain on q after norm/RoPE, initial value (<= 0: no gain)")
    xsa_layers: str = _f("all", "exclusive self attention on: 'all', 'none', 'last:N' or a list '7,8,9'")
    attn_out_gate: str = _f("sparse", "per-head gate on attention output before the projection: 'none', "
                                      "'sparse' (sigmoid(W x[:gate_window]), W zero-init) or 'dense' "
                                      "(sigmoid(W x), W (heads, dim) ~ N(0, 0.01))")
    gate_window: int = _f(12, "input dims read by the sparse attention gate and the SmearGate")
    value_residual: bool = _f(False, "value residual: v_l <- a_l*v_l + b_l*v_0 (v_0 = first block's values, "
                                     "a, b learned, init 0.5)")
    doc_mask: bool = _f(True, "no attention across BOS boundaries (variable-length causal attention)")
    max_docs_per_row: int = _f(64, "document slots per row in cu_seqlens (static shape for torch.compile, no "
                                   "GPU sync; a row with more documents stops with an error); 0 = exact count "
                                   "via nonzero (syncs)")
    # block layout
    ln_scale: bool = _f(True, "scale each block's normalized inputs by 1/sqrt(layer+1)")
    resid_mix: bool = _f(True, "each block reads mix0*x + mix1*x0 (x0 = normalized embeddings), mix learned")
    unet_skips: bool = _f(True, "U-Net skips: encoder outputs added (LIFO) into decoder inputs, learned weights")
    skip_gates: bool = _f(True, "skip as x <- lerp(w*skip, x, sigmoid(g)), g zero-init (else x + w*skip)")
    parallel_from_layer: int = _f(8, "two-lane parallel residuals (attention lane, MLP lane) for decoder "
                                     "layers >= this index; -1 off")
    parallel_final_lane: str = _f("mean", "hidden state after the lanes: 'mean', 'attn' or 'mlp'")
    loop_start: int = _f(3, "first layer of the recurrent segment")
    loop_end: int = _f(5, "last layer of the recurrent segment (inclusive)")
    loop_count: int = _f(3, "times the segment runs once recurrence is on (1 = off)")
    loop_enable_frac: float = _f(0.35, "fraction of the training budget after which the trainer turns "
                                       "recurrence on")
    ortho_init: bool = _f(True, "orthogonal init of q/k/v/up and of the bigram/value projections "
                                "(else nn.Linear's default); output projections are zero-init either way")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def looped(self) -> bool:
        return self.loop_count > 1

    def validate(self) -> None:
        """Raise ValueError listing every inconsistent setting."""
        from pgolf.model.layout import parse_layers  # local: layout imports this module

        errs: list[str] = []
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "seq_len"):
            if getattr(self, name) <= 0:
                errs.append(f"{name} must be positive, got {getattr(self, name)}")
        if errs:
            raise ValueError("pgolf.model.config: " + "; ".join(errs))
        if self.model_dim % self.num_heads:
            errs.append(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        elif self.head_dim % 2:
            errs.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            errs.append(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.mlp_hidden <= 0:
            errs.append(f"mlp_mult {self.mlp_mult} gives no MLP width")
        if self.mlp_negative_slope < 0:
            errs.append(f"mlp_negative_slope must be >= 0, got {self.mlp_negative_slope}")
        if self.rope_dims < 0 or self.rope_dims % 2 or (self.head_dim and self.rope_dims > self.head_dim):
            errs.append(f"rope_dims {self.rope_dims} must be even and in [0, head_dim={self.head_dim}]")
        rot = self.rope_dims or self.head_dim
        if self.yarn_scale < 0 or 0 < self.yarn_scale < 1:
            errs.append(f"yarn_scale must be 0 (auto) or >= 1, got {self.yarn_scale}")
        if self.yarn_scale != 1 and rot <= 2:
            errs.append("yarn_scale needs at least 4 rotated dims (base*s^(r/(r-2)))")
        if self.attn_out_gate not in ATTN_GATES:
            errs.append(f"attn_out_gate must be one of {ATTN_GATES}, got {self.attn_out_gate!r}")
        needs_window = self.smear_gate or self.attn_out_gate == "sparse"
        if needs_window and not 0 < self.gate_window <= self.model_dim:
            errs.append(f"gate_window {self.gate_window} must be in [1, model_dim={self.model_dim}]")
        for spec_name in ("xsa_layers", "value_embed_layers"):
            try:
                parse_layers(getattr(self, spec_name), self.num_layers)
            except ValueError as exc:
                errs.append(f"{spec_name}: {exc}")
        if self.value_embed_layers.strip() and self.value_embed_dim <= 0:
            errs.append("value_embed_dim must be positive when value_embed_layers is set")
        if self.bigram_buckets < 0 or self.bigram_buckets == 1:
            errs.append(f"bigram_buckets must be 0 (off) or >= 2, got {self.bigram_buckets}")
        if self.bigram_buckets and self.bigram_dim <= 0:
            errs.append("bigram_dim must be positive when bigram_buckets > 0")
        if self.parallel_final_lane not in FINAL_LANES:
            errs.append(f"parallel_final_lane must be one of {FINAL_LANES}, got {self.parallel_final_lane!r}")
        if self.parallel_from_layer != -1 and not 0 <= self.parallel_from_layer < self.num_layers:
            errs.append(f"parallel_from_layer {self.parallel_from_layer} must be -1 or in [0, {self.num_layers})")
        if self.loop_count < 1:
            errs.append(f"loop_count must be >= 1 (1 = no recurrence), got {self.loop_count}")
        if self.looped:
            if not 0 <= self.loop_start <= self.loop_end < self.num_layers:
                errs.append(f"loop segment {self.loop_start}..{self.loop_end} must satisfy "
                            f"0 <= loop_start <= loop_end < num_layers={self.num_layers}")
            elif self.parallel_from_layer != -1 and self.loop_end >= self.parallel_from_layer:
                errs.append(f"the loop segment (..{self.loop_end}) must end before parallel_from_layer "
                            f"{self.parallel_from_layer}: a lane layer cannot be followed by a serial one")
            if self.value_residual and self.loop_start == 0:
                errs.append("value_residual with a loop starting at layer 0: layer 0 makes v_0 and cannot be looped")
        if not 0.0 <= self.loop_enable_frac <= 1.0:
            errs.append(f"loop_enable_frac must be in [0, 1], got {self.loop_enable_frac}")
        if self.max_docs_per_row < 0:
            errs.append(f"max_docs_per_row must be >= 0, got {self.max_docs_per_row}")
        if self.embed_init_std <= 0:
            errs.append(f"embed_init_std must be positive, got {self.embed_init_std}")
        if errs:
            raise ValueError("pgolf.model.config: " + "; ".join(errs))
