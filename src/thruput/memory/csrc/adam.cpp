// One-pass CPU AdamW for flat fp32 masters (thruput.memory.adam).
//
// Work is split into 256-element chunks (the 8-bit blocks, and small enough that the per-chunk
// scratch buffers stay in L1). Chunks follow a grid of 256 that starts `block_phase` elements
// before master[0], so the first and last chunk may be short: with block_phase =
// index_offset % 256, a shard's 8-bit blocks are those of the whole tensor it was cut from.
// Each chunk reads every input stream from memory once and writes every output stream once;
// the gradient and parameter-copy conversions run over L1 scratch. Inner loops are plain loops
// that GCC vectorises at -O3 -march=native (checked with -fopt-info-vec); threads of
// at::parallel_for walk contiguous shares of the chunks (see run_all).
//
// With fp32 states the arithmetic mirrors torch.optim.AdamW's single-tensor step operation by
// operation (lerp and addcmul are fused multiply-adds there, so they are std::fma here; everything
// else is a single IEEE operation, or for sqrt(v) / sqrt(bc2) an exact replacement of one, and the
// file is compiled with -ffp-contract=off). The low-precision formats divide once instead of
// twice (see adam_elem). The Python fallback in _adam_torch.py does the same operations, so both
// produce the same bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 256;

struct Hyper {
  float decay, lerp_coef, beta2, c2, neg_step_size, bc2_sqrt, eps, grad_scale;
  bool lerp_from_m;  // torch's lerp(m, g, w): fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)
  uint32_t seed;
  int64_t index_offset;  // global index of master[0], for the rounding hash
  float neg_step_bc2, eps_bc2;  // -step_size * bc2_sqrt and eps * bc2_sqrt: the one-division form
  float inv_bc2;  // 1 / bc2_sqrt, rounded to nearest
};

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// 32 random bits for element i, identical to hash32 in _adam_torch.py: the index folded with the
// per-step seed, one odd multiply and one xorshift. Each step's map from index to bits is a
// bijection, and the seed (murmur3-mixed per step) makes an element's bits across steps look
// independent, which is all stochastic rounding needs. Against a two-round mixer it saves a
// vector multiply per element: 7% of the bf16-state step in cache. The high word of the
// index (folded into hi_mix) changes at most once in a chunk, where the low word wraps: elements
// from `wrap` on take the next high word. A select vectorises; a 64-bit index per element would not
// as cheaply.
struct Rng {
  uint32_t lo, hi_mix, hi_mix_next, wrap;
  Rng(uint64_t base, uint32_t seed)
      : lo(static_cast<uint32_t>(base)),
        hi_mix(mix_hi(base >> 32, seed)),
        hi_mix_next(mix_hi((base >> 32) + 1, seed)),
        wrap(static_cast<uint32_t>(std::min<uint64_t>((uint64_t{1} << 32) - lo, kBlock))) {}
  static uint32_t mix_hi(uint64_t hi, uint32_t seed) { return static_cast<uint32_t>(hi) * 0x7FEB352Du ^ seed; }
  uint32_t at(int64_t k) const {
    const uint32_t kk = static_cast<uint32_t>(k);
    const uint32_t x = ((lo + kk) ^ (kk < wrap ? hi_mix : hi_mix_next)) * 0x9E3779B1u;
    return x ^ (x >> 16);
  }
};

// ---- dtype conversions over a chunk -------------------------------------------------------

inline void load_bf16(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = bits_to_float(static_cast<uint32_t>(src[k]) << 16);
}

inline void load_half(const at::Half* src, int64_t n, float* dst) {
  int64_t k = 0;
#if defined(__F16C__)
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
#endif
  for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

// Round to nearest even, like Tensor.to(torch.bfloat16); NaN to the quiet NaN 0x7FC0 (torch's
// scalar conversion gives that, its vectorised one 0xFFFF).
inline void store_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t u = float_to_bits(src[k]);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    dst[k] = static_cast<uint16_t>(src[k] != src[k] ? 0x7FC0u : r);
  }
}

