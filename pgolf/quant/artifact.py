"""The artifact: quantized codes + scales + metadata + small tensors, compressed, checksummed, size-accounted.

Container (little endian):
    b"PGQA" | version u8 | stream count u8
    per stream: name (8 bytes, NUL padded) | codec u8 | method u8 | raw length u32 | stored length u32 | crc32(raw) u32
    stored payloads, in header order
    crc32 of everything above (u32)

Streams, each compressed on its own with whatever makes it smallest ("per-group" compression):
    meta  JSON: model metadata, state_dict order, tied-weight aliases, one record per tensor
    sym   codes of all quantized tensors (uint8 code = q + 2^(bits-1)), tensor after tensor
    ctx   rANS context maps (row/column group ids, 4 bits each) of the tensors that use them
    f16   row scales, AWQ factors, LQER group scales, small tensors stored as fp16
    lqer  LQER factor codes, bit-packed
    raw   small tensors kept in their own dtype (fp32 gains, integer buffers)
Symbol codecs: plain bytes, rows sorted by scale (the order is recomputed from the stored scales, so it costs
nothing), bit-packed, or rANS with per-tensor (row group x column group) frequency tables; fp16 streams may be
byte-shuffled (high bytes, then low bytes). Offsets are implicit: the loader walks tensors in the same order.

Size accounting: artifact bytes + code bytes must stay within the budget (16,000,000); an artifact over it is
refused before anything is written unless `report_only`.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.quant import compress as cz
from pgolf.quant.bits import pack_bits, packed_nbytes, unpack_bits
from pgolf.quant.config import QuantConfig
from pgolf.quant.gptq import QTensor, dequantize, select_weights
from pgolf.quant.lqer import LQERFactors

MAGIC = b"PGQA"
VERSION = 1
BUDGET_BYTES = 16_000_000
_STREAM_HEADER = struct.Struct("<8sBBIII")
_METHODS = ["none", "zstd", "lzma", "brotli", "zlib"]  # index stored in each stream header: append only
# what compressor="best" tries (zlib-9 is only there to reproduce the naive baseline: never smaller than zstd-22)
BEST_METHODS = ("zstd", "lzma", "brotli")
_CODECS = ["plain", "rowsort", "packed", "rans", "shuffle"]
_GROUP_CHOICES = [(1, 1), (1, 4), (4, 1), (4, 4), (1, 16), (16, 1)]
_FP16_MAX = 65504.0


class ArtifactError(ValueError):
    """The artifact cannot be read: not ours, truncated, or corrupted."""


class ArtifactTooLarge(ArtifactError):
    """Model bytes + code bytes exceed the budget."""


@dataclass
class QuantizedModel:
    """A model's state in stored form: QTensors, small tensors as stored, and what rebuilds the state_dict."""
    tensors: dict[str, QTensor]
    small: dict[str, torch.Tensor]
    dtypes: dict[str, str]          # original dtype of each small tensor
    order: list[str]                # state_dict key order
    aliases: dict[str, str] = field(default_factory=dict)  # tied names -> stored name
    meta: dict[str, Any] = field(default_factory=dict)

    def state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The dequantized state_dict (tied names share one tensor), as the loaded model will see it."""
        out: dict[str, torch.Tensor] = {}
        for name in self.order:
            if name in self.aliases:
                continue
            if name in self.tensors:
                qt = self.tensors[name]
                out[name] = dequantize(qt, device).to(getattr(torch, qt.dtype))
            else:
                out[name] = self.small[name].to(device=device, dtype=getattr(torch, self.dtypes[name]))
        for name, target in self.aliases.items():
            out[name] = out[target]
        return {n: out[n] for n in self.order}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def find_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the same storage view as an earlier name (tied weights)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in state_dict.items():
        if t.numel() == 0:
            continue
        key = (t.device.type, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def small_storage(name: str, t: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """fp16 for float tensors that fit it, unless kept fp32 by pattern; other dtypes unchanged."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        return t.clone()
    if any(p in name for p in cfg.patterns("keep_fp32_patterns")):
        return t.float().clone()
    finite = torch.isfinite(t).all() and (t.numel() == 0 or float(t.float().abs().max()) <= _FP16_MAX)
    return t.half() if finite else t.float().clone()


