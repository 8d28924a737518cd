"""Calibration for GPTQ: H = mean over rows of X^T X for the input X of every quantized matrix.

Forward pre-hooks on each nn.Linear accumulate X^T X and the row count on every call, so a layer that runs
several times per forward (looped/recurrent layers) accumulates every pass. The tied embedding is used as the
output head, so its "input" is the final-norm output: pass it as `head_input` (a module whose output is hooked,
a `(module, "input"|"output")` pair, or a callable `fn(model, input_ids) -> features`), or let
`find_head_input` look for a model method `hessian_targets()` or a final-norm attribute.

Calibration text comes from training batches (inside the training window) or from the model itself:
`generate_calibration` samples sequences autoregressively from BOS at temperature 0.8.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
import torch
from torch import nn

from pgolf import BOS_ID

HookSpec = tuple[nn.Module, str]
HeadInput = Union[nn.Module, HookSpec, Callable[[nn.Module, torch.Tensor], torch.Tensor]]

_HEAD_INPUT_ATTRS = ("final_norm", "norm_f", "ln_f", "final_layernorm", "norm_out", "norm")


class _Accumulator:
    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name; a tied weight is known by the name it was first registered under."""
    return {id(p): n for n, p in model.named_parameters()}


def linear_targets(model: nn.Module, min_numel: int = 0) -> dict[str, HookSpec]:
    """Every nn.Linear whose weight has at least `min_numel` entries, keyed by the weight's name."""
    names = parameter_names(model)
    out: dict[str, HookSpec] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.numel() >= min_numel:
            name = names.get(id(module.weight))
            if name is not None and name not in out:
                out[name] = (module, "input")
    return out


def embedding_name(model: nn.Module, taken: Iterable[str] = ()) -> str | None:
    """Name of the first nn.Embedding weight not in `taken` (the token embedding in the usual layouts)."""
    names = parameter_names(model)
    taken = set(taken)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            name = names.get(id(module.weight))
            if name is not None and name not in taken:
                return name
    return None


def find_head_input(model: nn.Module, taken: Iterable[str] = ()) -> tuple[str, HookSpec] | None:
    """(embedding weight name, hook on the final-norm output) for a tied-embedding head, if one can be found."""
    emb_name = embedding_name(model, taken)
    if emb_name is None:
        return None
    for attr in _HEAD_INPUT_ATTRS:
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return emb_name, (module, "output")
    return None


def default_targets(model: nn.Module, min_numel: int = 0) -> dict[str, Any]:
    """Linear inputs, the model's own `hessian_targets()` if it has one, and the tied-head input if found."""
    targets: dict[str, Any] = dict(linear_targets(model, min_numel))
    if hasattr(model, "hessian_targets"):
        targets.update(model.hessian_targets())
    else:
        head = find_head_input(model, targets)
        if head is not None:
            targets[head[0]] = head[1]
    return targets


