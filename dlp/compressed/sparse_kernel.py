"""A CPU matmul on compressed weights (mask bits + kept values), compiled on first use and cached.

This file depends on torch only: it is shipped inside every compressed model that dlp exports (beside
``modeling_compressed.py``), so the model's remote code runs it without dlp.

Why the layout is what it is. A pruned weight row is stored as its mask bits (8 columns per byte, most significant
bit first) and its kept values, consecutive, in column order. Decode (one to a few tokens) is a matrix-vector
product, which reads every weight once and is bound by memory bandwidth: the dense kernel reads 4 bytes per fp32
weight, this one 1/8 byte of mask plus the kept share of the values, so at 70% sparsity it reads about a third.
Per mask byte the kernel loads the next 8 kept values, moves each to the column its bit names with one AVX2
permute (the permutation for each of the 256 byte values comes from a table), zeroes the pruned lanes, and
multiplies with the 8 columns of every token: the weights are decoded once per row for up to 8 tokens. Rows are
split across threads (``at::parallel_for``, torch's thread pool). Values are fp32, bf16, fp16, int8, or 4-bit codes
(two per byte, low nibble first) into a 16-entry codebook (bitsandbytes' NF4), the last two with scales per output
row or per group of columns.

The accumulation is in fp32 in column order within 8 lanes, so results equal ``F.linear`` up to the order of
float summation (the tests hold them to that).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from typing import Any

import torch

# value formats the kernel reads; the number is what the C++ code switches on
VALUE_KINDS = {"float32": 0, "bfloat16": 1, "float16": 2, "int8": 3, "nf4": 4}
MAX_TOKENS = 8  # above this the dense kernel on the decompressed weight is faster (it is a matrix-matrix product)
PAD_BYTES = 16  # the kernel reads up to 8 values past a row's last kept one: value buffers carry this padding

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace {

// For each mask byte (column j of the 8 is bit 7 - j): where lane j takes its value from among the 8 loaded
// consecutive kept values, and whether lane j is kept at all.
struct Table {
  alignas(32) int32_t source[256][8];
  alignas(32) int32_t keep[256][8];
  Table() {
    for (int byte = 0; byte < 256; ++byte) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool on = (byte >> (7 - lane)) & 1;
        source[byte][lane] = on ? next : 0;
        keep[byte][lane] = on ? -1 : 0;
        next += on;
      }
    }
  }
};
const Table kTable;

inline __m256 expand(__m256 values, unsigned byte) {
  const __m256i source = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.source[byte]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.keep[byte])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(values, source), keep);
}

// The 8 consecutive kept values from index k on, as floats (unscaled).
struct LoadF32 {
  const float* p;
  __m256 operator()(int64_t k) const { return _mm256_loadu_ps(p + k); }
};
struct LoadBF16 {
  const uint16_t* p;
  __m256 operator()(int64_t k) const {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
};
struct LoadF16 {
  const uint16_t* p;
  __m256 operator()(int64_t k) const {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)));
  }
};
struct LoadI8 {
  const int8_t* p;
  __m256 operator()(int64_t k) const {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
};
// 4-bit codes, two per byte, low nibble first; each code indexes a 16-entry codebook (NF4's, say)
struct LoadCode4 {
  const uint8_t* p;
  __m256 low_table, high_table;  // codebook entries 0-7 and 8-15
  __m256 operator()(int64_t k) const {
    uint64_t word;
    std::memcpy(&word, p + (k >> 1), sizeof(word));
    word >>= 4 * (k & 1);
    const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(word));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i even = _mm_and_si128(v, nibble);
    const __m128i odd = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
    const __m256i code = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(even, odd));
    const __m256 low = _mm256_permutevar8x32_ps(low_table, code);   // uses the code's low 3 bits
    const __m256 high = _mm256_permutevar8x32_ps(high_table, code);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));  // bit 3 -> sign
  }
};

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55)));
}

struct Weights {
  const uint8_t* bits;     // [out, stride]
  int64_t stride;          // bytes per row = ceil(in / 8)
  const int64_t* row_ptr;  // [out + 1]: index of each row's first kept value
  const float* scales;     // nullptr, or [out, groups]
  int64_t groups;
  int64_t group_bytes;     // columns per group / 8
};

// y[t, r] = sum_c W[r, c] x[t, c] for rows [r0, r1) and T tokens; x is [T, 8 * stride] (zero-padded columns)
template <int T, class Load>
void matmul_rows(const Weights& w, Load load, const float* x, float* y, int64_t out, int64_t r0, int64_t r1) {
  const int64_t width = 8 * w.stride;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bits = w.bits + r * w.stride;
    int64_t k = w.row_ptr[r];
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    const float* scale = w.scales ? w.scales + r * w.groups : nullptr;
    const bool grouped = scale && w.groups > 1;
    for (int64_t j = 0; j < w.stride; ++j) {
      const unsigned byte = bits[j];
      __m256 weight = expand(load(k), byte);
      k += __builtin_popcount(byte);
      if (grouped) weight = _mm256_mul_ps(weight, _mm256_set1_ps(scale[j / w.group_bytes]));
      for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(x + t * width + 8 * j), acc[t]);
    }
    const float row_scale = (scale && !grouped) ? scale[0] : 1.0f;
    for (int t = 0; t < T; ++t) y[t * out + r] = hsum(acc[t]) * row_scale;
  }
}

template <int T, class Load>
void matmul(const Weights& w, Load load, const float* x, float* y, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) { matmul_rows<T>(w, load, x, y, out, r0, r1); });
}

template <class Load>
void matmul_tokens(int tokens, const Weights& w, Load load, const float* x, float* y, int64_t out) {
  switch (tokens) {
    case 1: return matmul<1>(w, load, x, y, out);
    case 2: return matmul<2>(w, load, x, y, out);
    case 3: return matmul<3>(w, load, x, y, out);
    case 4: return matmul<4>(w, load, x, y, out);
    case 5: return matmul<5>(w, load, x, y, out);
    case 6: return matmul<6>(w, load, x, y, out);
    case 7: return matmul<7>(w, load, x, y, out);
    case 8: return matmul<8>(w, load, x, y, out);
  }
  TORCH_CHECK(false, "dlp sparse kernel: 1 to 8 tokens, got ", tokens);
}

// every weight of rows [r0, r1), scaled, into dense [out, 8 * stride]
template <class Load>
void decompress_rows(const Weights& w, Load load, float* dense, int64_t r0, int64_t r1) {
  const int64_t width = 8 * w.stride;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bits = w.bits + r * w.stride;
    int64_t k = w.row_ptr[r];
    const float* scale = w.scales ? w.scales + r * w.groups : nullptr;
    for (int64_t j = 0; j < w.stride; ++j) {
      const unsigned byte = bits[j];
      __m256 weight = expand(load(k), byte);
      k += __builtin_popcount(byte);
      if (scale) weight = _mm256_mul_ps(weight, _mm256_set1_ps(scale[j / w.group_bytes]));
      _mm256_storeu_ps(dense + r * width + 8 * j, weight);
    }
  }
}

Weights weights_of(const torch::Tensor& bits, const torch::Tensor& row_ptr, const torch::Tensor& scales,
                   int64_t group_size) {
  TORCH_CHECK(bits.dtype() == torch::kUInt8 && bits.dim() == 2 && bits.is_contiguous(), "bits: uint8 [out, stride]");
  TORCH_CHECK(row_ptr.dtype() == torch::kInt64 && row_ptr.numel() == bits.size(0) + 1, "row_ptr: int64 [out + 1]");
  Weights w{bits.data_ptr<uint8_t>(), bits.size(1), row_ptr.data_ptr<int64_t>(), nullptr, 1, bits.size(1)};
  if (scales.numel()) {
    TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 2 &&
                    scales.size(0) == bits.size(0), "scales: float32 [out, groups]");
    TORCH_CHECK(group_size % 8 == 0 && group_size > 0, "group_size: a positive multiple of 8");
    w.scales = scales.data_ptr<float>();
    w.groups = scales.size(1);
    w.group_bytes = group_size / 8;
    TORCH_CHECK(w.groups == (w.stride + w.group_bytes - 1) / w.group_bytes, "scales: one per group of columns");
  }
  return w;
}

template <class Body>
void with_loader(const torch::Tensor& values, int64_t kind, const torch::Tensor& codebook, Body body) {
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "values: contiguous 1-D");
  if (kind == 4) {
    TORCH_CHECK(codebook.dtype() == torch::kFloat32 && codebook.numel() == 16 && codebook.is_contiguous(),
                "codebook: float32 [16]");
    const float* table = codebook.data_ptr<float>();
    return body(LoadCode4{values.data_ptr<uint8_t>(), _mm256_loadu_ps(table), _mm256_loadu_ps(table + 8)});
  }
  switch (kind) {
    case 0: return body(LoadF32{values.data_ptr<float>()});
    case 1: return body(LoadBF16{reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>())});
    case 2: return body(LoadF16{reinterpret_cast<const uint16_t*>(values.data_ptr<at::Half>())});
    case 3: return body(LoadI8{values.data_ptr<int8_t>()});
  }
  TORCH_CHECK(false, "dlp sparse kernel: unknown value kind ", kind);
}

}  // namespace

// x: float32 [T, 8 * stride], T <= 8 -> float32 [T, out]
torch::Tensor sparse_matmul(torch::Tensor x, torch::Tensor bits, torch::Tensor row_ptr, torch::Tensor values,
                            int64_t kind, torch::Tensor codebook, torch::Tensor scales, int64_t group_size) {
  const Weights w = weights_of(bits, row_ptr, scales, group_size);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == 8 * w.stride,
              "x: float32 [tokens, 8 * stride]");
  const int64_t out = bits.size(0);
  torch::Tensor y = torch::empty({x.size(0), out}, x.options());
  with_loader(values, kind, codebook, [&](auto load) {
    matmul_tokens(static_cast<int>(x.size(0)), w, load, x.data_ptr<float>(), y.data_ptr<float>(), out);
  });
  return y;
}

// -> float32 [out, 8 * stride]: every weight, pruned ones 0
torch::Tensor decompress(torch::Tensor bits, torch::Tensor row_ptr, torch::Tensor values, int64_t kind,
                         torch::Tensor codebook, torch::Tensor scales, int64_t group_size) {
  const Weights w = weights_of(bits, row_ptr, scales, group_size);
  torch::Tensor dense = torch::empty({bits.size(0), 8 * w.stride}, torch::dtype(torch::kFloat32));
  float* out = dense.data_ptr<float>();
  with_loader(values, kind, codebook, [&](auto load) {
    at::parallel_for(0, bits.size(0), 16, [&](int64_t r0, int64_t r1) { decompress_rows(w, load, out, r0, r1); });
  });
  return dense;
}

// kept weights per row
torch::Tensor row_counts(torch::Tensor bits) {
  TORCH_CHECK(bits.dtype() == torch::kUInt8 && bits.dim() == 2 && bits.is_contiguous(), "bits: uint8 [out, stride]");
  torch::Tensor counts = torch::empty({bits.size(0)}, torch::dtype(torch::kInt64));
  const uint8_t* b = bits.data_ptr<uint8_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  const int64_t stride = bits.size(1);
  at::parallel_for(0, bits.size(0), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t n = 0;
      for (int64_t j = 0; j < stride; ++j) n += __builtin_popcount(b[r * stride + j]);
      c[r] = n;
    }
  });
  return counts;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_matmul", &sparse_matmul, "compressed-weight matmul for up to 8 tokens");
  m.def("decompress", &decompress, "compressed weight -> dense float32");
  m.def("row_counts", &row_counts, "kept weights per row");
}
"""

_state: dict[str, Any] = {}


def kernel_unavailable() -> str | None:
    """Why the compiled kernel cannot run here (one line), or None when it can."""
    if "module" not in _state and "problem" not in _state:
        _state["problem"] = _problem()
    return _state.get("problem")


def _problem() -> str | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch reports {capability})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def kernel():
    """The compiled extension: built on first use into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
    ``~/.cache/torch_extensions``), named by the source's digest so an edited source is rebuilt, and loaded from the
    cache afterwards. Raises RuntimeError with a one-line reason when it cannot be built."""
    if "module" in _state:
        return _state["module"]
    problem = kernel_unavailable()
    if problem:
        raise RuntimeError(problem)
    from torch.utils.cpp_extension import load_inline

    name = "dlp_sparse_" + hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = load_inline(name, cpp_sources=[SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as exc:  # a compiler that fails: the caller falls back to the dense kernel
        _state["problem"] = f"the sparse kernel did not build ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
        raise RuntimeError(_state["problem"]) from exc
    _state["module"] = module
    return module
