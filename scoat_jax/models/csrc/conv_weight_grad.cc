// Weight gradient of a stride-1 'same' convolution for x86-64 CPUs with AVX2
// (and AVX-512, where the compiler targets it).
//
// dW[i, j, c, o] = sum over (b, h, w) of x_pad[b, h + i, w + j, c] * g[b, h, w, o],
// x_pad being x zero-padded by (KH/2, KW/2) on each side,
// is a matrix product whose contraction runs over every pixel of the batch
// (hundreds of thousands at 256x256) while the output is small (taps x C_in x
// C_out). XLA's CPU backend runs such long-contraction products on one thread
// at a fraction of the core's peak. Here the pixels are cut into chunks of
// rows, one range of chunks per thread of XLA's intra-op pool; each range is
// summed into its own copy of dW, and the copies are added at the end. Within a chunk an MR x 16 block of dW stays in AVX registers
// while the pixels stream past: per pixel, two loads of g and MR broadcasts of
// x feed 2 * MR fused multiply-adds. x is read in place at each tap's offset,
// and the 'same' zero padding is left out of the sums rather than stored, so
// no padded, shifted or im2col copy is made. Built for a CPU with AVX-512
// (`-march=native` defines __AVX512F__), the block is MR x 32 in 512-bit
// registers instead (MR up to 12: 24 accumulators of the 32 registers), which
// runs about twice as fast on an AMD Zen 5; the last 8 columns of a
// C_out that is 8 more than a multiple of 16 still take the AVX2 block.
//
// Exposed to JAX through the XLA FFI as the handler symbol
// `ScoatConvWeightGrad` (scoat_jax/models/cpu_kernels.py builds and registers
// it). Operands: x (B, H, W, C_in) and g (B, H, W, C_out), float32, row-major;
// result dW (KH, KW, C_in, C_out), KH and KW odd. C_out must be a multiple of 8.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRowsPixels = 512;  // pixels per chunk (whole rows, at least one)

struct Problem {
  const float* x;  // (B, H, W, Ci)
  const float* g;  // (B, H, W, Co)
  int64_t batch, height, width, cin, cout, kh, kw;  // KH, KW odd
};

// The vector instructions a register block is written in. An ISA's block holds
// at most kMaxMR x 2 vectors of dW in registers (3/4 of the register file).
struct Avx2 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMaxMR = 6;  // 12 of the 16 AVX registers
  static V Zero() { return _mm256_setzero_ps(); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};

