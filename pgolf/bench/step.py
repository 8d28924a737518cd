"""End-to-end training-step benchmark of the record-shaped model on one GPU (suites train_step, train_step_looped).

The model: 11L 512d 8H/4KV, MLP 4x, sp8192, seq 2048, 98,304 tokens per step (48 rows), XSA all layers, parallel
lanes from layer 8, recurrence off (train_step) and on (train_step_looped: layers 3-5 x3, 17 virtual layers).
Implementations: "pgolf" (Triton kernels, torch.compile around them), "pgolf-blocks" (the same with regional
compilation: each block compiled, the rest eager) and "compile" (PGOLF_KERNELS=reference: eager reference kernels
under torch.compile). Documents: BOS at realistic intervals (lengths drawn from a
log-normal with the shared corpus's median), so the attention is document-masked as in training.

Launch to the first timed step is the `startup` suite (pgolf/bench/startup.py): a fresh `pgolf train` process.

MFU counts 6 x (matrix params, head included) per token plus causal attention 6 x layers x seq x dim per token
(the dense-causal count, as the records report it), over the measured bf16 matmul ceiling.
"""
from __future__ import annotations

import os
import time

import torch

from pgolf.bench.harness import peak_memory_mb, profile_calls, random_documents, row
from pgolf.kernels.dispatch import kernels_mode

TOKENS = 98_304
SEQ = 2048
STEPS_WARM = 3
STEPS_TIMED = 10


def batch_with_documents(vocab: int, rows: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) on the GPU from `random_documents` (BOS at realistic document starts)."""
    tokens = torch.from_numpy(random_documents(rows * seq + 1, vocab, seed=seed))
    return tokens[:-1].view(rows, seq).cuda(), tokens[1:].view(rows, seq).cuda()


def flops_per_token(model, cfg) -> float:
    matrix = sum(p.numel() for p in model.param_groups()["matrix"])
    head = cfg.vocab_size * cfg.model_dim
    return 6.0 * (matrix + head) + 6.0 * model.virtual_layers() * SEQ * cfg.model_dim


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def breakdown(step, steps: int = 2, top: int = 15, cuda: bool = True) -> tuple[dict[str, float], list[list]]:
    """Share of CUDA time (CPU time with cuda=False) by kernel family over `steps` profiled steps, and the `top`
    kernels by time as [name, ms per step, calls per step]: where the elementwise/fused share goes is the next
    tuning question."""
    prof = profile_calls(step, steps, cuda)
    families = {"attention": ("attn", "flash", "fmha", "sdpa", "cudnn", "_fwd_kernel", "_bwd_dq", "_bwd_dkdv"), "mlp": ("mlp",),
                "cross_entropy": ("softcap", "cross_entropy", "_ce_"), "newton_schulz": ("ns_", "newton", "gram"),
                "gemm": ("gemm", "sm90", "cutlass", "nvjet", "matmul", "mm_"),
                "elementwise/fused": ("triton_", "elementwise", "vectorized", "reduce")}
    totals: dict[str, float] = {}
    kernels: list[list] = []
    for evt in prof.key_averages():
        t = (getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0) if cuda
             else evt.self_cpu_time_total)
        if not t:
            continue
        name = evt.key.lower()
        family = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        totals[family] = totals.get(family, 0.0) + t
        kernels.append([evt.key[:80], round(t / steps / 1e3, 3), round(evt.count / steps, 1)])
    whole = sum(totals.values()) or 1.0
    shares = {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return shares, sorted(kernels, key=lambda k: -k[1])[:top]


def bench_one(looped: bool, mode: str, ceilings: dict, scope: str = "model") -> dict:
    from pgolf.model import GPT
    from pgolf.model.config import ModelConfig
    from pgolf.train.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    with kernels_mode(mode):
        cfg = ModelConfig()
        model = GPT(cfg).cuda()
        model.set_recurrence(looped)
        opt = build_optimizer(model.param_groups(), OptimConfig())
        if scope == "blocks":
            model.compile_blocks()
            compiled = model
        else:
            compiled = torch.compile(model, dynamic=False)
        x, y = batch_with_documents(cfg.vocab_size, TOKENS // SEQ, SEQ)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for _ in range(STEPS_WARM):
            step()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        times = sorted(time_steps(step, STEPS_TIMED))
        ms = times[len(times) // 2]
        peak = peak_memory_mb(step)
        parts, top_kernels = breakdown(step)
        flops = flops_per_token(model, cfg) * TOKENS
    name = "train_step_looped" if looped else "train_step"
    impl = ("pgolf" if mode == "auto" else "compile") + ("-blocks" if scope == "blocks" else "")
    shape = f"11L512d sp8192 {TOKENS}tok virt{model.virtual_layers()}"
    r = row(name, impl, shape, ms, flops=flops, ceilings=ceilings, tokens_per_s=round(TOKENS / ms * 1e3),
            mfu=round(flops / ms / 1e9 / ceilings["tflops"], 3), peak_mem_mb=round(peak), warmup_s=round(warm_s, 1),
            breakdown=parts, top_kernels=top_kernels)
    return r


CASES = {"plain:pgolf": (False, "auto", "model"), "looped:pgolf": (True, "auto", "model"),
         "plain:pgolf-blocks": (False, "auto", "blocks"), "plain:compile": (False, "reference", "model"),
         "looped:compile": (True, "reference", "model")}
"""name -> (recurrence on, PGOLF_KERNELS, compile scope: whole model or regional, see GPT.compile_blocks)."""
RECOMPILE_LIMIT = 64
"""Each case compiles a fresh model through the same code objects. Under the default limit (8) the third case's
blocks ran partly eager (looped step 257 ms against 174 ms measured alone, H100 2026-11-25); torch._dynamo.reset()
between cases instead broke the reference cases' cached FlexAttention helpers."""


def run(ceilings: dict) -> list[dict]:
    """All four cases, or those named in PGOLF_STEP_CASES (comma list of CASES keys)."""
    names = [n for n in os.environ.get("PGOLF_STEP_CASES", ",".join(CASES)).split(",") if n]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    rows = []
    for name in names:
        looped, mode, scope = CASES[name]
        try:
            r = bench_one(looped, mode, ceilings, scope)
        except Exception as exc:  # one failing case must not lose the others' rows
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            continue
        finally:
            torch.cuda.empty_cache()  # the case's model and optimizer are gone with bench_one's frame
        print(f"{r['bench']:18s} {r['impl']:8s} {r['median_ms']:8.2f} ms  {r['tokens_per_s']:>9,} tok/s  "
              f"MFU {r['mfu']:.3f}  peak {r['peak_mem_mb']} MB  {r['breakdown']}", flush=True)
        rows.append(r)
    return rows
