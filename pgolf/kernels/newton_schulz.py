"""Newton-Schulz orthogonalization for Muon: X <- aX + (bA + cA^2)X with A = X X^T, on X = G/||G||_F.

Tall matrices are transposed first so that A is the small Gram matrix. G is (m, n) or a batch (B, m, n).

The Triton path runs each step as three grouped launches over every matrix of every shape at once:
  gram:   A = X X^T            lower-triangle tiles only, each stored twice (tile and mirror)
  poly:   B = bA + c A A       lower-triangle tiles only (A A = A A^T, since A is symmetric), mirrored
  update: X' = aX + B X        all tiles, aX fused into the epilogue
bf16 operands, fp32 accumulation. A program reads its (matrix, tile) from a table, so matrices of several
shapes share a launch. The Frobenius normalization costs no pass of its own: the first step works on the raw
G, and poly/update of that step read ||G||_F^2 = trace(G G^T) off the diagonal of A and scale by it.
`NewtonSchulzPlan` owns fixed buffers for a set of shapes and replays all launches as one CUDA graph.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from pgolf.kernels.dispatch import use_triton

CLASSIC = ((3.4445, -4.7750, 2.0315),) * 5
POLAR_EXPRESS = (
    (8.1566, -22.4833, 15.8788),
    (4.0429, -2.8089, 0.5000),
    (3.8917, -2.7725, 0.5061),
    (3.2858, -2.3681, 0.4645),
    (2.3465, -1.7098, 0.4232),
)
SCHEDULES = {"classic": CLASSIC, "polar_express": POLAR_EXPRESS}
EPS = 1e-7


def coefficients(schedule: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """Per-step (a, b, c); a schedule shorter than `steps` repeats its last tuple."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown Newton-Schulz schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    table = SCHEDULES[schedule]
    return tuple(table[min(i, len(table) - 1)] for i in range(steps))