inline void store_half(const float* src, int64_t n, at::Half* dst) {
  int64_t k = 0;
#if defined(__F16C__)
  for (; k + 8 <= n; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; k < n; ++k) dst[k] = static_cast<at::Half>(src[k]);
}

// Magnitude rounded up with probability (dropped 16 bits) / 2**16: unbiased fp32 -> bf16.
inline uint16_t bf16_stochastic(float x, uint32_t r16) {
  return static_cast<uint16_t>((float_to_bits(x) + r16) >> 16);
}

// Training dtypes of the gradient and the parameter copy.
enum class Dt { kFp32, kBf16, kFp16 };

inline void load_grad(const void* grad, Dt dt, int64_t i0, int64_t n, float grad_scale, float* g) {
  switch (dt) {
    case Dt::kFp32: std::memcpy(g, static_cast<const float*>(grad) + i0, n * sizeof(float)); break;
    case Dt::kBf16: load_bf16(static_cast<const uint16_t*>(grad) + i0, n, g); break;
    case Dt::kFp16: load_half(static_cast<const at::Half*>(grad) + i0, n, g); break;
  }
  if (grad_scale != 1.0f)
    for (int64_t k = 0; k < n; ++k) g[k] = g[k] / grad_scale;
}

// Copies a chunk's parameter copy from L1 scratch to `dst` with non-temporal stores where the
// vector width allows: the copy is write-only (it goes to the device next), and an ordinary store
// would first read each destination line from memory (2 of the 28 bytes per parameter an fp32-state
// step moves; measured 4-6% of the step at 200M parameters). Threads end with an sfence.
inline void stream_to(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  if ((reinterpret_cast<uintptr_t>(d) & 31) == 0 && (reinterpret_cast<uintptr_t>(s) & 31) == 0 && bytes % 32 == 0) {
    for (int64_t o = 0; o < bytes; o += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + o), _mm256_load_si256(reinterpret_cast<const __m256i*>(s + o)));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

inline void store_param(const float* p, void* out, Dt dt, int64_t i0, int64_t n) {
  alignas(64) uint16_t half[kBlock];
  switch (dt) {
    case Dt::kFp32: stream_to(static_cast<float*>(out) + i0, p, n * sizeof(float)); return;
    case Dt::kBf16: store_bf16(p, n, half); break;
    case Dt::kFp16: store_half(p, n, reinterpret_cast<at::Half*>(half)); break;
  }
  stream_to(static_cast<uint16_t*>(out) + i0, half, n * sizeof(uint16_t));
}

Dt dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::kFp32;
    case at::kBFloat16: return Dt::kBf16;
    case at::kHalf: return Dt::kFp16;
    default: TORCH_CHECK(false, "adamw_step: unsupported ", name, " dtype ", t.scalar_type());
  }
}

// ---- the fp32 core -----------------------------------------------------------------------

// One element of the update, in place; returns sqrt(v) (the 8-bit format stores v in that domain).
// kFromM is Hyper::lerp_from_m as a template argument: a select in the loop blocks vectorisation.
// kOneDiv (the low-precision formats, which have no torch result to match bit for bit) moves
// sqrt(bias_correction2) from the denominator to the numerator: one vector division per element
// instead of two, and division and sqrt are what the step spends most of its time on.
template <bool kFromM, bool kOneDiv>
inline float adam_elem(float& p, float g, float& m, float& v, const Hyper& h) {
  m = std::fma(h.lerp_coef, g - m, kFromM ? m : g);
  v = std::fma(h.c2 * g, g, v * h.beta2);
  const float sq = std::sqrt(v);
  if constexpr (kOneDiv) {
    p = p * h.decay + (h.neg_step_bc2 * m) / (sq + h.eps_bc2);
  } else {
    // sq / bc2_sqrt without a division: q0 = sq * RN(1 / c) is within an ulp of it, and one
    // residual step rounds it correctly (Markstein's theorem; checked against the division for
    // every fp32 sq in [2**-80, 2**64], which holds every finite sqrt(v), at 45 values of c:
    // beta2 = 0.999 at steps 1-30, 0.95 at steps 1-10, and others). sq = inf gives NaN here.
    const float q0 = sq * h.inv_bc2;
    const float denom = std::fma(std::fma(-q0, h.bc2_sqrt, sq), h.inv_bc2, q0) + h.eps;
    p = p * h.decay + (h.neg_step_size * m) / denom;  // two roundings, like mul_ then addcdiv_
  }
  return sq;
}