def build_quantized_model(state_dict: dict[str, torch.Tensor], qtensors: dict[str, QTensor], cfg: QuantConfig,
                          meta: dict[str, Any] | None = None) -> QuantizedModel:
    skip = cfg.patterns("skip_patterns")
    aliases = find_aliases(state_dict)
    order = [n for n in state_dict if not any(p in n for p in skip)]
    small, dtypes = {}, {}
    for name in order:
        if name in aliases or name in qtensors:
            continue
        small[name] = small_storage(name, state_dict[name], cfg)
        dtypes[name] = _dtype_name(state_dict[name].dtype)
    missing = [n for n in qtensors if n not in order]
    if missing:
        raise ValueError(f"build_quantized_model: quantized tensors not in the state_dict: {missing}")
    return QuantizedModel(dict(qtensors), small, dtypes, order, {n: aliases[n] for n in order if n in aliases},
                          dict(meta or {}))


# ------------------------------------------------------------------------------------------ streams

def _codes(qt: QTensor) -> np.ndarray:
    return (qt.q.numpy().astype(np.int16) + (1 << (qt.bits - 1))).astype(np.uint8)


def _row_order(scale: np.ndarray) -> np.ndarray:
    return np.argsort(scale.astype(np.float32), kind="stable")


def _group_ids(stat: np.ndarray, groups: int) -> np.ndarray:
    ranks = np.empty(stat.size, dtype=np.int64)
    ranks[np.argsort(stat, kind="stable")] = np.arange(stat.size)
    return (ranks * groups // max(stat.size, 1)).astype(np.uint8)


def _context_choice(codes: np.ndarray, bits: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """(row groups, col groups) with the smallest estimated rANS size, and the row/col group ids."""
    center = 1 << (bits - 1)
    mag = np.abs(codes.astype(np.int16) - center).astype(np.float32)
    row_stat, col_stat = mag.mean(axis=1), mag.mean(axis=0)
    best = None
    for gr, gc in _GROUP_CHOICES:
        if gr > codes.shape[0] or gc > codes.shape[1]:
            continue
        rid, cid = _group_ids(row_stat, gr), _group_ids(col_stat, gc)
        ctx = rid.astype(np.int64)[:, None] * gc + cid.astype(np.int64)[None, :]
        counts = np.bincount((ctx * 256 + codes).reshape(-1), minlength=gr * gc * 256).reshape(gr * gc, 256)
        used = np.count_nonzero(counts.sum(axis=0))
        cost = cz.rans_cost_bits(counts) / 8 + gr * gc * (3 + 2 * used)
        cost += (codes.shape[0] + 1) // 2 * (gr > 1) + (codes.shape[1] + 1) // 2 * (gc > 1)
        if best is None or cost < best[0]:
            best = (cost, (gr, gc), rid, cid)
    return best[1], best[2], best[3]


def _pack4(ids: np.ndarray) -> bytes:
    return pack_bits(ids.astype(np.int16) - 8, 4)


def _unpack4(data: bytes, pos: int, n: int) -> tuple[np.ndarray, int]:
    size = packed_nbytes(n, 4)
    ids = (unpack_bits(data[pos:pos + size], 4, n).astype(np.int16) + 8).astype(np.int64)
    return ids, pos + size


def _shuffle(data: bytes, width: int) -> bytes:
    a = np.frombuffer(data, dtype=np.uint8)
    return a.reshape(-1, width).T.copy().tobytes()


def _unshuffle(data: bytes, width: int) -> bytes:
    a = np.frombuffer(data, dtype=np.uint8)
    return a.reshape(width, -1).T.copy().tobytes()


def _tensor_records(qm: QuantizedModel) -> tuple[list, list]:
    qrec = []
    for name, qt in qm.tensors.items():
        lq = None if qt.lqer is None else [qt.lqer.rank, qt.lqer.a_bits, qt.lqer.b_bits, qt.lqer.group]
        qrec.append([name, list(qt.shape), qt.bits, qt.dtype, qt.awq is not None, qt.hadamard_seed, lq])
    srec = [[name, list(t.shape), _dtype_name(t.dtype), qm.dtypes[name]] for name, t in qm.small.items()]
    return qrec, srec


def _raw_streams(qm: QuantizedModel) -> dict[str, bytes]:
    f16, raw, lqer = [], [], []
    for qt in qm.tensors.values():
        f16.append(qt.scale.numpy().astype("<f2").tobytes())
    for qt in qm.tensors.values():
        if qt.awq is not None:
            f16.append(qt.awq.numpy().astype("<f2").tobytes())
        if qt.lqer is not None:
            f = qt.lqer
            f16.append(f.a_scale.numpy().astype("<f2").tobytes() + f.b_scale.numpy().astype("<f2").tobytes())
            lqer.append(pack_bits(f.a_q.numpy(), f.a_bits) + pack_bits(f.b_q.numpy(), f.b_bits))
    for t in qm.small.values():
        (f16 if t.dtype == torch.float16 else raw).append(
            t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"f16": b"".join(f16), "raw": b"".join(raw), "lqer": b"".join(lqer)}


def _symbol_variants(qm: QuantizedModel, codec: str) -> tuple[bytes, bytes, dict]:
    """(bytes to compress, ctx stream, codec info) of the symbol stream under one codec."""
    parts, ctx_parts, info = [], [], {}
    if codec == "rans":
        syms, ctxs, base = [], [], 0
        for name, qt in qm.tensors.items():
            codes = _codes(qt)
            (gr, gc), rid, cid = _context_choice(codes, qt.bits)
            info[name] = [gr, gc]
            if gr > 1:
                ctx_parts.append(_pack4(rid))
            if gc > 1:
                ctx_parts.append(_pack4(cid))
            ctx = base + rid.astype(np.int32)[:, None] * gc + cid.astype(np.int32)[None, :]
            syms.append(codes.reshape(-1))
            ctxs.append(ctx.reshape(-1))
            base += gr * gc
        sym = np.concatenate(syms) if syms else np.zeros(0, np.uint8)
        ctx = np.concatenate(ctxs) if ctxs else np.zeros(0, np.int32)
        return cz.rans_encode(sym, ctx, max(base, 1)), b"".join(ctx_parts), info
    for qt in qm.tensors.values():
        codes = _codes(qt)
        if codec == "rowsort":
            codes = codes[_row_order(qt.scale.numpy())]
        if codec == "packed":
            parts.append(pack_bits(qt.q.numpy(), qt.bits))
        else:
            parts.append(codes.tobytes())
    return b"".join(parts), b"", info


def _candidates(kind: str, compressor: str) -> list[tuple[str, str]]:
    """(codec, method) pairs tried for a stream kind under the `compressor` setting."""
    available = cz.available_methods()
    methods = [m for m in BEST_METHODS if m in available]
    if compressor not in ("best", "rans"):
        have = [m for m in available if m != "none"]
        if compressor not in have:
            raise ArtifactError(f"compressor {compressor!r} is not available here (have {have})")
        methods = [compressor]
    if kind == "sym":
        pairs = [("rans", "none")] if compressor in ("best", "rans") else []
        if compressor != "rans":
            pairs += [(c, m) for c in ("plain", "rowsort", "packed") for m in methods]
        return pairs
    if kind == "f16":
        return [(c, m) for c in ("plain", "shuffle") for m in methods] + [("plain", "none")]
    return [("plain", m) for m in methods] + [("plain", "none")]


def _encode_stream(raw: bytes, codec: str, method: str) -> bytes:
    """Compress one stream; `codec` here only says whether to byte-shuffle first (fp16 streams)."""
    data = _shuffle(raw, 2) if codec == "shuffle" else raw
    return cz.compress_bytes(data, method)


def _meta_bytes(qm: QuantizedModel, ctx_info: dict) -> bytes:
    qrec, srec = _tensor_records(qm)
    meta_obj = {"format": VERSION, "meta": qm.meta, "order": qm.order, "aliases": qm.aliases, "q": qrec, "s": srec,
                "ctx": ctx_info}
    return json.dumps(meta_obj, separators=(",", ":"), sort_keys=True).encode()


def build_blob(qm: QuantizedModel, compressor: str = "best", workers: int | None = None) -> tuple[bytes, dict]:
    """The artifact bytes, and a report of every tried (stream, codec, method) size.

    Candidates: per stream, every codec x method of `_candidates`; and "solid": the plain serialization (codes
    one byte each) in one inner container under one compressor, which is exactly "that compressor alone".
    """
    raw = _raw_streams(qm)
    sym_inputs: dict[str, tuple[bytes, bytes, dict]] = {}
    for codec in {c for c, _ in _candidates("sym", compressor)} | ({"plain"} if compressor != "rans" else set()):
        sym_inputs[codec] = _symbol_variants(qm, codec)
    jobs = {}
    for codec, method in _candidates("sym", compressor):
        jobs[("sym", codec, method)] = (sym_inputs[codec][0], "plain", method)
    for kind in ("f16", "raw", "lqer"):
        for codec, method in _candidates(kind, compressor):
            jobs[(kind, codec, method)] = (raw[kind], codec, method)
    if compressor != "rans":
        plain_meta = _meta_bytes(qm, {})
        inner = _container([("meta", "plain", "none", plain_meta, plain_meta)] +
                           [(k, "plain", "none", d, d) for k, d in (("sym", sym_inputs["plain"][0]),
                                                                    ("f16", raw["f16"]), ("raw", raw["raw"]),
                                                                    ("lqer", raw["lqer"]))])
        for method in {m for _, m in _candidates("sym", compressor) if m != "none"}:
            jobs[("solid", "plain", method)] = (inner, "plain", method)
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(_encode_stream, data, codec, method)
                   for key, (data, codec, method) in jobs.items()}
        results = {key: f.result() for key, f in futures.items()}
    tried = {f"{k[0]}:{k[1]}:{k[2]}": len(v) for k, v in results.items() if k[0] != "solid"}
    chosen: dict[str, tuple[str, str, bytes, int]] = {}  # kind -> (codec, method, payload, bytes of ctx maps)
    for (kind, codec, method), payload in results.items():
        if kind == "solid":
            continue
        extra = len(sym_inputs[codec][1]) if kind == "sym" else 0
        if kind not in chosen or len(payload) + extra < len(chosen[kind][2]) + chosen[kind][3]:
            chosen[kind] = (codec, method, payload, extra)
    sym_codec = chosen["sym"][0] if "sym" in chosen else "plain"
    sym_data, ctx_raw, ctx_info = sym_inputs.get(sym_codec, (b"", b"", {}))
    meta_raw = _meta_bytes(qm, ctx_info)
    meta_method, meta_stored = _smallest(meta_raw)
    ctx_method, ctx_stored = _smallest(ctx_raw)
    streams = [("meta", "plain", meta_method, meta_raw, meta_stored), ("ctx", "plain", ctx_method, ctx_raw, ctx_stored)]
    if "sym" in chosen:
        codec, method, payload, _ = chosen["sym"]
        streams.append(("sym", codec, method, payload if codec == "rans" else sym_data, payload))
    for kind in ("f16", "raw", "lqer"):
        codec, method, payload, _ = chosen[kind]
        streams.append((kind, codec, method, raw[kind], payload))
    blob = _container(streams)
    report = {"bytes": len(blob), "streams": {s[0]: {"codec": s[1], "method": s[2], "raw": len(s[3]),
                                                     "stored": len(s[4])} for s in streams},
              "tried": tried, "layout": "per-stream"}
    for (kind, _, method), payload in results.items():
        if kind != "solid":
            continue
        solid = _container([("solid", "plain", method, inner, payload)])
        tried[f"solid:{method}"] = len(solid)
        if len(solid) < len(blob):
            blob = solid
            report.update(bytes=len(blob), layout=f"solid:{method}")
    return blob, report


def _smallest(data: bytes) -> tuple[str, bytes]:
    """(method, compressed) of the smallest available compression of a small stream."""
    return min(((m, cz.compress_bytes(data, m)) for m in cz.available_methods()), key=lambda x: len(x[1]))


def _container(streams: list[tuple[str, str, str, bytes, bytes]]) -> bytes:
    head = [MAGIC, struct.pack("<BB", VERSION, len(streams))]
    for name, codec, method, raw, stored in streams:
        head.append(_STREAM_HEADER.pack(name.encode().ljust(8, b"\0"), _CODECS.index(codec), _METHODS.index(method),
                                        len(raw), len(stored), cz.crc32(raw)))
    body = b"".join(head) + b"".join(s[4] for s in streams)
    return body + struct.pack("<I", cz.crc32(body))


# ------------------------------------------------------------------------------------------ reading

def _read_container(blob: bytes) -> dict[str, tuple[str, str, int, bytes, int]]:
    if len(blob) < len(MAGIC) + 6 or blob[:4] != MAGIC:
        raise ArtifactError("not a pgolf artifact (bad magic or too short)")
    version, count = struct.unpack_from("<BB", blob, 4)
    if version != VERSION:
        raise ArtifactError(f"artifact format version {version}, this loader reads {VERSION}")
    pos = 6
    headers = []
    for _ in range(count):
        if pos + _STREAM_HEADER.size > len(blob):
            raise ArtifactError(f"artifact truncated: {len(blob)} bytes end inside the stream table")
        headers.append(_STREAM_HEADER.unpack_from(blob, pos))
        pos += _STREAM_HEADER.size
    expected = pos + sum(h[4] for h in headers) + 4
    if len(blob) < expected:
        raise ArtifactError(f"artifact truncated: {len(blob)} bytes, the header needs {expected}")
    if len(blob) > expected:
        raise ArtifactError(f"artifact has {len(blob) - expected} trailing bytes after its checksum")
    (crc,) = struct.unpack_from("<I", blob, expected - 4)
    if cz.crc32(blob[:expected - 4]) != crc:
        raise ArtifactError("artifact corrupted: whole-file checksum mismatch")
    out = {}
    for name, codec, method, raw_len, stored_len, raw_crc in headers:
        if codec >= len(_CODECS) or method >= len(_METHODS):
            raise ArtifactError(f"artifact corrupted: unknown codec/method in stream {name!r}")
        out[name.rstrip(b"\0").decode()] = (_CODECS[codec], _METHODS[method], raw_len, blob[pos:pos + stored_len],
                                             raw_crc)
        pos += stored_len
    return out


def _plain(streams: dict, name: str) -> bytes:
    if name not in streams:
        return b""
    codec, method, raw_len, stored, raw_crc = streams[name]
    try:
        data = cz.decompress_bytes(stored, method)
    except cz.CompressionError as exc:
        raise ArtifactError(f"artifact corrupted: stream {name!r}: {exc}") from exc
    if codec == "shuffle":
        data = _unshuffle(data, 2)
    _check(name, data, raw_len, raw_crc)
    return data


def _check(name: str, data: bytes, raw_len: int, raw_crc: int) -> None:
    if len(data) != raw_len or cz.crc32(data) != raw_crc:
        raise ArtifactError(f"artifact corrupted: stream {name!r} fails its length/checksum check")


class _Reader:
    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ArtifactError(f"artifact corrupted: stream {self.name!r} is shorter than its tensors need")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def f16(self, shape: tuple) -> torch.Tensor:
        n = int(np.prod(shape)) if shape else 1
        return torch.from_numpy(np.frombuffer(self.take(2 * n), dtype="<f2").copy().reshape(shape))


def parse_blob(blob: bytes) -> QuantizedModel:
    streams = _read_container(blob)
    if "solid" in streams:
        streams = _read_container(_plain(streams, "solid"))
    try:
        meta = json.loads(_plain(streams, "meta"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact corrupted: metadata is not JSON ({exc})") from exc
    f16 = _Reader(_plain(streams, "f16"), "f16")
    raw = _Reader(_plain(streams, "raw"), "raw")
    lq = _Reader(_plain(streams, "lqer"), "lqer")
    ctx = _Reader(_plain(streams, "ctx"), "ctx")
    qrec = meta["q"]
    scales = [f16.f16((rec[1][0],)) for rec in qrec]
    tensors: dict[str, QTensor] = {}
    extras = []
    for rec in qrec:
        name, (rows, cols), bits, dtype, has_awq, seed, lqer = rec
        awq = f16.f16((cols,)) if has_awq else None
        f = None
        if lqer is not None:
            rank, a_bits, b_bits, group = lqer
            a_s = f16.f16((rank, -(-rows // group)))
            b_s = f16.f16((rank, -(-cols // group)))
            a_q = unpack_bits(lq.take(packed_nbytes(rows * rank, a_bits)), a_bits, rows * rank).reshape(rows, rank)
            b_q = unpack_bits(lq.take(packed_nbytes(rank * cols, b_bits)), b_bits, rank * cols).reshape(rank, cols)
            f = LQERFactors(torch.from_numpy(a_q.copy()), a_s.half(), torch.from_numpy(b_q.copy()), b_s.half(),
                            a_bits, b_bits, group)
        extras.append((awq, seed, f))
    small = {}
    for name, shape, store, orig in meta["s"]:
        dtype = getattr(torch, store)
        n = int(np.prod(shape)) if shape else 1
        reader = f16 if dtype == torch.float16 else raw
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        buf = bytearray(reader.take(nbytes))
        small[name] = (torch.frombuffer(buf, dtype=dtype).reshape(shape).clone() if n else
                       torch.empty(shape, dtype=dtype))
    codes = _read_symbols(streams, qrec, scales, ctx, meta.get("ctx", {}))
    for rec, s, q, (awq, seed, f) in zip(qrec, scales, codes, extras):
        name, _, bits, dtype = rec[:4]
        tensors[name] = QTensor(q, s.half(), bits, dtype, awq, seed, f)
    dtypes = {name: orig for name, _, _, orig in meta["s"]}
    return QuantizedModel(tensors, small, dtypes, meta["order"], meta["aliases"], meta["meta"])


def _read_symbols(streams: dict, qrec: list, scales: list, ctx: _Reader, ctx_info: dict) -> list[torch.Tensor]:
    if "sym" not in streams:
        return []
    codec, method, raw_len, stored, raw_crc = streams["sym"]
    out = []
    if codec == "rans":
        parts, base = [], 0
        for name, (rows, cols), *_ in qrec:
            gr, gc = ctx_info[name]
            rid = _unpack4(ctx.take(packed_nbytes(rows, 4)), 0, rows)[0] if gr > 1 else np.zeros(rows, np.int64)
            cid = _unpack4(ctx.take(packed_nbytes(cols, 4)), 0, cols)[0] if gc > 1 else np.zeros(cols, np.int64)
            parts.append((base + rid[:, None] * gc + cid[None, :]).reshape(-1).astype(np.int32))
            base += gr * gc
        try:
            sym = cz.rans_decode(stored, np.concatenate(parts) if parts else np.zeros(0, np.int32))
        except cz.CompressionError as exc:
            raise ArtifactError(f"artifact corrupted: stream 'sym': {exc}") from exc
        _check("sym", stored, raw_len, raw_crc)
        data = sym.tobytes()
    else:
        try:
            data = cz.decompress_bytes(stored, method)
        except cz.CompressionError as exc:
            raise ArtifactError(f"artifact corrupted: stream 'sym': {exc}") from exc
        _check("sym", data, raw_len, raw_crc)
    reader = _Reader(data, "sym")
    for (name, (rows, cols), bits, *_), s in zip(qrec, scales):
        n = rows * cols
        if codec == "packed":
            q = unpack_bits(reader.take(packed_nbytes(n, bits)), bits, n).reshape(rows, cols)
        else:
            codes = np.frombuffer(reader.take(n), dtype=np.uint8).reshape(rows, cols)
            if codec == "rowsort":
                unsorted = np.empty_like(codes)
                unsorted[_row_order(s.numpy())] = codes
                codes = unsorted
            q = (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
        out.append(torch.from_numpy(np.ascontiguousarray(q)))
    return out


# ------------------------------------------------------------------------------------------ public API

def check_budget(model_bytes: int, code_bytes: int = 0, budget: int = BUDGET_BYTES,
                 report_only: bool = False) -> dict[str, Any]:
    """Total = model bytes + code bytes; raises ArtifactTooLarge over the budget unless `report_only`."""
    total = int(model_bytes) + int(code_bytes)
    report = {"model_bytes": int(model_bytes), "code_bytes": int(code_bytes), "total_bytes": total,
              "budget_bytes": int(budget), "headroom_bytes": int(budget) - total, "over_budget": total > budget}
    if total > budget:
        message = (f"artifact too large: model {model_bytes:,} B + code {code_bytes:,} B = {total:,} B > "
                   f"budget {budget:,} B (over by {total - budget:,} B)")
        if not report_only:
            raise ArtifactTooLarge(message + "; nothing was written (report_only reports instead)")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return report


def save_artifact(qm: QuantizedModel, path: str | os.PathLike | None, code_bytes: int = 0,
                  budget: int = BUDGET_BYTES, report_only: bool = False, compressor: str = "best") -> dict[str, Any]:
    """Build, account, and (within budget, or with `report_only`) write the artifact. Returns the report."""
    t0 = time.perf_counter()
    blob, report = build_blob(qm, compressor)
    report["build_seconds"] = time.perf_counter() - t0
    report.update(check_budget(len(blob), code_bytes, budget, report_only))
    if path is not None:
        Path(path).write_bytes(blob)
        report["path"] = str(path)
    return report


def load_artifact(source: str | os.PathLike | bytes) -> tuple[QuantizedModel, dict[str, Any]]:
    """Read an artifact (path or bytes): the QuantizedModel and {"bytes", "load_seconds"}."""
    t0 = time.perf_counter()
    blob = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    qm = parse_blob(bytes(blob))
    return qm, {"bytes": len(blob), "load_seconds": time.perf_counter() - t0}


def load_state_dict(source: str | os.PathLike | bytes,
                    device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Artifact -> dequantized state_dict (+ metadata and timing), ready for model.load_state_dict."""
    t0 = time.perf_counter()
    qm, info = load_artifact(source)
    sd = qm.state_dict(device)
    info["load_seconds"] = time.perf_counter() - t0
    info["meta"] = qm.meta
    return sd, info


def _entropy_bits(keys: np.ndarray) -> float:
    counts = np.unique(keys, return_counts=True)[1].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def code_entropy_bytes(qm: QuantizedModel) -> dict[str, int]:
    """Empirical entropy of the quantized codes (bytes), the floor of any coder with static per-context tables:
    with the rANS pipeline's row/column-group contexts, and with the previous code in the row added as context
    (a test of whether neighbouring codes carry information the pipeline leaves unused)."""
    floor = with_prev = 0.0
    for qt in qm.tensors.values():
        codes = _codes(qt).astype(np.int64)
        (_, gc), rid, cid = _context_choice(codes.astype(np.uint8), qt.bits)
        ctx = rid.astype(np.int64)[:, None] * gc + cid.astype(np.int64)[None, :]
        prev = np.zeros_like(codes)
        prev[:, 1:] = codes[:, :-1]
        floor += _entropy_bits((ctx * 256 + codes).ravel()) - _entropy_bits(ctx.ravel())
        joint = (ctx * 256 + prev) * 256 + codes
        with_prev += _entropy_bits(joint.ravel()) - _entropy_bits((ctx * 256 + prev).ravel())
    return {"codes_entropy_contexts": round(floor / 8), "codes_entropy_contexts_prev": round(with_prev / 8)}


def compressor_table(qm: QuantizedModel) -> dict[str, int]:
    """Bytes of the same model under each single compressor alone, the rANS pipeline, and the best pipeline.

    A single-compressor row compresses the whole plain serialization (codes one byte each, metadata included)
    in one piece, as a torch.save + lzma/brotli baseline would; "best" is build_blob's smallest choice; the
    `codes_entropy_*` rows are the codes' entropy floors (see code_entropy_bytes), for scale.
    """
    best_blob, report = build_blob(qm, "best")
    out = {m: report["tried"][f"solid:{m}"] for m in BEST_METHODS if f"solid:{m}" in report["tried"]}
    out["rans"] = len(build_blob(qm, "rans")[0])
    out["best"] = len(best_blob)
    out["best_layout"] = report["layout"]
    out.update(code_entropy_bytes(qm))
    return out


def export_state_dict(state_dict: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor | None],
                      cfg: QuantConfig, meta: dict[str, Any] | None = None, path: str | os.PathLike | None = None,
                      device: torch.device | str | None = None, retries: int = 6) -> tuple[QuantizedModel, dict]:
    """Quantize, pack, account and (within budget, or with report_only) write.

    Budget-driven choices (adaptive clip, mixed bits) get a byte budget for codes + row scales: the total budget
    minus code bytes minus an estimate of everything else. The real artifact then corrects that estimate: the
    quantization is redone with the symbol budget moved by the measured slack, scaled by how much the artifact
    moved per byte of symbol budget on the last retry (a secant step: the size model can be off by a factor, and
    widths move in whole tensors), up to `retries` times, stopping within 0.2% under the budget and keeping the
    largest result that fits. With a slow compressor (zstd-22 takes 15-70 s for 20 MB) the retries measure sizes
    with our rANS coder (about two seconds) times the slow/rANS ratio of the last real compression, compress for
    real on the first try and when the estimate fits (while nothing that fits is in hand, or within the window),
    and stop within 1% under the budget (the ratio moves ~0.5% between allocations).

    Fixed widths over the budget: with `over_budget="mixed"` (and not `report_only`) the export says so and is
    redone with widths chosen per tensor under the budget, from bits_choices up to the widest configured class
    (so a tensor may get more bits than its class had, where the allocator finds the bytes cut the most error),
    coded by our rANS coder whatever the configured compressor: its size is what the size model predicts (within
    0.1%), while zstd-22's size rose by 12 kB where rANS fell by 233 kB between two width mixes, so a zstd-sized
    search took 6 passes of ~60 s (CPU, pr578 at full size; notes/quant.md). The report's
    `over_budget_fallback` records it. Otherwise, or when even that does not fit, ArtifactTooLarge.
    """
    qm, blob, report, qreport = _export_within_budget(state_dict, hessians, cfg, meta, device, retries)
    over = len(blob) + cfg.code_bytes > cfg.artifact_budget_bytes
    if over and cfg.over_budget == "mixed" and not cfg.report_only and not cfg.mixed_bits:
        widest = max(cfg.attn_bits, cfg.mlp_bits, cfg.embed_bits)
        choices = [b for b in cfg.bits_choice_list() if b <= widest] or [widest]
        fallback = cfg.replace(mixed_bits=True, bits_choices=",".join(map(str, choices)), compressor="rans")
        print(f"pgolf quant: the fixed widths give {len(blob) + cfg.code_bytes:,} B > budget "
              f"{cfg.artifact_budget_bytes:,} B; quantizing again with widths per tensor from {choices} under the "
              f"budget, coded by rANS (quant.over_budget=mixed; quant.over_budget=error refuses instead)", flush=True)
        fixed_bytes = len(blob)
        qm, blob, report, qreport = _export_within_budget(state_dict, hessians, fallback, meta, device, retries)
        report["over_budget_fallback"] = {"fixed_model_bytes": fixed_bytes, "bits_choices": choices,
                                          "compressor": "rans"}
    report["quant"] = qreport
    report.update(check_budget(len(blob), cfg.code_bytes, cfg.artifact_budget_bytes, cfg.report_only))
    if path is not None:
        Path(path).write_bytes(blob)
        report["path"] = str(path)
    return qm, report


def _export_within_budget(state_dict: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor | None],
                          cfg: QuantConfig, meta: dict[str, Any] | None, device: torch.device | str | None,
                          retries: int) -> tuple[QuantizedModel, bytes, dict, dict]:
    """(quantized model, blob, blob report, quantization report): one pass, or the budget search described in
    export_state_dict for budget-driven choices (the smallest result when none fits)."""
    from pgolf.quant.gptq import quantize_weights

    aliases = find_aliases(state_dict)
    weights = {n: state_dict[n] for n in select_weights(state_dict, cfg) if n not in aliases}
    budget = cfg.artifact_budget_bytes - cfg.code_bytes
    widest = max((w.shape[0] + w.shape[1] for w in weights.values()), default=0)
    lqer = cfg.lqer_top_k * cfg.lqer_rank * widest * (max(cfg.lqer_a_bits, cfg.lqer_b_bits) / 8 + 2 / cfg.lqer_group)
    other = sum(2 * t.numel() for n, t in state_dict.items() if n not in weights and n not in aliases)
    symbol_budget = float(budget - other - lqer - 1024)
    budget_driven = cfg.mixed_bits or cfg.clip_mode == "adaptive"
    proxy = budget_driven and cfg.compressor != "rans"
    attempts = retries + 1 if budget_driven else 1
    window = 0.01 if proxy else 0.002  # the slow/rANS ratio moves ~0.5% between allocations
    best, previous, ratio = None, None, 1.0
    for attempt in range(attempts):
        qtensors, qreport = quantize_weights(weights, hessians, cfg, symbol_budget=symbol_budget, device=device)
        qm = build_quantized_model(state_dict, qtensors, cfg, meta)
        fast = len(build_blob(qm, "rans")[0]) if proxy else 0
        estimate = ratio * fast
        best_fits = best is not None and len(best[1]) <= budget
        if (not proxy or previous is None or (attempt == attempts - 1 and not best_fits)
                or (estimate <= budget and (not best_fits or budget - estimate <= window * budget))):
            blob, report = build_blob(qm, cfg.compressor)
            ratio = len(blob) / fast if proxy else 1.0
            size = len(blob)
            if (best is None or (size <= budget and (not best_fits or size > len(best[1])))
                    or (size > budget and not best_fits and size < len(best[1]))):
                best = (qm, blob, report, qreport)
            if 0 <= budget - size <= window * budget:
                break
        # the secant runs on what responds smoothly to the symbol budget: the artifact itself, or with a slow
        # compressor the rANS size against the budget over the last measured slow/rANS ratio (that ratio jumps
        # with the mix of widths: zstd-22 over rANS was 1.022 with 59 int5 tensors and 1.038 with 54)
        measured, target = (fast, budget / ratio) if proxy else (len(blob), budget)
        response = 1.0
        if previous is not None and symbol_budget != previous[0]:
            response = min(max((measured - previous[1]) / (symbol_budget - previous[0]), 0.1), 1.0)
        previous = (symbol_budget, measured)
        symbol_budget += (target - measured - 0.0005 * target) / response
    return best
