"""QuantConfig: every switch of the export path (Hessians, GPTQ, clipping, bits, LQER, rotations, QAT, artifact).

Field names double as environment variables (upper case) and flags (`--gptq-damp`), see pgolf/config.py.
Defaults follow the record line (PR #1855): int6 matrices with SDClip (attention k=13, MLP k=12), an int7
embedding (k=15), LQER rank 4 on the top 3 tensors, groups of 64.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from pgolf.quant.compress import METHODS as BYTE_METHODS

TENSOR_CLASSES = ("attn", "mlp", "embed")
COMPRESSORS = ("best", "rans", *BYTE_METHODS)


@dataclass
class QuantConfig:
    # which tensors are quantized
    quant_min_numel: int = field(default=65536,
                                 metadata={"help": "2D tensors with at least this many elements are quantized"})
    embed_patterns: str = field(default="emb,wte,lm_head",
                                metadata={"help": "comma list: name substrings of the embedding class"})
    mlp_patterns: str = field(default="mlp,fc,ffn,w_up,w_down,up_proj,down_proj",
                              metadata={"help": "comma list: name substrings of the MLP class"})
    keep_fp32_patterns: str = field(default="",
                                    metadata={"help": "comma list: small float tensors kept fp32 (others fp16)"})
    skip_patterns: str = field(default="",
                               metadata={"help": "comma list: state_dict entries left out of the artifact"})
    # bits
    attn_bits: int = field(default=6, metadata={"help": "bits of attention matrices (2..8)"})
    mlp_bits: int = field(default=6, metadata={"help": "bits of MLP matrices (2..8)"})
    embed_bits: int = field(default=7, metadata={"help": "bits of the embedding (2..8)"})
    mixed_bits: bool = field(default=False,
                             metadata={"help": "choose bits per tensor by error/size under the byte budget"})
    bits_choices: str = field(default="4,5,6,7,8",
                              metadata={"help": "comma list of widths the mixed allocation may use"})
    # clipping (per-row scales)
    clip_mode: str = field(default="sdclip", metadata={"help": "sdclip | absmax | percentile | search | adaptive"})
    attn_clip_sigmas: float = field(default=13.0, metadata={"help": "SDClip k of attention matrices"})
    mlp_clip_sigmas: float = field(default=12.0, metadata={"help": "SDClip k of MLP matrices"})
    embed_clip_sigmas: float = field(default=15.0, metadata={"help": "SDClip k of the embedding"})
    clip_percentile: float = field(default=99.95, metadata={"help": "row percentile of |w| for clip_mode=percentile"})
    adaptive_k_min: float = field(default=6.0, metadata={"help": "adaptive clip: smallest per-tensor k"})
    adaptive_k_max: float = field(default=24.0, metadata={"help": "adaptive clip: largest per-tensor k"})
    # GPTQ
    gptq: bool = field(default=True, metadata={"help": "GPTQ error feedback (off: round to nearest)"})
    gptq_block_size: int = field(default=128, metadata={"help": "GPTQ column block"})
    gptq_damp: float = field(default=0.01, metadata={"help": "damping as a fraction of the mean Hessian diagonal"})
    gptq_act_order: bool = field(default=True, metadata={"help": "quantize columns by decreasing Hessian diagonal"})
    # calibration
    calib_source: str = field(default="train", metadata={"help": "train | self (autoregressive self-generated) | none"})
    calib_batches: int = field(default=16, metadata={"help": "training batches for Hessians"})
    calib_seqs: int = field(default=64, metadata={"help": "self-generated sequences"})
    calib_seq_len: int = field(default=2048, metadata={"help": "length of each calibration sequence"})
    calib_temperature: float = field(default=0.8, metadata={"help": "sampling temperature of self-generation"})
    # LQER
    lqer_rank: int = field(default=4, metadata={"help": "rank of the error correction (0: off)"})
    lqer_top_k: int = field(default=3,
                            metadata={"help": "tensors with the largest Hessian-weighted error that get LQER"})
    lqer_group: int = field(default=64, metadata={"help": "quantization group of the LQER factors"})
    lqer_a_bits: int = field(default=2, metadata={"help": "bits of the left factor A (rows x rank)"})
    lqer_b_bits: int = field(default=4, metadata={"help": "bits of the right factor B (rank x cols)"})
    # rotations
    hadamard: bool = field(default=False,
                           metadata={"help": "randomized Hadamard rotation of the input dimension before quantization"})
    hadamard_seed: int = field(default=1234, metadata={"help": "seed of the Hadamard sign vector"})
    awq: bool = field(default=False, metadata={"help": "AWQ-style per-input-channel scaling before quantization"})
    awq_alphas: str = field(default="0,0.25,0.5,0.75", metadata={"help": "AWQ exponents searched per tensor"})
    # QAT
    qat: bool = field(default=False, metadata={"help": "fake-quantize weights in the forward pass (straight-through)"})
    qat_start_frac: float = field(default=0.85,
                                  metadata={"help": "fraction of training after which QAT is on (0: from the start)"})
    # artifact
    compressor: str = field(default="rans", metadata={"help": "rans (ours: seconds, and what best chose on a trained "
                                                             "model) | best (tries every layout and codec: "
                                                             "minutes) | zstd | lzma | brotli | zlib"})
    artifact_budget_bytes: int = field(default=16_000_000, metadata={"help": "limit on model bytes + code bytes"})
    code_bytes: int = field(default=0, metadata={"help": "bytes of the submitted code, counted against the budget"})
    report_only: bool = field(default=False, metadata={"help": "report an over-budget artifact instead of refusing it"})
    over_budget: str = field(default="mixed", metadata={"help": (
        "fixed widths over the budget: mixed (say so, then choose widths per tensor under the budget, from "
        "bits_choices up to the widest configured class) | error (refuse)")})

    def __post_init__(self) -> None:
        for name in ("attn_bits", "mlp_bits", "embed_bits", "lqer_a_bits", "lqer_b_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise ValueError(f"QuantConfig.{name} must be in 2..8, not {getattr(self, name)}")
        if self.clip_mode not in ("sdclip", "absmax", "percentile", "search", "adaptive"):
            raise ValueError(f"QuantConfig.clip_mode {self.clip_mode!r} is not "
                             "sdclip|absmax|percentile|search|adaptive")
        if self.calib_source not in ("train", "self", "none"):
            raise ValueError(f"QuantConfig.calib_source {self.calib_source!r} is not train|self|none")
        if self.over_budget not in ("mixed", "error"):
            raise ValueError(f"QuantConfig.over_budget {self.over_budget!r} is not mixed|error")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"QuantConfig.compressor {self.compressor!r} is not {'|'.join(COMPRESSORS)}")

    # helpers used by the whole package, so that QAT and export classify tensors the same way
    def patterns(self, name: str) -> list[str]:
        return [p.strip() for p in getattr(self, name).split(",") if p.strip()]

    def tensor_class(self, name: str) -> str:
        low = name.lower()
        if any(p in low for p in self.patterns("embed_patterns")):
            return "embed"
        if any(p in low for p in self.patterns("mlp_patterns")):
            return "mlp"
        return "attn"

    def bits_for(self, name: str) -> int:
        return getattr(self, f"{self.tensor_class(name)}_bits")

    def clip_sigmas_for(self, name: str) -> float:
        return getattr(self, f"{self.tensor_class(name)}_clip_sigmas")

    def bits_choice_list(self) -> list[int]:
        return sorted({int(b) for b in re.split(r"[,\s]+", self.bits_choices) if b})

    def awq_alpha_list(self) -> list[float]:
        return [float(a) for a in re.split(r"[,\s]+", self.awq_alphas) if a]

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)