// ---- 8-bit blockwise codes (see the module docstring of adam.py) ---------------------------

// q in [0, levels] with q*q ~= y, rounded up with probability (y - t*t) / (2t + 1). y is finite
// and >= 0, so truncation is floor (and, unlike floorf, vectorises without -fno-trapping-math).
inline float sq_code(float y, uint32_t r16, float levels_minus_1) {
  const float t = std::min(static_cast<float>(static_cast<int32_t>(std::sqrt(y))), levels_minus_1);
  const float r = static_cast<float>(static_cast<int32_t>(r16)) * (1.0f / 65536.0f);
  return t + (r * (t * 2.0f + 1.0f) < y - t * t ? 1.0f : 0.0f);
}

// ---- one chunk per state format -------------------------------------------------------------

enum class Format { kFp32, kBf16, kInt8 };

// Raw pointers, taken once: data_ptr() per chunk would cost a call and a check each time.
struct Args {
  float* master;
  const void* grad;
  void* param_out;  // null: no parameter copy
  Dt grad_dt, out_dt;
  void* m;
  void* v;
  float* m_scale;   // int8 only
  float* v_scale;
  int64_t numel;
  int64_t block_phase;  // position of master[0] in its chunk, in [0, 256)
  Hyper h;
};

template <Format F, bool kFromM>
void run_chunk(const Args& a, int64_t chunk) {
  const int64_t i0 = std::max<int64_t>(0, chunk * kBlock - a.block_phase);
  const int64_t n = std::min((chunk + 1) * kBlock - a.block_phase, a.numel) - i0;
  const Hyper h = a.h;
  alignas(64) float g[kBlock];
  load_grad(a.grad, a.grad_dt, i0, n, h.grad_scale, g);
  float* __restrict p = a.master + i0;
  if constexpr (F == Format::kFp32) {
    float* __restrict m = static_cast<float*>(a.m) + i0;
    float* __restrict v = static_cast<float*>(a.v) + i0;
    for (int64_t k = 0; k < n; ++k) adam_elem<kFromM, false>(p[k], g[k], m[k], v[k], h);
  } else if constexpr (F == Format::kBf16) {
    uint16_t* __restrict mq = static_cast<uint16_t*>(a.m) + i0;
    uint16_t* __restrict vq = static_cast<uint16_t*>(a.v) + i0;
    const Rng rng(static_cast<uint64_t>(h.index_offset + i0), h.seed);
    for (int64_t k = 0; k < n; ++k) {
      float m = bits_to_float(static_cast<uint32_t>(mq[k]) << 16);
      float v = bits_to_float(static_cast<uint32_t>(vq[k]) << 16);
      adam_elem<kFromM, true>(p[k], g[k], m, v, h);
      const uint32_t r = rng.at(k);
      mq[k] = bf16_stochastic(m, r & 0xFFFFu);
      vq[k] = bf16_stochastic(v, r >> 16);
    }
  } else {
    // Dequantise and update, keeping the new fp32 moments in L1; the block scales need all of
    // them before anything can be requantised.
    int8_t* __restrict qm = static_cast<int8_t*>(a.m) + i0;
    uint8_t* __restrict qv = static_cast<uint8_t*>(a.v) + i0;
    const float sm = a.m_scale[chunk], sv = a.v_scale[chunk];
    alignas(64) float mb[kBlock], ub[kBlock];
    // max |x| as the max of the bit patterns with the sign cleared: the same order for floats
    // >= 0 (NaN above all, as torch's amax), and an integer max reduction vectorises.
    uint32_t max_m = 0, max_u = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int32_t cm = qm[k], cv = qv[k];
      float m = static_cast<float>(cm * std::abs(cm)) * sm;
      const float u = static_cast<float>(cv * cv) * sv;
      float v = u * u;
      ub[k] = adam_elem<kFromM, true>(p[k], g[k], m, v, h);
      mb[k] = m;
      max_m = std::max(max_m, float_to_bits(m) & 0x7FFFFFFFu);
      max_u = std::max(max_u, float_to_bits(ub[k]) & 0x7FFFFFFFu);
    }
    const float scale_m = bits_to_float(max_m) / 16129.0f, scale_v = bits_to_float(max_u) / 65025.0f;
    a.m_scale[chunk] = scale_m;
    a.v_scale[chunk] = scale_v;
    // A block whose scale is zero or subnormal (moments below 1e-34) gets all-zero codes: inv = 0
    // makes every code 0 and keeps |x| * inv finite, which sq_code needs.
    const float inv_m = scale_m >= FLT_MIN ? 1.0f / scale_m : 0.0f;
    const float inv_v = scale_v >= FLT_MIN ? 1.0f / scale_v : 0.0f;
    const Rng rng(static_cast<uint64_t>(h.index_offset + i0), h.seed);
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t r = rng.at(k);
      const float cm = sq_code(std::fabs(mb[k]) * inv_m, r & 0xFFFFu, 126.0f);
      const float cv = std::max(sq_code(ub[k] * inv_v, r >> 16, 254.0f), ub[k] > 0.0f ? 1.0f : 0.0f);
      qm[k] = static_cast<int8_t>(static_cast<int32_t>(mb[k] < 0.0f ? -cm : cm));
      qv[k] = static_cast<uint8_t>(static_cast<int32_t>(cv));
    }
  }
  if (a.param_out) store_param(p, a.param_out, a.out_dt, i0, n);
}

