"""Dequantization of GGUF tensor data (numpy, vectorized over blocks).

Supported ggml types and their block layouts (bytes per block / values per block):

  F32, F16, BF16                      plain
  Q8_0  34 / 32    d:f16, q:i8[32]                      x = d*q
  Q4_0  18 / 32    d:f16, q:u4[32]                      x = d*(q-8)
  Q4_1  20 / 32    d:f16, m:f16, q:u4[32]               x = d*q + m
  Q4_K 144 / 256   d, dmin:f16, scales:u8[12], q:u4[256]           8 sub-blocks of 32,
  Q5_K 176 / 256   d, dmin:f16, scales:u8[12], qh:u8[32], q:u4[256]  6-bit scale and min each
  Q6_K 210 / 256   ql:u8[128], qh:u8[64], scales:i8[16], d:f16     16 sub-blocks of 16

4-bit values are packed two per byte: in Q4_0/Q4_1 the low nibbles hold the
first half of the block and the high nibbles the second half; the K-quants
do the same per group of 64 values (32 bytes).

Why not ``gguf.quants.dequantize``: this module is kept because it is measurably
faster on the default model's file (SmolLM2-135M-Instruct.Q4_1.gguf: 210 Q4_1, 1 Q8_0,
61 F32 tensors): dequantizing the whole file takes 0.74 s here vs 1.61 s with
gguf.quants (2.2x; min of 11 repeats; median 1.24 vs 1.96 s, 1.6x; Q4_1, 69% of
the bytes, 2.0x / 1.9x; the single Q8_0 tensor swings with the machine's load) on a
2-core CPU VM shared with other jobs (load average 7-9), in
benchmarks/results/gguf_dequant_cpu_2core.json, from
``python scripts/bench_gguf_dequant.py --repeats 11 --output benchmarks/results/gguf_dequant_cpu_2core.json``.
The results are bit-identical: the benchmark checks every tensor of the file, and
tests/models/test_loaders.py checks every type here against gguf.quants on random blocks.
"""
from __future__ import annotations

import numpy as np

# ggml type ids (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 13, 14, 30
NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1",
         Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
# (values per block, bytes per block)
BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q4_0: (32, 18), Q4_1: (32, 20),
         Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}


def _f16(b: np.ndarray) -> np.ndarray:
    """u8[..., 2] -> f32[...]"""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """u8[n, k] -> u8[n, 2k]: low nibbles then high nibbles."""
    return np.concatenate([q & 0x0F, q >> 4], axis=-1)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K packed scales u8[n, 12] -> (scale u8[n, 8], min u8[n, 8]), 6 bits each."""
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _q8_0(b):
    # the ufunc casts int8 -> f32 in its own small buffers: no f32 copy of the whole tensor
    out = np.empty((b.shape[0], 32), np.float32)
    return np.multiply(b[:, 2:].view(np.int8), _f16(b[:, 0:2])[:, None], out=out)


def _q4_0(b):
    return _f16(b[:, 0:2])[:, None] * (_nibbles(b[:, 2:]).astype(np.float32) - 8.0)


def _q4_1(b):
    out = np.empty((b.shape[0], 32), np.float32)
    np.multiply(_nibbles(b[:, 4:]), _f16(b[:, 0:2])[:, None], out=out)       # d * q
    out += _f16(b[:, 2:4])[:, None]                                          # + m
    return out


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    q = b[:, 16:144].reshape(n, 4, 32)                                  # 4 groups of 64 values
    vals = np.stack([q & 0x0F, q >> 4], axis=2).reshape(n, 8, 32)       # sub-block j = 2g + hi
    out = (d[:, None] * sc)[:, :, None] * vals - (dmin[:, None] * mn)[:, :, None]
    return out.reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]                                                    # u8[n, 32]
    q = b[:, 48:176].reshape(n, 4, 32)
    lo = np.stack([q & 0x0F, q >> 4], axis=2).reshape(n, 8, 32)
    bits = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1   # sub-block j uses bit j
    vals = lo.astype(np.float32) + 16.0 * bits
    out = (d[:, None] * sc)[:, :, None] * vals - (dmin[:, None] * mn)[:, :, None]
    return out.reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)                                  # two halves of 128 values
    qh = b[:, 128:192].reshape(n, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 8)
    d = _f16(b[:, 208:210])
    parts = [(ql[:, :, :32] & 0x0F) | (((qh >> 0) & 3) << 4),
             (ql[:, :, 32:] & 0x0F) | (((qh >> 2) & 3) << 4),
             (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4),
             (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)]
    q = np.stack(parts, axis=2).astype(np.float32) - 32.0               # [n, 2, 4, 32]
    scale = sc.reshape(n, 2, 4, 2)                                      # 16 values share a scale
    q = q.reshape(n, 2, 4, 2, 16) * scale[..., None]
    return (d[:, None] * q.reshape(n, 256))


_DEQUANT = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], what: str = "tensor") -> np.ndarray:
    """Raw bytes of one tensor -> f32 array of numpy ``shape`` (row-major, GGUF dims reversed)."""
    if ggml_type not in BLOCK:
        raise ValueError(f"{what}: unsupported GGUF tensor type {ggml_type} "
                         f"(supported: {', '.join(NAMES.values())})")
    n = int(np.prod(shape))
    per, nbytes = BLOCK[ggml_type]
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if n % per or raw.size != n // per * nbytes:
        raise ValueError(f"{what}: {NAMES[ggml_type]} data has {raw.size} bytes, expected "
                         f"{n // per * nbytes} for shape {shape} (truncated or corrupt file?)")
    if ggml_type == F32:
        out = raw.view(np.float32)
    elif ggml_type == F16:
        out = raw.view(np.float16).astype(np.float32)
    elif ggml_type == BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        out = _DEQUANT[ggml_type](raw.reshape(-1, nbytes)).astype(np.float32, copy=False)
    return out.reshape(shape)