def _input_ids(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["input_ids"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    raise TypeError(f"collect_hessians: a batch must be input_ids, (input_ids, targets) or a dict, not {type(batch)}")


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable[Any], targets: dict[str, Any] | None = None,
                     head_input: HeadInput | None = None, head_name: str | None = None, min_numel: int = 0,
                     max_batches: int | None = None, dedupe: bool = True) -> dict[str, torch.Tensor]:
    """Mean X^T X per target name over all calls in all batches.

    targets: name -> (module, "input"|"output") or a callable fn(model, input_ids) -> features; defaults to
    `default_targets(model, min_numel)`. `head_input` (+ `head_name`, default: the first nn.Embedding weight)
    adds or overrides the tied head's entry. With `dedupe`, identical results (q, k, v reading the same input)
    become one shared tensor, so GPTQ factors that Hessian once.
    """
    targets = dict(default_targets(model, min_numel) if targets is None else targets)
    if head_input is not None:
        head_name = head_name or embedding_name(model)
        if head_name is None:
            raise ValueError("collect_hessians: head_input given but the model has no nn.Embedding; pass head_name")
        targets[head_name] = (head_input, "output") if isinstance(head_input, nn.Module) else head_input
    accs = {name: _Accumulator() for name in targets}
    handles = []
    functions: dict[str, Callable] = {}
    for name, spec in targets.items():
        if isinstance(spec, tuple):
            module, kind = spec
            acc = accs[name]
            if kind == "input":
                handles.append(module.register_forward_pre_hook(lambda m, args, a=acc: a.add(args[0])))
            elif kind == "output":
                handles.append(module.register_forward_hook(
                    lambda m, args, out, a=acc: a.add(out[0] if isinstance(out, tuple) else out)))
            else:
                raise ValueError(f"collect_hessians: hook kind for {name!r} must be 'input' or 'output', not {kind!r}")
        elif callable(spec):
            functions[name] = spec
        else:
            raise TypeError(f"collect_hessians: target {name!r} must be (module, kind) or a callable")
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids = _input_ids(batch)
            model(ids)
            for name, fn in functions.items():
                accs[name].add(fn(model, ids))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {name: acc.mean() for name, acc in accs.items() if acc.sum is not None}
    return share_identical(out) if dedupe else out


def all_reduce_hessians(hessians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average Hessians over ranks (each rank calibrated on its own batches); shared tensors reduced once."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return hessians
    world = dist.get_world_size()
    done: set[int] = set()
    for h in hessians.values():
        if id(h) not in done:
            dist.all_reduce(h)
            h /= world
            done.add(id(h))
    return hessians


def share_identical(hessians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make equal matrices one object (callers key work on identity)."""
    kept: list[torch.Tensor] = []
    out = {}
    for name, h in hessians.items():
        same = next((k for k in kept if k.shape == h.shape and k.device == h.device and torch.equal(k, h)), None)
        if same is None:
            kept.append(h)
            same = h
        out[name] = same
    return out


@torch.no_grad()
def generate_calibration(model: nn.Module, n_seqs: int = 64, seq_len: int = 2048, temperature: float = 0.8,
                         batch_size: int = 16, bos_id: int = BOS_ID, seed: int = 0, window: int | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Autoregressive samples from the model, each starting at BOS: (n_seqs, seq_len) token ids.

    The model is called as `model(input_ids)` and must return logits (B, T, V). Without a KV cache every step
    runs the whole prefix (or the last `window` tokens), which is what bounds this function's speed.
    """
    if temperature <= 0:
        raise ValueError(f"generate_calibration: temperature must be positive, not {temperature}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n_seqs, batch_size):
            b = min(batch_size, n_seqs - start)
            ids = torch.full((b, 1), bos_id, dtype=torch.long, device=device)
            for _ in range(seq_len - 1):
                ctx = ids if window is None else ids[:, -window:]
                logits = model(ctx)
                logits = logits[0] if isinstance(logits, tuple) else logits
                probs = torch.softmax(logits[:, -1, :].float() / temperature, dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
            out.append(ids)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=0)


def shard_batches(pattern: str, batches: int, seq_len: int, batch_size: int = 1) -> Iterator[torch.Tensor]:
    """Consecutive (batch_size, seq_len) windows from the start of the contest token shards matching `pattern`."""
    from pgolf.data.shards import list_shards, read_shard

    need = batches * batch_size * seq_len
    tokens, have = [], 0
    for path in list_shards(pattern):
        tokens.append(read_shard(path)[: need - have])
        have += len(tokens[-1])
        if have >= need:
            break
    if have < need:
        raise ValueError(f"calibration: shards {pattern!r} hold {have} tokens, calibration needs {need}")
    flat = np.concatenate(tokens)
    yield from torch.from_numpy(flat.astype(np.int64)).view(batches, batch_size, seq_len)


def calibrate(model: nn.Module, cfg: Any, train_files: str | None = None,
              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Hessians for `cfg.calib_source` (a QuantConfig): "train" reads `train_files` (a shard glob), "self" samples
    the model's own text, "none" gives no Hessians (round to nearest). On CUDA the model runs under bf16 autocast,
    as in training, so the Hessians see the activations the weights saw."""
    device = torch.device(device or next(model.parameters()).device)
    if cfg.calib_source == "none":
        return {}
    if cfg.calib_source not in ("train", "self"):
        raise ValueError(f"calib_source must be train, self or none, not {cfg.calib_source!r}")
    if cfg.calib_source == "train" and not train_files:
        raise ValueError("calibration: calib_source 'train' needs the training shards (a glob)")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if cfg.calib_source == "self":
            ids = generate_calibration(model, cfg.calib_seqs, cfg.calib_seq_len, cfg.calib_temperature,
                                       device=device)
            return collect_hessians(model, ids.split(8))
        batches = (b.to(device) for b in shard_batches(train_files, cfg.calib_batches, cfg.calib_seq_len))
        return collect_hessians(model, batches)