// Chunks (and 8-bit blocks) over numel elements whose first sits at block_phase of its chunk.
inline int64_t n_chunks(int64_t numel, int64_t block_phase) {
  return numel == 0 ? 0 : (block_phase + numel + kBlock - 1) / kBlock;
}

template <Format F>
void run_all(const Args& a) {
  const int64_t chunks = n_chunks(a.numel, a.block_phase);
  // Each thread walks its own contiguous share of the chunks, a piece at a time, and when it is
  // done takes the next pieces of the shares still in progress. So the seven memory streams of a
  // thread run on across pieces (where a thread's walk jumps, each stream restarts and the
  // hardware prefetchers ramp up again: 2K-element pieces handed out round-robin ran 17-28%
  // slower than 16K ones, and those 5-10% slower than 256K), while on a shared machine a thread
  // that is descheduled mid-step leaves its remaining pieces to the others rather than stalling
  // the step until it runs again. Which thread runs a chunk never changes its bits.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t piece_len = std::clamp<int64_t>(chunks / (8 * threads), 64, 1024);
  const int64_t pieces = (chunks + piece_len - 1) / piece_len;
  const int64_t workers = std::min<int64_t>(threads, pieces);
  struct alignas(64) Share { std::atomic<int64_t> next; int64_t end; };  // one cache line each
  std::vector<Share> shares(std::max<int64_t>(workers, 1));
  for (int64_t w = 0; w < workers; ++w) {
    shares[w].next.store(pieces * w / workers, std::memory_order_relaxed);
    shares[w].end = pieces * (w + 1) / workers;
  }
  auto work = [&](int64_t w) {
    for (int64_t k = 0; k < workers; ++k) {
      Share& share = shares[(w + k) % workers];
      for (int64_t piece; (piece = share.next.fetch_add(1, std::memory_order_relaxed)) < share.end;) {
        const int64_t end = std::min(chunks, (piece + 1) * piece_len);
        for (int64_t c = piece * piece_len; c < end; ++c) {
          if (a.h.lerp_from_m) run_chunk<F, true>(a, c); else run_chunk<F, false>(a, c);
        }
      }
    }
    stream_fence();
  };
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t w = 0; w < workers; ++w) work(w);
  } else {
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t stop) {
      for (int64_t w = begin; w < stop; ++w) work(w);
    });
  }
}

