"""A CPU matmul on compressed weights (mask bits + kept values), compiled on first use and cached.

This file depends on torch only: it is shipped inside every compressed model that dlp exports (beside
``modeling_compressed.py``), so the model's remote code runs it without dlp.

Why it is built this way. Decode (one to a few tokens) is a matrix-vector product, which reads every weight once
and is bound by memory bandwidth: a dense kernel reads 4 bytes per fp32 weight (2 in bf16), this one 1/8 byte of
mask plus the kept share of the values, so at 70% sparsity about a third. Rows are repacked at load so that each
starts on a byte with column j of a byte in bit j. Per mask byte the kernel takes the next 8 kept values and puts
each in the column its bit names, zeroing the pruned ones, in one table-driven shuffle: ``vpermps`` plus a mask
for fp32, fp16 and 4-bit codes, one ``vpshufb`` for bf16 and int8 (it also widens them to fp32). It then
multiplies with those 8 columns of every token, so the weights are decoded once per row for up to 8 tokens, and
with fewer than 4 tokens the steps alternate between independent accumulators (one FMA chain would stall on its
own latency). Rows are split across threads (``at::parallel_for``, torch's pool). Values are fp32, bf16, fp16,
int8, or 4-bit codes (two per byte, low nibble first) into a 16-entry codebook (bitsandbytes' NF4), the last two
with a step per output row or per group of columns.

AVX2 only: an AVX-512 variant (``vexpandps``, 16 columns per step) measured slower on a Zen 4 EPYC (0.66 against
0.57 ms for a 70% sparse 5632x2048 fp32 matrix-vector product, 2 threads), so it was dropped.

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
VALUE_KINDS = {"float32": 0, "bfloat16": 1, "float16": 2, "int8": 3, "int4": 4, "nf4": 4}
MAX_TOKENS = 8  # above this the dense kernel on the decompressed weight is faster (it is a matrix-matrix product)
PAD_BYTES = 32  # the kernel reads up to 8 values past the last kept one: value buffers carry this padding

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <vector>

// Rows of mask bits are repacked at load so that each starts on a byte and column j of a byte is bit j (least
// significant first). Each kernel walks a row's bits and its kept values (consecutive, in column order) together,
// 8 columns per step.

namespace {

// For each mask byte: where lane j takes its value from among the 8 loaded kept values, and whether it is kept.
// For 16- and 8-bit values one byte shuffle (vpshufb, on the 8 values loaded into both 128-bit halves) does the
// whole expansion: it moves each kept value into the top of its column's 32-bit lane and zeroes the rest (index
// 0x80), which is already the float32 of a bfloat16, and an int8 shifted left by 24.
struct Table {
  alignas(32) int32_t source[256][8];
  alignas(32) int32_t keep[256][8];
  alignas(32) uint8_t shuffle16[256][32];
  alignas(32) uint8_t shuffle8[256][32];
  Table() {
    for (int byte = 0; byte < 256; ++byte) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool on = (byte >> lane) & 1;
        source[byte][lane] = on ? next : 0;
        keep[byte][lane] = on ? -1 : 0;
        uint8_t* wide = &shuffle16[byte][4 * lane];
        uint8_t* narrow = &shuffle8[byte][4 * lane];
        wide[0] = wide[1] = narrow[0] = narrow[1] = narrow[2] = 0x80;
        wide[2] = on ? 2 * next : 0x80;
        wide[3] = on ? 2 * next + 1 : 0x80;
        narrow[3] = on ? next : 0x80;
        next += on;
      }
    }
  }
};
const Table kTable;

inline __m256 expand8(__m256 values, unsigned byte) {
  const __m256i source = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.source[byte]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.keep[byte])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(values, source), keep);
}

// The 8 columns of one mask byte, as floats (unscaled): the kept values from index k on, each in its column.
struct Avx2F32 {
  const float* p;
  __m256 operator()(int64_t k, unsigned byte) const { return expand8(_mm256_loadu_ps(p + k), byte); }
  const void* at(int64_t k) const { return p + k; }
};
struct Avx2BF16 {
  const uint16_t* p;
  const void* at(int64_t k) const { return p + k; }
  __m256 operator()(int64_t k, unsigned byte) const {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.shuffle16[byte]));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(both, order));
  }
};
struct Avx2F16 {
  const uint16_t* p;
  const void* at(int64_t k) const { return p + k; }
  __m256 operator()(int64_t k, unsigned byte) const {
    return expand8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k))), byte);
  }
};
struct Avx2I8 {
  const int8_t* p;
  const void* at(int64_t k) const { return p + k; }
  __m256 operator()(int64_t k, unsigned byte) const {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + k)));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTable.shuffle8[byte]));
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_shuffle_epi8(both, order), 24));
  }
};
// 4-bit codes, two per byte, low nibble first, each indexing a 16-entry codebook (NF4's)
struct Avx2Code4 {
  const uint8_t* p;
  __m256 low_table, high_table;  // codebook entries 0-7 and 8-15
  const void* at(int64_t k) const { return p + (k >> 1); }
  __m256 operator()(int64_t k, unsigned byte) const {
    uint64_t word;
    std::memcpy(&word, p + (k >> 1), sizeof(word));
    word >>= 4 * (k & 1);
    const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(word));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i even = _mm_and_si128(v, nibble);
    const __m128i odd = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
    const __m256i code = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(even, odd));
    const __m256 low = _mm256_permutevar8x32_ps(low_table, code);  // uses the code's low 3 bits
    const __m256 high = _mm256_permutevar8x32_ps(high_table, code);
    return expand8(_mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28))), byte);  // bit 3
  }
};

inline float hsum8(__m256 v) {
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

// Independent accumulators per token: one FMA chain would wait 4 cycles per step for the previous sum, so with
// fewer than 4 tokens the steps go round-robin over U accumulators each.
template <int T>
constexpr int kUnroll = T >= 4 ? 1 : 4 / T;

// y[t, r] = sum_c W[r, c] x[t, c] for rows [r0, r1) and T tokens; x is [T, width], zero-padded columns
// noinline: inlined into the OpenMP region it ran 0.72 instead of 0.58 ms on a 70% 5632x2048 fp32 product
template <int T, class Load>
__attribute__((noinline)) void matmul_rows(const Weights& w, Load load, const float* x, int64_t width, float* y,
                                           int64_t out, int64_t r0, int64_t r1) {
  constexpr int U = kUnroll<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bits = w.bits + r * w.stride;
    int64_t k = w.row_ptr[r];
    __m256 acc[U][T];
    for (int u = 0; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
    const float* scale = w.scales ? w.scales + r * w.groups : nullptr;
    const bool grouped = scale && w.groups > 1;
    auto step = [&](int64_t j, __m256* sums) {
      const unsigned byte = bits[j];
      __m256 weight = load(k, byte);
      k += __builtin_popcount(byte);
      if (grouped) weight = _mm256_mul_ps(weight, _mm256_set1_ps(scale[j / w.group_bytes]));
      for (int t = 0; t < T; ++t) sums[t] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(x + t * width + 8 * j), sums[t]);
    };
    int64_t j = 0;
    for (; j + U <= w.stride; j += U) {
      // ~2 KB ahead in the kept values and 256 B in the mask bits (into L2): a decode step reads every weight once
      // from memory, and the hardware prefetcher alone left the kernel well below dense F.linear's bandwidth
      __builtin_prefetch(static_cast<const char*>(load.at(k)) + 2048, 0, 2);
      __builtin_prefetch(bits + j + 256, 0, 2);
      for (int u = 0; u < U; ++u) step(j + u, acc[u]);
    }
    for (; j < w.stride; ++j) step(j, acc[0]);
    const float row_scale = (scale && !grouped) ? scale[0] : 1.0f;
    for (int t = 0; t < T; ++t) {
      __m256 total = acc[0][t];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[u][t]);
      y[t * out + r] = hsum8(total) * row_scale;
    }
  }
}

// Stores of 8 decompressed weights in the dense weight's dtype (bfloat16 rounded to nearest even, as torch does)
struct StoreF32 {
  float* p;
  void operator()(int64_t at, __m256 v) const { _mm256_storeu_ps(p + at, v); }
};
struct StoreBF16 {
  uint16_t* p;
  void operator()(int64_t at, __m256 v) const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + at), _mm256_castsi256_si128(packed));
  }
};
struct StoreF16 {
  uint16_t* p;
  void operator()(int64_t at, __m256 v) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + at), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
};

// every weight of rows [r0, r1), scaled, into dense [out, 8 * stride] (written straight in its dtype: for a
// prompt's dense product, decompressing costs one write of the weight, not a float32 copy and a conversion)
template <class Load, class Store>
__attribute__((noinline)) void decompress_rows(const Weights& w, Load load, Store store, int64_t r0, int64_t r1) {
  const int64_t width = 8 * w.stride;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* bits = w.bits + r * w.stride;
    int64_t k = w.row_ptr[r];
    const float* scale = w.scales ? w.scales + r * w.groups : nullptr;
    for (int64_t j = 0; j < w.stride; ++j) {
      const unsigned byte = bits[j];
      __m256 weight = load(k, byte);
      k += __builtin_popcount(byte);
      if (scale) weight = _mm256_mul_ps(weight, _mm256_set1_ps(scale[j / w.group_bytes]));
      store(r * width + 8 * j, weight);
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
  switch (kind) {
    case 0: {
      const float* p = values.data_ptr<float>();
      return body(Avx2F32{p});
    }
    case 1: {
      const auto* p = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
      return body(Avx2BF16{p});
    }
    case 2: {
      const auto* p = reinterpret_cast<const uint16_t*>(values.data_ptr<at::Half>());
      return body(Avx2F16{p});
    }
    case 3: {
      const int8_t* p = values.data_ptr<int8_t>();
      return body(Avx2I8{p});
    }
    case 4: {
      TORCH_CHECK(codebook.dtype() == torch::kFloat32 && codebook.numel() == 16 && codebook.is_contiguous(),
                  "codebook: float32 [16]");
      const float* table = codebook.data_ptr<float>();
      const uint8_t* p = values.data_ptr<uint8_t>();
      return body(Avx2Code4{p, _mm256_loadu_ps(table), _mm256_loadu_ps(table + 8)});
    }
  }
  TORCH_CHECK(false, "dlp sparse kernel: unknown value kind ", kind);
}

template <int T, class Load>
void matmul(const Weights& w, Load load, const float* x, int64_t width, float* y, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) { matmul_rows<T>(w, load, x, width, y, out, r0, r1); });
}

}  // namespace

// x: [T, in] in float32, bfloat16 or float16, T <= 8 -> y: [T, out] in x's dtype. The conversions are done
// here rather than by torch ops around the call: at one token per call they cost more than the product itself
// on a small model (SmolLM2's 576-wide projections).
template <class In>
void widened(const In* source, int64_t tokens, int64_t in, int64_t width, std::vector<float>& target) {
  target.assign(tokens * width, 0.0f);  // the columns past ``in``: zero
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < in; ++c) target[t * width + c] = static_cast<float>(source[t * in + c]);
}

torch::Tensor sparse_matmul(torch::Tensor x, torch::Tensor bits, torch::Tensor row_ptr, torch::Tensor values,
                            int64_t kind, torch::Tensor codebook, torch::Tensor scales, int64_t group_size) {
  const Weights w = weights_of(bits, row_ptr, scales, group_size);
  const int64_t tokens = x.size(0), in = x.size(1), width = 8 * w.stride, out = bits.size(0);
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && in <= width && in > width - 8, "x: [tokens, in], contiguous");
  TORCH_CHECK(tokens >= 1 && tokens <= 8, "dlp sparse kernel: 1 to 8 tokens, got ", tokens);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "x: float32, bfloat16 or float16");
  std::vector<float> x_buffer, y_buffer;
  const float* xp;
  if (dtype == torch::kFloat32 && in == width) {
    xp = x.data_ptr<float>();
  } else {
    if (dtype == torch::kFloat32) widened(x.data_ptr<float>(), tokens, in, width, x_buffer);
    if (dtype == torch::kBFloat16) widened(x.data_ptr<at::BFloat16>(), tokens, in, width, x_buffer);
    if (dtype == torch::kHalf) widened(x.data_ptr<at::Half>(), tokens, in, width, x_buffer);
    xp = x_buffer.data();
  }
  torch::Tensor y = torch::empty({tokens, out}, x.options());
  float* yp = dtype == torch::kFloat32 ? y.data_ptr<float>() : (y_buffer.resize(tokens * out), y_buffer.data());
  with_loader(values, kind, codebook, [&](auto load) {
    switch (tokens) {
      case 1: return matmul<1>(w, load, xp, width, yp, out);
      case 2: return matmul<2>(w, load, xp, width, yp, out);
      case 3: return matmul<3>(w, load, xp, width, yp, out);
      case 4: return matmul<4>(w, load, xp, width, yp, out);
      case 5: return matmul<5>(w, load, xp, width, yp, out);
      case 6: return matmul<6>(w, load, xp, width, yp, out);
      case 7: return matmul<7>(w, load, xp, width, yp, out);
      case 8: return matmul<8>(w, load, xp, width, yp, out);
    }
  });
  if (dtype == torch::kBFloat16) {  // rounded to nearest even, as torch's own conversion
    at::BFloat16* target = y.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < tokens * out; ++i) target[i] = at::BFloat16(y_buffer[i]);
  } else if (dtype == torch::kHalf) {
    at::Half* target = y.data_ptr<at::Half>();
    for (int64_t i = 0; i < tokens * out; ++i) target[i] = at::Half(y_buffer[i]);
  }
  return y;
}

// -> [out, 8 * stride] in dtype (0 float32, 1 bfloat16, 2 float16): every weight, pruned ones 0
torch::Tensor decompress(torch::Tensor bits, torch::Tensor row_ptr, torch::Tensor values, int64_t kind,
                         torch::Tensor codebook, torch::Tensor scales, int64_t group_size, int64_t dtype) {
  const Weights w = weights_of(bits, row_ptr, scales, group_size);
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype: 0 float32, 1 bfloat16, 2 float16");
  const at::ScalarType types[] = {torch::kFloat32, torch::kBFloat16, torch::kHalf};
  torch::Tensor dense = torch::empty({bits.size(0), 8 * w.stride}, torch::dtype(types[dtype]));
  const int64_t rows = bits.size(0);
  with_loader(values, kind, codebook, [&](auto load) {
    auto run = [&](auto store) {
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { decompress_rows(w, load, store, r0, r1); });
    };
    if (dtype == 0) run(StoreF32{dense.data_ptr<float>()});
    if (dtype == 1) run(StoreBF16{reinterpret_cast<uint16_t*>(dense.data_ptr<at::BFloat16>())});
    if (dtype == 2) run(StoreF16{reinterpret_cast<uint16_t*>(dense.data_ptr<at::Half>())});
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