#if defined(__AVX512F__)
struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMaxMR = 12;  // 24 of the 32 AVX-512 registers
  static V Zero() { return _mm512_setzero_ps(); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V Broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
using Wide = Avx512;  // the block most of dW goes through
#else
using Wide = Avx2;
#endif

// acc[m, 0:NV * lanes] += sum over r < rows, w < width of
//     x[r * x_row_stride + w * cin + m] * g[r * g_row_stride + w * cout + 0:NV * lanes],
// m < MR: the block stays in registers over the whole rectangle of pixels. The
// accumulators are named variables, not an array: GCC stored an array of them
// back to the stack after every pixel.
template <class T, int MR, int NV>
inline void RegisterBlock(const float* x, int64_t x_row_stride, int64_t cin, const float* g,
                          int64_t g_row_stride, int64_t cout, int64_t rows, int64_t width,
                          float* acc, int64_t acc_stride) {
  static_assert(MR >= 1 && MR <= T::kMaxMR && MR <= 12 && (NV == 1 || NV == 2),
                "block is MR x NV vectors");
  using V = typename T::V;
  constexpr int L = T::kLanes;
  const V zero = T::Zero();
#define SCOAT_LOAD(m)                                                            \
  V c##m##0 = MR > m ? T::Load(acc + m * acc_stride) : zero;                     \
  V c##m##1 = MR > m && NV == 2 ? T::Load(acc + m * acc_stride + L) : zero;
  SCOAT_LOAD(0) SCOAT_LOAD(1) SCOAT_LOAD(2) SCOAT_LOAD(3) SCOAT_LOAD(4) SCOAT_LOAD(5)
  SCOAT_LOAD(6) SCOAT_LOAD(7) SCOAT_LOAD(8) SCOAT_LOAD(9) SCOAT_LOAD(10) SCOAT_LOAD(11)
#undef SCOAT_LOAD
  for (int64_t r = 0; r < rows; ++r, x += x_row_stride, g += g_row_stride) {
    for (int64_t w = 0; w < width; ++w) {
      const float* xw = x + w * cin;
      const V g0 = T::Load(g + w * cout);
      const V g1 = NV == 2 ? T::Load(g + w * cout + L) : g0;
#define SCOAT_FMA(m)                                        \
  if constexpr (MR > m) {                                   \
    const V b = T::Broadcast(xw + m);                       \
    c##m##0 = T::Fma(b, g0, c##m##0);                       \
    if constexpr (NV == 2) c##m##1 = T::Fma(b, g1, c##m##1); \
  }
      SCOAT_FMA(0) SCOAT_FMA(1) SCOAT_FMA(2) SCOAT_FMA(3) SCOAT_FMA(4) SCOAT_FMA(5)
      SCOAT_FMA(6) SCOAT_FMA(7) SCOAT_FMA(8) SCOAT_FMA(9) SCOAT_FMA(10) SCOAT_FMA(11)
#undef SCOAT_FMA
    }
  }
#define SCOAT_STORE(m)                                                  \
  if constexpr (MR > m) {                                               \
    T::Store(acc + m * acc_stride, c##m##0);                            \
    if constexpr (NV == 2) T::Store(acc + m * acc_stride + L, c##m##1); \
  }
  SCOAT_STORE(0) SCOAT_STORE(1) SCOAT_STORE(2) SCOAT_STORE(3) SCOAT_STORE(4) SCOAT_STORE(5)
  SCOAT_STORE(6) SCOAT_STORE(7) SCOAT_STORE(8) SCOAT_STORE(9) SCOAT_STORE(10) SCOAT_STORE(11)
#undef SCOAT_STORE
}

// RegisterBlock<T, mr, NV> for a run-time 1 <= mr <= T::kMaxMR.
template <class T, int NV>
void Block(int mr, const float* x, int64_t x_row_stride, int64_t cin, const float* g,
           int64_t g_row_stride, int64_t cout, int64_t rows, int64_t width, float* acc,
           int64_t acc_stride) {
#define SCOAT_BLOCK(M)                                                                 \
  case M:                                                                              \
    if constexpr (M <= T::kMaxMR) {                                                    \
      RegisterBlock<T, M, NV>(x, x_row_stride, cin, g, g_row_stride, cout, rows, width, \
                              acc, acc_stride);                                         \
    }                                                                                  \
    break;
  switch (mr) {
    SCOAT_BLOCK(12) SCOAT_BLOCK(11) SCOAT_BLOCK(10) SCOAT_BLOCK(9) SCOAT_BLOCK(8)
    SCOAT_BLOCK(7) SCOAT_BLOCK(6) SCOAT_BLOCK(5) SCOAT_BLOCK(4) SCOAT_BLOCK(3)
    SCOAT_BLOCK(2) SCOAT_BLOCK(1)
  }
#undef SCOAT_BLOCK
}

// Adds the output rows [h0, h1) of image b to acc (KH, KW, Ci, Co). The
// convolution's zero padding is implicit: tap (i, j) reads input pixel
// (h + i - KH/2, w + j - KW/2) for output pixel (h, w), so it sums over the
// output pixels whose input pixel lies inside the image, a rectangle, and
// the pixels that would read the padding add nothing.
//
// dW goes in blocks of up to Wide::kMaxMR input channels by two, then one,
// wide vectors of output channels (the last 8 output channels of a C_out of
// 16k + 8 on an AVX-512 build take the AVX2 block). The input-channel block is
// the outer loop and the taps the inner one: the chunk's g, the few cache
// lines of x that hold the block's channels, and the block's rows of dW for
// every tap then stay in the core's caches while the taps sweep them, however
// many channels x has (tap-outer, the whole of x's chunk and of dW went
// through the caches once per tap).
void AccumulateChunk(const Problem& p, int64_t b, int64_t h0, int64_t h1, float* acc) {
  constexpr int64_t kWideCols = Wide::kLanes;
  const int64_t x_row_stride = p.width * p.cin;
  const int64_t g_row_stride = p.width * p.cout;
  for (int64_t c = 0; c < p.cin; c += Wide::kMaxMR) {
    const int mr = static_cast<int>(std::min<int64_t>(Wide::kMaxMR, p.cin - c));
    for (int64_t i = 0; i < p.kh; ++i) {
      const int64_t di = i - p.kh / 2;
      const int64_t row0 = std::max(h0, -di), row1 = std::min(h1, p.height - di);
      if (row0 >= row1) continue;
      for (int64_t j = 0; j < p.kw; ++j) {
        const int64_t dj = j - p.kw / 2;
        const int64_t col0 = std::max<int64_t>(0, -dj), col1 = std::min(p.width, p.width - dj);
        if (col0 >= col1) continue;
        const int64_t rows = row1 - row0, cols = col1 - col0;
        const float* x_tap = p.x + ((b * p.height + row0 + di) * p.width + col0 + dj) * p.cin;
        const float* g_tap = p.g + ((b * p.height + row0) * p.width + col0) * p.cout;
        float* acc_tap = acc + (i * p.kw + j) * p.cin * p.cout;
        const auto block = [&](auto isa, auto nv, int64_t c0, int block_mr, int64_t o) {
          Block<decltype(isa), decltype(nv)::value>(
              block_mr, x_tap + c0, x_row_stride, p.cin, g_tap + o, g_row_stride, p.cout, rows,
              cols, acc_tap + c0 * p.cout + o, p.cout);
        };
        int64_t o = 0;
        for (; o + 2 * kWideCols <= p.cout; o += 2 * kWideCols) {
          block(Wide{}, std::integral_constant<int, 2>{}, c, mr, o);
        }
        if (o + kWideCols <= p.cout) {
          block(Wide{}, std::integral_constant<int, 1>{}, c, mr, o);
          o += kWideCols;
        }
        for (int64_t c8 = c; o < p.cout && c8 < c + mr; c8 += Avx2::kMaxMR) {  // 8 left
          const int mr8 = static_cast<int>(std::min<int64_t>(Avx2::kMaxMR, c + mr - c8));
          block(Avx2{}, std::integral_constant<int, 1>{}, c8, mr8, o);
        }
      }
    }
  }
}

// Work shared by the calling thread and the pool's tasks, owned jointly: a
// task the pool starts after the call has returned finds nothing left to do.
// The chunks are split into one fixed range per slot and the slots' sums are
// added in slot order, so the result does not depend on which thread ran
// which slot: the gradient is the same on every run.
struct Shared {
  Problem problem;
  int64_t rows_per_chunk, chunks_per_image, num_chunks, num_slots, acc_size;
  std::atomic<int64_t> next_slot{0};
  std::vector<std::unique_ptr<float[]>> slots;
  std::mutex mutex;
  std::condition_variable all_done;
  int64_t done = 0;  // slots finished; guarded by mutex
};

void Work(const std::shared_ptr<Shared>& s) {
  for (int64_t slot = s->next_slot.fetch_add(1); slot < s->num_slots;
       slot = s->next_slot.fetch_add(1)) {
    float* acc = new float[s->acc_size]();
    s->slots[slot].reset(acc);
    const int64_t first = slot * s->num_chunks / s->num_slots;
    const int64_t last = (slot + 1) * s->num_chunks / s->num_slots;
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t b = chunk / s->chunks_per_image;
      const int64_t h0 = (chunk % s->chunks_per_image) * s->rows_per_chunk;
      const int64_t h1 = std::min(s->problem.height, h0 + s->rows_per_chunk);
      AccumulateChunk(s->problem, b, h0, h1, acc);
    }
    std::lock_guard<std::mutex> lock(s->mutex);
    if (++s->done == s->num_slots) s->all_done.notify_all();
  }
}

ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4) {
    return ffi::Error::InvalidArgument("conv weight gradient: operands must have rank 4");
  }
  Problem p{x.typed_data(), g.typed_data(), gd[0], gd[1], gd[2], xd[3], gd[3], wd[0], wd[1]};
  if (xd[0] != p.batch || xd[1] != p.height || xd[2] != p.width || wd[2] != p.cin ||
      wd[3] != p.cout) {
    return ffi::Error::InvalidArgument("conv weight gradient: inconsistent operand shapes");
  }
  if (p.kh % 2 == 0 || p.kw % 2 == 0) {
    return ffi::Error::InvalidArgument("conv weight gradient: kernel sizes must be odd");
  }
  if (p.cout % 8 != 0) {
    return ffi::Error::InvalidArgument("conv weight gradient: C_out must be a multiple of 8");
  }
  float* out = dw->typed_data();
  const int64_t acc_size = p.kh * p.kw * p.cin * p.cout;
  if (p.batch == 0 || p.height == 0 || p.width == 0) {
    std::fill(out, out + acc_size, 0.0f);
    return ffi::Error::Success();
  }

  auto s = std::make_shared<Shared>();
  s->problem = p;
  s->rows_per_chunk = std::max<int64_t>(1, kMaxRowsPixels / p.width);
  s->chunks_per_image = (p.height + s->rows_per_chunk - 1) / s->rows_per_chunk;
  s->num_chunks = p.batch * s->chunks_per_image;
  s->acc_size = acc_size;
  s->num_slots = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), s->num_chunks);
  s->slots.resize(s->num_slots);
  for (int64_t t = 1; t < s->num_slots; ++t) pool.Schedule([s] { Work(s); });
  Work(s);  // the caller works too, so the call finishes even if no task ever runs
  {
    std::unique_lock<std::mutex> lock(s->mutex);
    s->all_done.wait(lock, [&] { return s->done == s->num_slots; });
  }
  std::memcpy(out, s->slots[0].get(), acc_size * sizeof(float));
  for (int64_t k = 1; k < s->num_slots; ++k) {
    const float* src = s->slots[k].get();
    for (int64_t e = 0; e < acc_size; ++e) out[e] += src[e];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScoatConvWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