void adamw_step(at::Tensor master, at::Tensor grad, c10::optional<at::Tensor> param_out,
                const std::string& state_dtype, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                c10::optional<at::Tensor> exp_avg_scale, c10::optional<at::Tensor> exp_avg_sq_scale,
                double decay, double beta1, double one_minus_beta1, double beta2, double one_minus_beta2,
                double step_size, double bc2_sqrt, double eps, double grad_scale, int64_t seed,
                int64_t index_offset, double step_size_bc2, double eps_bc2, int64_t block_phase) {
  // Shapes, dtypes and layout are validated in Python (adam.py); these guard direct misuse.
  TORCH_CHECK(master.is_contiguous() && master.scalar_type() == at::kFloat, "adamw_step: master must be contiguous fp32");
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == master.numel(), "adamw_step: grad must be contiguous, numel of master");
  TORCH_CHECK(exp_avg.numel() == master.numel() && exp_avg_sq.numel() == master.numel(), "adamw_step: state numel mismatch");
  Args a{};
  a.master = master.data_ptr<float>();
  a.grad = grad.data_ptr();
  a.grad_dt = dtype_of(grad, "grad");
  if (param_out.has_value()) {
    TORCH_CHECK(param_out->is_contiguous() && param_out->numel() == master.numel(), "adamw_step: bad param_out");
    a.param_out = param_out->data_ptr();
    a.out_dt = dtype_of(*param_out, "param_out");
  }
  a.m = exp_avg.data_ptr();
  a.v = exp_avg_sq.data_ptr();
  a.numel = master.numel();
  TORCH_CHECK(block_phase >= 0 && block_phase < kBlock, "adamw_step: block_phase must be in [0, 256)");
  a.block_phase = block_phase;
  const float w = static_cast<float>(one_minus_beta1);
  a.h = Hyper{static_cast<float>(decay), w < 0.5f ? w : w - 1.0f, static_cast<float>(beta2),
              static_cast<float>(one_minus_beta2), -static_cast<float>(step_size), static_cast<float>(bc2_sqrt),
              static_cast<float>(eps), static_cast<float>(grad_scale), w < 0.5f, static_cast<uint32_t>(seed),
              index_offset};
  a.h.neg_step_bc2 = -static_cast<float>(step_size_bc2);
  a.h.eps_bc2 = static_cast<float>(eps_bc2);
  a.h.inv_bc2 = 1.0f / a.h.bc2_sqrt;
  TORCH_CHECK(index_offset >= 0, "adamw_step: index_offset must be >= 0");
  if (state_dtype == "fp32") {
    TORCH_CHECK(exp_avg.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat, "fp32 states expected");
    run_all<Format::kFp32>(a);
  } else if (state_dtype == "bf16") {
    TORCH_CHECK(exp_avg.scalar_type() == at::kBFloat16 && exp_avg_sq.scalar_type() == at::kBFloat16, "bf16 states expected");
    run_all<Format::kBf16>(a);
  } else if (state_dtype == "int8") {
    TORCH_CHECK(exp_avg_scale.has_value() && exp_avg_sq_scale.has_value(), "int8 states need scales");
    TORCH_CHECK(exp_avg.scalar_type() == at::kChar && exp_avg_sq.scalar_type() == at::kByte, "int8/uint8 codes expected");
    const int64_t blocks = n_chunks(master.numel(), block_phase);
    TORCH_CHECK(exp_avg_scale->numel() == blocks && exp_avg_sq_scale->numel() == blocks &&
                exp_avg_scale->scalar_type() == at::kFloat && exp_avg_sq_scale->scalar_type() == at::kFloat,
                "adamw_step: one fp32 scale per 256-element block expected");
    a.m_scale = exp_avg_scale->data_ptr<float>();
    a.v_scale = exp_avg_sq_scale->data_ptr<float>();
    run_all<Format::kInt8>(a);
  } else {
    TORCH_CHECK(false, "adamw_step: unknown state_dtype ", state_dtype);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  // No Python objects are touched during the step: let other threads (e.g. a delayed update) run.
  mod.def("adamw_step", &adamw_step, "One-pass AdamW over flat CPU tensors (see thruput.memory.adam)",
          pybind11::call_guard<pybind11::gil_scoped_release>());
}