def newton_schulz_reference(g: torch.Tensor, steps: int = 5, schedule: str = "polar_express",
                            eps: float = EPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients(schedule, steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def newton_schulz(g: torch.Tensor, steps: int = 5, schedule: str = "polar_express") -> torch.Tensor:
    """The orthogonalization Muon calls: Triton on CUDA, the reference elsewhere. Returns bf16."""
    if g.dim() not in (2, 3):
        raise ValueError(f"newton_schulz: expected (m, n) or (B, m, n), got shape {tuple(g.shape)}")
    if use_triton(g) and g.numel() > 0:
        # The interpreter's bf16 dot is wrong: off the GPU the kernels run in fp32 and round at the end.
        return newton_schulz_triton(g, steps, schedule, torch.bfloat16 if g.is_cuda else torch.float32
                                    ).to(torch.bfloat16)
    return newton_schulz_reference(g, steps, schedule)


def newton_schulz_triton(g: torch.Tensor, steps: int = 5, schedule: str = "polar_express",
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One batch through the Triton kernels (no graph); `dtype` is the operand dtype (fp32/fp16 for the
    interpreter tests, bf16 on the GPU)."""
    batched = g if g.dim() == 3 else g.unsqueeze(0)
    plan = NewtonSchulzPlan([tuple(batched.shape)], steps, schedule, device=g.device, dtype=dtype, graph=False)
    plan.inputs[0].copy_(batched)
    (out,) = plan.run()
    return out if g.dim() == 3 else out[0]


# ---- Triton kernels ----------------------------------------------------------------------------------------
# Matrix table, one int64 row per matrix: offset of X in the X workspaces, offset of A/B in the A/B
# workspaces, rows m and columns n (m <= n: the wide orientation), leading dimensions of X and A.
# Leading dimensions are multiples of ALIGN elements (>= any tile edge), so offsets and rows are aligned.
NCOL = 6
ALIGN = 256

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path needs no Triton
    triton = None

if triton is not None:

    @triton.jit
    def _tile_info(MATS, TILES, pid):
        mat = tl.load(TILES + pid * 3)
        ti = tl.load(TILES + pid * 3 + 1)
        tj = tl.load(TILES + pid * 3 + 2)
        info = MATS + mat * 6
        x_off = tl.multiple_of(tl.load(info + 0), 16)
        a_off = tl.multiple_of(tl.load(info + 1), 16)
        m = tl.load(info + 2)
        n = tl.load(info + 3)
        ldx = tl.multiple_of(tl.load(info + 4), 16)
        lda = tl.multiple_of(tl.load(info + 5), 16)
        return ti, tj, x_off, a_off, m, n, ldx, lda

    @triton.jit
    def _inv_norm_sq(A, a_off, m, lda, EPS_: tl.constexpr, DB: tl.constexpr):
        """1/(||G||_F + eps)^2 from the diagonal of the raw Gram matrix A = G G^T."""
        acc = tl.zeros((DB,), tl.float32)
        for d0 in range(0, m, DB):
            d = d0 + tl.arange(0, DB)
            acc += tl.load(A + a_off + d * (lda + 1), mask=d < m, other=0.0).to(tl.float32)
        inv = 1.0 / (tl.sqrt(tl.sum(acc)) + EPS_)
        return inv * inv

    # Masks only ever test rows: columns past m or n lie in the zero padding of the workspaces (leading
    # dimensions are multiples of ALIGN >= every tile), so loads and stores along rows stay unmasked and wide.
    # What the kernels store into padding columns is always zero, so the padding stays zero.

    @triton.jit
    def _sym_store(OUT, off, ld, rows_i, rows_j, m, val, ti, tj):
        tl.store(OUT + off + rows_i[:, None] * ld + rows_j[None, :], val, mask=rows_i[:, None] < m)
        if ti != tj:
            tl.store(OUT + off + rows_j[:, None] * ld + rows_i[None, :], tl.trans(val), mask=rows_j[:, None] < m)

    @triton.jit
    def _ns_gram(X, A, MATS, TILES, BS: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
        """A = X X^T, lower-triangle tile (ti >= tj) and its mirror."""
        ti, tj, x_off, a_off, m, n, ldx, lda = _tile_info(MATS, TILES, tl.program_id(0))
        rows_i = ti * BS + tl.arange(0, BS)
        rows_j = tj * BS + tl.arange(0, BS)
        pi = X + x_off + rows_i[:, None] * ldx + tl.arange(0, BK)[None, :]
        pj = X + x_off + rows_j[:, None] * ldx + tl.arange(0, BK)[None, :]
        acc = tl.zeros((BS, BS), tl.float32)
        for _ in range(0, tl.cdiv(n, BK)):
            xi = tl.load(pi, mask=rows_i[:, None] < m, other=0.0)
            xj = tl.load(pj, mask=rows_j[:, None] < m, other=0.0)
            if IEEE:
                acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee")
            else:
                acc = tl.dot(xi, tl.trans(xj), acc)
            pi += BK
            pj += BK
        _sym_store(A, a_off, lda, rows_i, rows_j, m, acc.to(A.dtype.element_ty), ti, tj)

    @triton.jit
    def _ns_poly(A, B, MATS, TILES, a, b, c, FIRST: tl.constexpr, FOLD: tl.constexpr, BS: tl.constexpr,
                 BK: tl.constexpr, IEEE: tl.constexpr, EPS_: tl.constexpr):
        """B = b*A + c*A A (A symmetric, so A A = A A^T), lower-triangle tile and mirror; FOLD adds a*I, so
        that the update is one product. FIRST: A is the raw Gram matrix of G, scaled by 1/||G||^2 here."""
        ti, tj, x_off, a_off, m, n, ldx, lda = _tile_info(MATS, TILES, tl.program_id(0))
        rows_i = ti * BS + tl.arange(0, BS)
        rows_j = tj * BS + tl.arange(0, BS)
        pi = A + a_off + rows_i[:, None] * lda + tl.arange(0, BK)[None, :]
        pj = A + a_off + rows_j[:, None] * lda + tl.arange(0, BK)[None, :]
        acc = tl.zeros((BS, BS), tl.float32)
        for _ in range(0, tl.cdiv(m, BK)):
            ai = tl.load(pi, mask=rows_i[:, None] < m, other=0.0)
            aj = tl.load(pj, mask=rows_j[:, None] < m, other=0.0)
            if IEEE:
                acc = tl.dot(ai, tl.trans(aj), acc, input_precision="ieee")
            else:
                acc = tl.dot(ai, tl.trans(aj), acc)
            pi += BK
            pj += BK
        a_tile = tl.load(A + a_off + rows_i[:, None] * lda + rows_j[None, :], mask=rows_i[:, None] < m,
                         other=0.0).to(tl.float32)
        if FIRST:
            s2 = _inv_norm_sq(A, a_off, m, lda, EPS_, 128)
            val = (b * s2) * a_tile + (c * s2 * s2) * acc
        else:
            val = b * a_tile + c * acc
        if FOLD:
            val += tl.where(rows_i[:, None] == rows_j[None, :], a, 0.0)
        _sym_store(B, a_off, lda, rows_i, rows_j, m, val.to(B.dtype.element_ty), ti, tj)

    @triton.jit
    def _ns_update(X, Y, A, B, MATS, TILES, a, FIRST: tl.constexpr, FOLD: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, EPS_: tl.constexpr):
        """Y = a*X + B X for one (BM, BN) tile (FOLD: B holds a*I + B, Y = B X). FIRST: X is the raw G, so the
        result is scaled by 1/||G||."""
        ti, tj, x_off, a_off, m, n, ldx, lda = _tile_info(MATS, TILES, tl.program_id(0))
        rows = ti * BM + tl.arange(0, BM)
        cols = tj * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        pb = B + a_off + rows[:, None] * lda + ks[None, :]
        px = X + x_off + ks[:, None] * ldx + cols[None, :]
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, tl.cdiv(m, BK) * BK, BK):
            bt = tl.load(pb, mask=rows[:, None] < m, other=0.0)
            xt = tl.load(px, mask=(k0 + ks)[:, None] < m, other=0.0)
            if IEEE:
                acc = tl.dot(bt, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(bt, xt, acc)
            pb += BK
            px += BK * ldx
        mask = rows[:, None] < m
        if FOLD:
            val = acc
        else:
            x_tile = tl.load(X + x_off + rows[:, None] * ldx + cols[None, :], mask=mask, other=0.0)
            val = a * x_tile.to(tl.float32) + acc
        if FIRST:
            val = val * tl.sqrt(_inv_norm_sq(A, a_off, m, lda, EPS_, 128))
        tl.store(Y + x_off + rows[:, None] * ldx + cols[None, :], val.to(Y.dtype.element_ty), mask=mask)


    @triton.jit
    def _muon_direction(G, BUF, OUT, SCALE, rows_total, m, n, osb, osr, osc, momentum,
                        HAS_SCALE: tl.constexpr, NESTEROV: tl.constexpr, EQ_R: tl.constexpr,
                        R: tl.constexpr, NP: tl.constexpr):
        """R whole rows: BUF <- mu*BUF + s*G; OUT <- rownorm(s*G + mu*BUF or BUF), cast, at OUT's strides."""
        rows = tl.program_id(0) * R + tl.arange(0, R)
        cols = tl.arange(0, NP)
        mask = (rows[:, None] < rows_total) & (cols[None, :] < n)
        offs = rows[:, None].to(tl.int64) * n + cols[None, :]
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * tl.load(SCALE)
        buf = momentum * tl.load(BUF + offs, mask=mask, other=0.0) + g
        tl.store(BUF + offs, buf, mask=mask)
        if NESTEROV:
            u = g + momentum * buf
        else:
            u = buf
        if EQ_R:
            u = u / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), 1e-7)[:, None]
        b = rows // m
        i = rows % m
        out = OUT + b[:, None].to(tl.int64) * osb + i[:, None] * osr + cols[None, :] * osc
        tl.store(out, u.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _muon_apply(P, U, m, n, usb, usr, usc, decay, step, BR: tl.constexpr, BC: tl.constexpr):
        """P <- P*decay - step*U for one (BR, BC) tile of matrix program_id(0); U at its own strides."""
        b = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BR + tl.arange(0, BR)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        mask = (r[:, None] < m) & (c[None, :] < n)
        pp = P + b * m * n + r[:, None] * n + c[None, :]
        u = tl.load(U + b * usb + r[:, None] * usr + c[None, :] * usc, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(pp, mask=mask, other=0.0).to(tl.float32)
        tl.store(pp, (p * decay - step * u).to(P.dtype.element_ty), mask=mask)


def muon_direction_into(grad: torch.Tensor, buf: torch.Tensor, out: torch.Tensor, momentum: float,
                        nesterov: bool, eq_r: bool, grad_scale: torch.Tensor | None = None) -> None:
    """Fused Muon momentum and MuonEq-R: buf <- mu*buf + s*grad; out <- rownorm(s*grad + mu*buf) (Nesterov) or
    rownorm(buf), written at out's strides (e.g. a `NewtonSchulzPlan` input). grad, buf: contiguous (B, m, n)."""
    batch, m, n = buf.shape
    if not (grad.is_contiguous() and buf.is_contiguous() and buf.dtype == torch.float32):
        raise ValueError("muon_direction_into: grad and buf must be contiguous, buf fp32")
    np2 = triton.next_power_of_2(n)
    r = max(1, min(64, 8192 // np2))
    scale = grad_scale if grad_scale is not None else buf
    _muon_direction[(triton.cdiv(batch * m, r),)](
        grad, buf, out, scale, batch * m, m, n, *out.stride(), float(momentum), HAS_SCALE=grad_scale is not None,
        NESTEROV=nesterov, EQ_R=eq_r, R=r, NP=np2, num_warps=8 if np2 >= 2048 else 4)


def muon_apply(param: torch.Tensor, update: torch.Tensor, lr: float, wd: float, scale: float) -> None:
    """param <- param*(1 - lr*wd) - lr*scale*update in one pass; param contiguous (B, m, n) or (m, n)."""
    p = param.unsqueeze(0) if param.dim() == 2 else param
    u = update.reshape(p.shape) if update.dim() != 3 else update
    if not p.is_contiguous():
        raise ValueError("muon_apply: the parameter must be contiguous")
    batch, m, n = p.shape
    grid = (batch, triton.cdiv(m, 64), triton.cdiv(n, 64))
    _muon_apply[grid](p, u, m, n, *u.stride(), 1.0 - lr * wd, lr * scale, BR=64, BC=64, num_warps=4)


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


KernelConfig = dict[str, int]


@functools.lru_cache(maxsize=None)
def _default_blocks(device_type: str) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    if device_type == "cuda":
        cfg = {"gram": {"BS": 128, "BK": 64, "warps": 8, "stages": 3},
               "poly": {"BS": 128, "BK": 64, "warps": 8, "stages": 3},
               "update": {"BM": 128, "BN": 128, "BK": 64, "warps": 8, "stages": 3},
               "fold": {"on": 1}, "chunks": {"n": 1}}
    else:  # small tiles for the (slow) interpreter
        cfg = {"gram": {"BS": 16, "BK": 16, "warps": 4, "stages": 1},
               "poly": {"BS": 16, "BK": 16, "warps": 4, "stages": 1},
               "update": {"BM": 16, "BN": 32, "BK": 16, "warps": 4, "stages": 1},
               "fold": {"on": 0}, "chunks": {"n": 1}}
    return tuple((k, tuple(v.items())) for k, v in cfg.items())


def default_blocks(device_type: str, overrides: dict[str, KernelConfig] | None = None) -> dict[str, KernelConfig]:
    """Tile sizes, warps and pipeline stages per kernel ("gram", "poly", "update"), "fold" (a*I folded into B:
    no aX epilogue; measured faster on the H100, error 1.17e-2 instead of 1.12e-2 against fp64) and "chunks"
    (the matrices split into n groups launched one after the other, for L2 reuse), with `overrides` merged in."""
    out = {k: dict(v) for k, v in _default_blocks(device_type)}
    for k, v in (overrides or {}).items():
        if k not in out:
            raise ValueError(f"newton_schulz blocks: unknown kernel {k!r}; expected {sorted(out)}")
        out[k].update(v)
    return out


class NewtonSchulzPlan:
    """Newton-Schulz for a fixed list of batch shapes [(B, m, n), ...] with fixed buffers.

    Write the matrices into `plan.inputs[i]` (views of the X workspace, shape (B, m, n) each), call
    `plan.run()`, read `plan.outputs` (views valid until the next run; tall ones are transposed views, as in
    the reference). On CUDA the launches are captured into one CUDA graph on the second run.
    """

    def __init__(self, shapes: list[tuple[int, int, int]], steps: int = 5, schedule: str = "polar_express",
                 device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, graph: bool = True,
                 blocks: dict[str, KernelConfig] | None = None):
        if triton is None:
            raise RuntimeError("pgolf.kernels.newton_schulz: NewtonSchulzPlan needs Triton")
        self.device = torch.device(device)
        self.dtype = dtype
        self.coeffs = coefficients(schedule, steps)
        self.blocks = default_blocks(self.device.type, blocks)
        edges = [v for k in ("gram", "poly", "update") for key, v in self.blocks[k].items() if key.startswith("B")]
        if any(ALIGN % e for e in edges):
            raise ValueError(f"NewtonSchulzPlan: tile edges {edges} must divide ALIGN={ALIGN}")
        self.graph_enabled = graph and self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.runs = 0
        rows, x_total, a_total = [], 0, 0
        self.layout = []  # per shape: (first matrix index, B, m, n, tall, ldx, lda)
        for batch, m0, n0 in shapes:
            tall = m0 > n0
            m, n = (n0, m0) if tall else (m0, n0)
            ldx, lda = _round_up(n, ALIGN), _round_up(m, ALIGN)
            self.layout.append((len(rows), batch, m, n, tall, ldx, lda, x_total))
            for _ in range(batch):
                rows.append((x_total, a_total, m, n, ldx, lda))
                x_total += m * ldx
                a_total += m * lda
        self.mats = torch.tensor(rows, dtype=torch.int64, device=self.device).reshape(-1, NCOL)
        self.xs = [torch.zeros(max(x_total, 1), device=self.device, dtype=dtype) for _ in range(2)]
        self.a = torch.zeros(max(a_total, 1), device=self.device, dtype=dtype)
        self.b = torch.zeros_like(self.a)
        gram, poly, upd = self.blocks["gram"], self.blocks["poly"], self.blocks["update"]
        self.gram_tiles = self._tiles(lambda m, n: self._sym(m, gram["BS"], n))
        self.poly_tiles = self._tiles(lambda m, n: self._sym(m, poly["BS"], m))
        self.update_tiles = self._tiles(lambda m, n: [(i, j, m) for i in range(-(-m // upd["BM"]))
                                                      for j in range(-(-n // upd["BN"]))])
        self.inputs = [self._view(0, i) for i in range(len(self.layout))]

    @staticmethod
    def _sym(m: int, bs: int, k: int) -> list[tuple[int, int, int]]:
        nb = -(-m // bs)
        return [(i, j, k) for i in range(nb) for j in range(i + 1)]

    def _tiles(self, per_matrix: Callable[[int, int], list[tuple[int, int, int]]]) -> list[torch.Tensor]:
        """Per chunk, (matrix, ti, tj) rows for each of its matrices; longest reductions first (stable, so the
        tiles of one matrix stay together for the L2), so that short tiles fill the tail of the launch.
        Chunks split the matrices in order into groups of about equal X bytes."""
        n_chunks = self.blocks["chunks"]["n"]
        total = sum(batch * m * n for _, batch, m, n, *_ in self.layout)
        chunks: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n_chunks)]
        done = 0
        for first, batch, m, n, *_ in self.layout:
            tiles = per_matrix(m, n)
            for k in range(batch):
                chunk = min(n_chunks - 1, done * n_chunks // max(total, 1))
                chunks[chunk] += [(first + k, i, j, red) for i, j, red in tiles]
                done += m * n
        out = []
        for rows in chunks:
            if rows:
                rows.sort(key=lambda r: -r[3])
                out.append(torch.tensor([r[:3] for r in rows], dtype=torch.int32, device=self.device).reshape(-1, 3))
        return out

    def _view(self, buf: int, i: int) -> torch.Tensor:
        first, batch, m, n, tall, ldx, lda, off = self.layout[i]
        v = self.xs[buf].as_strided((batch, m, n), (m * ldx, ldx, 1), off)
        return v.mT if tall else v

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [self._view(len(self.coeffs) % 2, i) for i in range(len(self.layout))]

    def _launch(self) -> None:
        gram, poly, upd = self.blocks["gram"], self.blocks["poly"], self.blocks["update"]
        fold = bool(self.blocks["fold"]["on"])
        ieee = self.dtype == torch.float32
        opts = lambda k: {"num_warps": k["warps"], "num_stages": k["stages"]}  # noqa: E731
        for step, (a, b, c) in enumerate(self.coeffs):
            x, y = self.xs[step % 2], self.xs[(step + 1) % 2]
            first = step == 0
            for gt, pt, ut in zip(self.gram_tiles, self.poly_tiles, self.update_tiles):
                _ns_gram[(gt.shape[0],)](x, self.a, self.mats, gt, BS=gram["BS"], BK=gram["BK"], IEEE=ieee,
                                         **opts(gram))
                _ns_poly[(pt.shape[0],)](self.a, self.b, self.mats, pt, a, b, c, FIRST=first, FOLD=fold,
                                         BS=poly["BS"], BK=poly["BK"], IEEE=ieee, EPS_=EPS, **opts(poly))
                _ns_update[(ut.shape[0],)](x, y, self.a, self.b, self.mats, ut, a, FIRST=first, FOLD=fold,
                                           BM=upd["BM"], BN=upd["BN"], BK=upd["BK"], IEEE=ieee, EPS_=EPS,
                                           **opts(upd))

    def run(self) -> list[torch.Tensor]:
        """Orthogonalize what is in `inputs` now; returns `outputs`."""
        if self.graph is not None:
            self.graph.replay()
        elif self.graph_enabled and self.runs >= 1:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._launch()
            self.graph.replay()
        else:
            self._launch()
        self.runs += 1
        return self.outputs

    def as_orthogonalizer(self) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        """f(updates) -> orthogonalized updates, copying each update into the plan's inputs first."""
        def orthogonalize(updates: list[torch.Tensor]) -> list[torch.Tensor]:
            for dst, src in zip(self.inputs, updates):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            return self.run()
        return orthogonalize


def flops(shapes: list[tuple[int, int, int]], steps: int = 5, symmetric: bool = True) -> float:
    """Matmul FLOPs of `steps` iterations: 2mmn (A) + 2mmm (A A) + 2mmn (B X) per matrix, halved for the
    two symmetric products when `symmetric`."""
    total = 0.0
    for batch, m0, n0 in shapes:
        m, n = min(m0, n0), max(m0, n0)
        sym = 0.5 if symmetric else 1.0
        total += batch * steps * (sym * 2 * m * m * n + sym * 2 * m ** 3 + 2 * m * m * n)
    return total


def min_bytes(shapes: list[tuple[int, int, int]], steps: int = 5, itemsize: int = 2) -> float:
    """Fewest device-memory bytes per run if every operand of every launch is read once and written once:
    gram reads X, writes A; poly reads A, writes B; update reads B and X, writes X."""
    total = 0.0
    for batch, m0, n0 in shapes:
        m, n = min(m0, n0), max(m0, n0)
        total += batch * steps * itemsize * (m * n + m * m + m * m + m * m + m * m + 2 * m * n)
    return total

