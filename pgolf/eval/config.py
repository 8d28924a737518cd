"""Evaluation settings: one dataclass filled from defaults < environment < `pgolf eval` flags (pgolf.config).

Modes (all score every target of the validation stream exactly once, see pgolf.eval.sliding):
- "chunks": disjoint windows of `window` tokens (the baseline's val_bpb).
- "sliding": overlapping windows at `stride`, each target scored with the longest context a window gives.
- "ttt": sliding scoring plus score-first full-parameter test-time training over chunks of the stream.
- "lora_ttt": per-document LoRA test-time training with global SGD phases (document-aware by design).

The `ttt_*` optimizer fields (momentum, grad clip, chunk tokens, batch sequences, sequence length, frozen
blocks, cosine) also drive the global SGD phases of "lora_ttt"; lr, epochs and embedding freezing have their
own `phase_*` fields there, because the records set them apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("chunks", "sliding", "ttt", "lora_ttt")


@dataclass
class EvalConfig:
    mode: str = field(default="sliding", metadata={"help": "chunks | sliding | ttt | lora_ttt"})
    window: int = field(default=0, metadata={"help": "context window in tokens; 0 = the model's training length"})
    stride: int = field(default=64, metadata={"help": "new targets scored per sliding window (64 or 32 in records)"})
    batch: int = field(default=32, metadata={"help": "rows of `window` tokens per forward (token budget per batch)"})
    doc_aware: bool = field(default=False, metadata={"help": "context never crosses a BOS (document isolation)"})
    pack_docs: bool = field(default=True, metadata={
        "help": "doc_aware only: pack several documents into one row, relying on the model's doc mask "
                "(needs model config doc_mask; falls back to one document per row without it)"})
    autocast: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the scoring forward (CUDA)"})
    max_tokens: int = field(default=0, metadata={"help": "evaluate only the first N validation tokens; 0 = all"})

    # score-first full-parameter TTT (mode "ttt"; optimizer fields shared with the lora_ttt global phases)
    ttt_chunk_tokens: int = field(default=32768, metadata={"help": "targets per TTT chunk (score, then train)"})
    ttt_epochs: int = field(default=3, metadata={"help": "passes over each scored chunk"})
    ttt_lr: float = field(default=0.002, metadata={"help": "SGD learning rate (peak of the cosine)"})
    ttt_momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    ttt_grad_clip: float = field(default=1.0, metadata={"help": "global grad-norm clip; 0 = off"})
    ttt_batch_seqs: int = field(default=32, metadata={"help": "training sequences per SGD step, over all ranks"})
    ttt_seq_len: int = field(default=0, metadata={"help": "training sequence length; 0 = window"})
    ttt_freeze_embeddings: bool = field(default=True, metadata={"help": "keep embedding (and tied head) weights"})
    ttt_freeze_blocks: int = field(default=0, metadata={"help": "keep the first N transformer blocks"})
    ttt_ema: float = field(default=0.0, metadata={"help": "EMA decay of adapted weights used for scoring; 0 = off"})
    ttt_cosine: bool = field(default=True, metadata={"help": "cosine-decay the TTT lr over the stream's chunks"})

    # phased LoRA TTT (mode "lora_ttt")
    lora_rank: int = field(default=96, metadata={"help": "LoRA rank per adapted linear layer"})
    lora_alpha: float = field(default=144.0, metadata={"help": "LoRA scale = alpha / rank"})
    lora_targets: tuple[str, ...] = field(default=("q", "k", "v", "o", "mlp", "head"), metadata={
        "help": "adapted layers: q k v o (attention projections), mlp (parallel adapter on each MLP), head "
                "(logits), or regexes of parameter names / 'module:REGEX' of module names"})
    lora_chunk: int = field(default=48, metadata={"help": "targets per LoRA step inside a document"})
    lora_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the LoRA weights"})
    lora_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    lora_beta2: float = field(default=0.99, metadata={"help": "Adam beta2"})
    lora_weight_decay: float = field(default=0.5, metadata={"help": "AdamW weight decay of the LoRA weights"})
    lora_grad_clip: float = field(default=0.0, metadata={"help": "per-document LoRA grad-norm clip; 0 = off"})
    lora_batch_docs: int = field(default=64, metadata={"help": "documents adapted together (one LoRA each)"})
    phases: int = field(default=3, metadata={"help": "global SGD phases on already-scored documents; 0 = none"})
    phase_prefix_docs: int = field(default=2000, metadata={
        "help": "documents covered by the phases: boundaries at prefix*k/phases (k = 1..phases)"})
    phase_boundaries: tuple[int, ...] = field(default=(), metadata={
        "help": "explicit document-count boundaries (overrides phase_prefix_docs/phases)"})
    phase_lr: float = field(default=0.001, metadata={"help": "SGD lr of the global phases"})
    phase_epochs: int = field(default=1, metadata={"help": "passes over the scored documents per phase"})
    phase_freeze_embeddings: bool = field(default=False, metadata={
        "help": "keep embeddings frozen in the global phases (the records train every weight there)"})

    # eval-time budget
    time_budget_seconds: float = field(default=600.0, metadata={"help": "eval wall-clock limit (contest: 600 s)"})
    budget_margin_seconds: float = field(default=15.0, metadata={
        "help": "stop optional work (TTT training, phases) this long before the limit"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"EvalConfig.mode must be one of {MODES}, not {self.mode!r}")
        for name in ("stride", "batch", "ttt_chunk_tokens", "lora_chunk", "lora_batch_docs", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EvalConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("window", "max_tokens", "ttt_epochs", "ttt_seq_len", "ttt_freeze_blocks", "phases",
                     "phase_prefix_docs", "phase_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ttt_ema < 1.0:
            raise ValueError(f"EvalConfig.ttt_ema must lie in [0, 1), got {self.ttt_ema}")
        if list(self.phase_boundaries) != sorted(set(self.phase_boundaries)) or any(b <= 0 for b in
                                                                                   self.phase_boundaries):
            raise ValueError(f"EvalConfig.phase_boundaries must be increasing positive document counts, "
                             f"got {self.phase_boundaries}")

    def resolved_window(self, model_seq_len: int | None) -> int:
        """The window in tokens: the explicit one, else the model's training length."""
        if self.window > 0:
            return self.window
        if not model_seq_len:
            raise ValueError("EvalConfig.window is 0 and the model config names no training length "
                             "(train_seq_len / seq_len / max_seq_len); pass --window")
        return int(model_seq_len)
