// Direct stride-1 NHWC/HWIO convolution kernels and a max-pool for XLA's CPU backend, called
// through jax.ffi.
//
// Why hand-written: XLA's CPU convolutions (YNNPACK) run each convolution on one thread and are
// slow on the lab networks' shapes (few channels, many positions); see flaxcnn/kernels/__init__.py
// for what was measured. Two kernels cover a convolution's training step:
//   conv_forward:     y[n, oh, ow, o]  = sum_{i, j, c} xp[n, oh + i, ow + j, c] * w[i, j, c, o]
//   conv_kernel_grad: dw[i, j, c, o]   = sum_{n, oh, ow} xp[n, oh + i, ow + j, c] * dy[n, oh, ow, o]
// where xp is the already padded input. The input gradient is conv_forward of the padded output
// gradient with the flipped, transposed kernel (done in JAX). In NHWC, the kw * C values under one
// kernel row are contiguous, so both kernels reduce over a contiguous run of kw * C inputs per row.
// Accumulators are kept in registers: PB output positions x a block of the O channels (forward)
// or RB kernel rows x a block of channels (kernel gradient), sized to the target's vector
// registers (see Blocking); the compiler vectorises the channel loop (compile-time O). A partly
// empty last channel vector of a one-channel input is computed by positions (see PartialVector).
#include <algorithm>
#include <array>
#include <utility>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Built as several translation units compiled in parallel (flaxcnn/kernels/__init__.py): each
// instantiates the kernels of some channel counts; unit 0 also holds the FFI handlers.
#ifndef FLAXCNN_UNIT
#define FLAXCNN_UNIT 0
#define FLAXCNN_UNITS 1
#endif

// Each ISA variant's code lives in a namespace of its own: one process loads several variants
// (tests, timing), and template instances with the same name in two libraries -- above all the
// block tables, which GCC emits as process-wide unique symbols -- would otherwise be shared
// between them (the AVX2 kernels ran with the AVX-512 block table).
#if defined(__AVX512F__)
#define FLAXCNN_NS flaxcnn_kernels_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define FLAXCNN_NS flaxcnn_kernels_avx2
#else
#define FLAXCNN_NS flaxcnn_kernels_generic
#endif

namespace FLAXCNN_NS {

struct Shape {
  int64_t n, hp, wp, c, kh, kw, o, ho, wo;
};

// ---------------------------------------------------------------------------------------------
// The target's vector unit, from the compiler's target macros (the library is built once per ISA
// variant, see flaxcnn/kernels/__init__.py): kMaxWidth floats per vector and kRegisters vector
// registers. Register blocking below is derived from these two numbers, so that the accumulators
// of one block, the kernel (or gradient) vectors they multiply and one broadcast value fit in the
// register file: with AVX-512 (32 x 16 floats) a forward block holds 16 positions x 16 channels,
// with AVX2 + FMA (16 x 8 floats) it holds 13 x 8 or 6 x 16 (a block sized for AVX-512 spills
// on AVX2: that cost 3.5-8x on an AVX2 EPYC), with 128-bit SSE/NEON 13 x 4 or 28 x 4.
#if defined(__AVX512F__)
constexpr int kMaxWidth = 16, kRegisters = 32;
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kMaxWidth = 8, kRegisters = 16;
constexpr const char* kIsa = "avx2";
#elif defined(__aarch64__)
constexpr int kMaxWidth = 4, kRegisters = 32;
constexpr const char* kIsa = "generic";
#else
constexpr int kMaxWidth = 4, kRegisters = 16;
constexpr const char* kIsa = "generic";
#endif

// O output channels are held as NV vectors of W floats (GCC vector extensions, so that the
// accumulators are registers whatever the target ISA); a channel count that is not a multiple of
// W loads and stores only its O floats.
template <int O>
struct Lanes {
  static constexpr int W = (kMaxWidth >= 16 && O <= 8) ? 8 : kMaxWidth;
  static constexpr int NV = (O + W - 1) / W;
  typedef float vec __attribute__((vector_size(W * sizeof(float))));
  static constexpr int Width(int v) { return (v + 1) * W <= O ? W : O - v * W; }
  // A partial vector (O = 10: 16 lanes, 10 used) is a masked load/store where the ISA has one:
  // a memcpy of 10 floats into a vector compiles to a store and a reload (a store-forwarding stall).
  static inline vec LoadOne(const float* src, int width) {
    if (width == W) {
      vec out;
      __builtin_memcpy(&out, src, sizeof(vec));
      return out;
    }
#if defined(__AVX512F__)
    if constexpr (W == 16) return (vec)_mm512_maskz_loadu_ps((__mmask16)((1u << width) - 1), src);
#endif
#if defined(__AVX2__)
    if constexpr (W == 8) return (vec)_mm256_maskload_ps(src, Mask8(width));
#endif
    float lanes[W] = {};
    for (int l = 0; l < width; ++l) lanes[l] = src[l];
    vec out;
    __builtin_memcpy(&out, lanes, sizeof(vec));
    return out;
  }
  static inline void StoreOne(float* dst, vec value, int width) {
    if (width == W) {
      __builtin_memcpy(dst, &value, sizeof(vec));
      return;
    }
#if defined(__AVX512F__)
    if constexpr (W == 16) {
      _mm512_mask_storeu_ps(dst, (__mmask16)((1u << width) - 1), (__m512)value);
      return;
    }
#endif
#if defined(__AVX2__)
    if constexpr (W == 8) {
      _mm256_maskstore_ps(dst, Mask8(width), (__m256)value);
      return;
    }
#endif
    float lanes[W];
    __builtin_memcpy(lanes, &value, sizeof(vec));
    for (int l = 0; l < width; ++l) dst[l] = lanes[l];
  }
#if defined(__AVX2__)
  static inline __m256i Mask8(int width) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(width), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
#endif
  // vectors [V0, V0 + N) of the O channels at src / dst
  template <int V0, int N>
  static inline void Load(vec* dst, const float* src) {
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) dst[v] = LoadOne(src + (V0 + v) * W, Width(V0 + v));
  }
  template <int V0, int N>
  static inline void Store(float* dst, const vec* src) {
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) StoreOne(dst + (V0 + v) * W, src[v], Width(V0 + v));
  }
  template <int V0, int N>
  static inline void Add(float* dst, const vec* src) {
    vec cur[N];
    Load<V0, N>(cur, dst);
#pragma GCC unroll 16
    for (int v = 0; v < N; ++v) cur[v] += src[v];
    Store<V0, N>(dst, cur);
  }
};

// Register blocking for O channels: the channels are cut into blocks of NVB vectors (all NV while
// at least MinBlock positions or kernel rows fit beside them, else the largest divisor of NV that
// leaves room for MinBlock), and a block of B positions (rows) x NVB vectors of accumulators is
// sized to the register file: B * NVB accumulators + NVB operand vectors + a broadcast value +
// one spare, at most MaxAcc accumulators (16 forward, 24 kernel gradient: on AVX-512 these are
// the blockings the kernels were first tuned with).
template <int O, int MaxAcc>
struct Blocking {
  static constexpr int NV = Lanes<O>::NV;
  static constexpr int MinBlock = 3;
  static constexpr int Room(int nvb) { return (kRegisters - nvb - 2) / nvb; }
  static constexpr int PickNVB() {
    for (int nvb = NV; nvb > 1; --nvb)
      if (NV % nvb == 0 && Room(nvb) >= MinBlock) return nvb;
    return 1;
  }
  static constexpr int NVB = PickNVB();
  static constexpr int Blocks = NV / NVB;
  static constexpr int B = std::max(1, std::min(MaxAcc / NVB, Room(NVB)));
};

// ---------------------------------------------------------------------------------------------
// forward: PB output positions of one row x the channel vectors [V0, V0 + NVB), accumulating
// over (i, j)

template <int O, int V0, int NVB, int PB>
void ForwardBlock(const float* xp, const float* w, float* yrow, const Shape& s, int64_t n, int64_t oh,
                  int64_t ow) {
  using L = Lanes<O>;
  using vec = typename L::vec;
  // Each kernel row's kw * C products are summed in registers, then added to `total`: two levels
  // of sums, like a blocked GEMM, rather than one running sum over kh * kw * C terms.
  vec total[PB][NVB] = {};
  const int64_t J = s.kw * s.c;
  for (int64_t i = 0; i < s.kh; ++i) {
    vec acc[PB][NVB] = {};
    const float* xr = xp + ((n * s.hp + oh + i) * s.wp + ow) * s.c;
    const float* wi = w + i * J * O;
    for (int64_t j = 0; j < J; ++j) {
      vec wv[NVB];
      L::template Load<V0, NVB>(wv, wi + j * O);
#pragma GCC unroll 32
      for (int p = 0; p < PB; ++p) {
        const float xv = xr[p * s.c + j];
#pragma GCC unroll 16
        for (int v = 0; v < NVB; ++v) acc[p][v] += xv * wv[v];
      }
    }
#pragma GCC unroll 32
    for (int p = 0; p < PB; ++p)
#pragma GCC unroll 16
      for (int v = 0; v < NVB; ++v) total[p][v] += acc[p][v];
  }
#pragma GCC unroll 32
  for (int p = 0; p < PB; ++p) L::template Store<V0, NVB>(yrow + (ow + p) * O, total[p]);
}

// Runs blocks of S kernel rows from `at` while S more fit before `end`, if S <= Max.
template <int S, int Max, typename F>
inline void Blocks(int64_t& at, int64_t end, const F& block) {
  if constexpr (S <= Max)
    for (; at + S <= end; at += S) block(std::integral_constant<int, S>());
}

using ForwardFn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t, int64_t);

template <int O, int V0, int NVB, size_t... PB>
constexpr auto ForwardBlockTable(std::index_sequence<PB...>) {
  return std::array<ForwardFn, sizeof...(PB)>{ForwardBlock<O, V0, NVB, static_cast<int>(PB) + 1>...};
}

// A row of `wo` positions in equal blocks of at most B positions, for the channel vectors
// [V0, V0 + NVB): ConvNet's 17 columns as 9 + 8 rather than 16 + 1, whose single column runs at a
// fraction of the speed.
template <int O, int V0, int NVB, int B>
void ForwardRowVectors(const float* xp, const float* w, float* yrow, const Shape& s, int64_t n, int64_t oh) {
  static constexpr auto table = ForwardBlockTable<O, V0, NVB>(std::make_index_sequence<B>());
  const int64_t blocks = (s.wo + B - 1) / B;
  int64_t ow = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = (b + 1) * s.wo / blocks;
    table[end - ow - 1](xp, w, yrow, s, n, oh, ow);
    ow = end;
  }
}

template <int O, size_t... Block>
void ForwardRowAllChannels(const float* xp, const float* w, float* yrow, const Shape& s, int64_t n,
                           int64_t oh, std::index_sequence<Block...>) {
  using K = Blocking<O, 16>;
  (ForwardRowVectors<O, static_cast<int>(Block) * K::NVB, K::NVB, K::B>(xp, w, yrow, s, n, oh), ...);
}

// The last, partial channel vector of a one-channel input (ConvNet's 1 -> 10 with 8-float AVX2
// vectors: 8 + 2 channels) is computed with the positions in the vector lanes instead: there the
// kw inputs under a kernel row are contiguous positions, so one load feeds T multiply-adds of
// W positions each, where a channel vector of T used lanes took one multiply-add per position
// (2 instead of 1.25 per position and tap for ConvNet's layer). Each output is the same sum in
// the same order (per kernel row over j, then over rows), so the bits do not change.
template <int O>
struct PartialVector {
  using L = Lanes<O>;
  static constexpr int W = L::W;
  static constexpr int T0 = (L::NV - 1) * W;  // its first channel
  static constexpr int T = O - T0;           // its channels
  static constexpr bool ByPositions = L::NV >= 2 && T < W;
  // position vectors per block: T accumulators and T totals for each, the T kernel values, the input
  static constexpr int PV = std::max(1, std::min(4, (kRegisters - T - 2) / (2 * T)));
};

template <int O, int PV>
void ForwardPartialBlock(const float* xp, const float* w, float* yrow, const Shape& s, int64_t n, int64_t oh,
                         int64_t ow, int64_t count) {
  using L = Lanes<O>;
  using vec = typename L::vec;
  constexpr int W = L::W, T0 = PartialVector<O>::T0, T = PartialVector<O>::T;
  int width[PV];
  for (int v = 0; v < PV; ++v) width[v] = static_cast<int>(std::clamp<int64_t>(count - v * W, 0, W));
  vec total[PV][T] = {};
  for (int64_t i = 0; i < s.kh; ++i) {
    vec acc[PV][T] = {};
    const float* xr = xp + (n * s.hp + oh + i) * s.wp + ow;  // C == 1
    const float* wi = w + i * s.kw * O + T0;
    for (int64_t j = 0; j < s.kw; ++j) {
      float wt[T];
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) wt[t] = wi[j * O + t];
#pragma GCC unroll 8
      for (int v = 0; v < PV; ++v) {
        const vec xv = v + 1 < PV ? L::LoadOne(xr + j + v * W, W) : L::LoadOne(xr + j + v * W, width[v]);
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) acc[v][t] += xv * wt[t];
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < PV; ++v)
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) total[v][t] += acc[v][t];
  }
  for (int v = 0; v < PV; ++v) {
    float lanes[T][W];
    __builtin_memcpy(lanes, total[v], sizeof(lanes));
    for (int l = 0; l < width[v]; ++l)
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) yrow[(ow + v * W + l) * O + T0 + t] = lanes[t][l];
  }
}

template <int O, size_t... PV>
constexpr auto ForwardPartialTable(std::index_sequence<PV...>) {
  using Fn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t, int64_t, int64_t);
  return std::array<Fn, sizeof...(PV)>{ForwardPartialBlock<O, static_cast<int>(PV) + 1>...};
}

template <int O>
void ForwardPartialRow(const float* xp, const float* w, float* yrow, const Shape& s, int64_t n, int64_t oh) {
  constexpr int W = Lanes<O>::W, PV = PartialVector<O>::PV;
  static constexpr auto table = ForwardPartialTable<O>(std::make_index_sequence<PV>());
  for (int64_t ow = 0; ow < s.wo; ow += PV * W) {
    const int64_t count = std::min<int64_t>(PV * W, s.wo - ow);
    table[(count + W - 1) / W - 1](xp, w, yrow, s, n, oh, ow, count);
  }
}

template <int O>
void ForwardRow(const float* xp, const float* w, float* y, const Shape& s, int64_t n, int64_t oh) {
  float* yrow = y + ((n * s.ho + oh) * s.wo) * O;
  if constexpr (PartialVector<O>::ByPositions) {
    if (s.c == 1) {  // the full vectors by channels, the partial one by positions
      constexpr int NVF = Lanes<O>::NV - 1;
      constexpr int B = std::max(1, std::min(16 / NVF, (kRegisters - NVF - 2) / NVF));
      ForwardRowVectors<O, 0, NVF, B>(xp, w, yrow, s, n, oh);
      ForwardPartialRow<O>(xp, w, yrow, s, n, oh);
      return;
    }
  }
  ForwardRowAllChannels<O>(xp, w, yrow, s, n, oh, std::make_index_sequence<Blocking<O, 16>::Blocks>());
}

// The kernel gradients' middle level of sums: register accumulators are added to the sample's
// sums (and cleared) once at least kFlushPositions positions are in them, and at a sample's end.
constexpr int64_t kFlushPositions = 32;

template <int R, int V, typename vec>
inline void Flush(vec (&sample)[R][V], vec (&acc)[R][V]) {
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      sample[r][v] += acc[r][v];
      acc[r][v] = vec{};
    }
}

// ---------------------------------------------------------------------------------------------
// kernel gradient: RB kernel rows (i, j0 .. j0 + RB) x the channel vectors [V0, V0 + NVB) at a
// time, accumulating over positions

template <int O, int V0, int NVB, int RB>
void KernelGradBlock(const float* xp, const float* dy, float* dw, const Shape& s, int64_t n0, int64_t n1,
                     int64_t i, int64_t j0) {
  using L = Lanes<O>;
  using vec = typename L::vec;
  // Three levels of sums keep float32 rounding near that of a blocked GEMM (a single running sum
  // over 64 x 32 x 32 positions drifted visibly from PyTorch in a 10-step training trajectory):
  // registers over at least kFlushPositions positions (Flush), then `sample` over one sample, then dw over samples.
  float* out = dw + (i * s.kw * s.c + j0) * O;
  for (int64_t n = n0; n < n1; ++n) {
    vec acc[RB][NVB] = {}, sample[RB][NVB] = {};
    int64_t pending = 0;
    for (int64_t oh = 0; oh < s.ho; ++oh) {
      const float* xr = xp + ((n * s.hp + oh + i) * s.wp) * s.c + j0;
      const float* dr = dy + ((n * s.ho + oh) * s.wo) * O;
      for (int64_t ow = 0; ow < s.wo; ++ow) {
        vec dv[NVB];
        L::template Load<V0, NVB>(dv, dr + ow * O);
        const float* xv = xr + ow * s.c;
#pragma GCC unroll 32
        for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
          for (int v = 0; v < NVB; ++v) acc[r][v] += xv[r] * dv[v];
      }
      pending += s.wo;
      if (pending >= kFlushPositions || oh + 1 == s.ho) {
        Flush(sample, acc);
        pending = 0;
      }
    }
#pragma GCC unroll 32
    for (int r = 0; r < RB; ++r) L::template Add<V0, NVB>(out + r * O, sample[r]);
  }
}

// Adds the contribution of samples [n0, n1) to dw (KH, KW*C, O) for the channel vectors
// [V0, V0 + NVB), at most Max kernel taps at a time.
template <int O, int V0, int NVB, int Max>
void KernelGradVectors(const float* xp, const float* dy, float* dw, const Shape& s, int64_t n0, int64_t n1) {
  const int64_t J = s.kw * s.c;
  for (int64_t i = 0; i < s.kh; ++i) {
    int64_t j = 0;
    auto block = [&](auto rb) { KernelGradBlock<O, V0, NVB, decltype(rb)::value>(xp, dy, dw, s, n0, n1, i, j); };
    Blocks<24, Max>(j, J, block);
    Blocks<16, Max>(j, J, block);
    Blocks<12, Max>(j, J, block);
    Blocks<10, Max>(j, J, block);
    Blocks<9, Max>(j, J, block);
    Blocks<8, Max>(j, J, block);
    Blocks<6, Max>(j, J, block);
    Blocks<4, Max>(j, J, block);
    Blocks<3, Max>(j, J, block);
    Blocks<2, Max>(j, J, block);
    Blocks<1, Max>(j, J, block);
  }
}

template <int O, size_t... Block>
void KernelGradAllChannels(const float* xp, const float* dy, float* dw, const Shape& s, int64_t n0, int64_t n1,
                           std::index_sequence<Block...>) {
  using K = Blocking<O, 24>;
  (KernelGradVectors<O, static_cast<int>(Block) * K::NVB, K::NVB, K::B>(xp, dy, dw, s, n0, n1), ...);
}

// The partial channel vector of a one-channel input by positions (see PartialVector): per sample,
// its T channels of dy are first copied position-contiguous (dyt: T planes of ho x wo), then each
// kernel tap's sum over positions runs W positions to a vector, RJ taps of a kernel row at a time
// (loads of dy shared by the RJ taps), with the same three levels of sums as KernelGradBlock;
// each vector's lanes are added up (lane order) when the sample is done.
template <int O, int RJ>
void KernelGradPartialBlock(const float* xp, const float* dyt, float* dw, const Shape& s, int64_t n, int64_t i,
                            int64_t j0) {
  using L = Lanes<O>;
  using vec = typename L::vec;
  constexpr int W = L::W, T0 = PartialVector<O>::T0, T = PartialVector<O>::T;
  const int64_t plane = s.ho * s.wo;
  vec acc[RJ][T] = {}, sample[RJ][T] = {};
  int64_t pending = 0;
  for (int64_t oh = 0; oh < s.ho; ++oh) {
    const float* xr = xp + (n * s.hp + oh + i) * s.wp + j0;  // C == 1
    const float* dr = dyt + oh * s.wo;
    for (int64_t ow = 0; ow < s.wo; ow += W) {
      const int width = static_cast<int>(std::min<int64_t>(W, s.wo - ow));
      vec dv[T], xv[RJ];
      if (width == W) {
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) dv[t] = L::LoadOne(dr + t * plane + ow, W);
#pragma GCC unroll 8
        for (int r = 0; r < RJ; ++r) xv[r] = L::LoadOne(xr + r + ow, W);
      } else {
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) dv[t] = L::LoadOne(dr + t * plane + ow, width);
#pragma GCC unroll 8
        for (int r = 0; r < RJ; ++r) xv[r] = L::LoadOne(xr + r + ow, width);
      }
#pragma GCC unroll 8
      for (int r = 0; r < RJ; ++r) {
#pragma GCC unroll 16
        for (int t = 0; t < T; ++t) acc[r][t] += xv[r] * dv[t];
      }
    }
    pending += s.wo;
    if (pending >= kFlushPositions || oh + 1 == s.ho) {
      Flush(sample, acc);
      pending = 0;
    }
  }
  float lanes[RJ][T][W];
  __builtin_memcpy(lanes, sample, sizeof(lanes));
  for (int r = 0; r < RJ; ++r)
    for (int t = 0; t < T; ++t) {
      float sum = 0.0f;
      for (int l = 0; l < W; ++l) sum += lanes[r][t][l];
      dw[(i * s.kw + j0 + r) * O + T0 + t] += sum;
    }
}

template <int O, size_t... RJ>
constexpr auto KernelGradPartialTable(std::index_sequence<RJ...>) {
  using Fn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t, int64_t);
  return std::array<Fn, sizeof...(RJ)>{KernelGradPartialBlock<O, static_cast<int>(RJ) + 1>...};
}

template <int O>
void KernelGradPartial(const float* xp, const float* dy, float* dw, const Shape& s, int64_t n0, int64_t n1) {
  constexpr int T0 = PartialVector<O>::T0, T = PartialVector<O>::T;
  // RJ x T accumulators, T dy vectors and an input vector in registers
  constexpr int MaxRJ = std::max(1, std::min(5, (kRegisters - T - 1) / T));
  static constexpr auto table = KernelGradPartialTable<O>(std::make_index_sequence<MaxRJ>());
  const int64_t plane = s.ho * s.wo;
  thread_local std::vector<float> dyt;
  dyt.resize(static_cast<size_t>(T * plane));
  for (int64_t n = n0; n < n1; ++n) {
    const float* d = dy + n * plane * O + T0;
    for (int64_t p = 0; p < plane; ++p)
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) dyt[t * plane + p] = d[p * O + t];
    for (int64_t i = 0; i < s.kh; ++i)
      for (int64_t j = 0; j < s.kw;) {
        const int64_t rj = std::min<int64_t>(MaxRJ, s.kw - j);
        table[rj - 1](xp, dyt.data(), dw, s, n, i, j);
        j += rj;
      }
  }
}

template <int O>
void KernelGradSamples(const float* xp, const float* dy, float* dw, const Shape& s, int64_t n0, int64_t n1) {
  if constexpr (PartialVector<O>::ByPositions) {
    if (s.c == 1) {  // the full vectors by channels, the partial one by positions
      constexpr int NVF = Lanes<O>::NV - 1;
      constexpr int Max = std::max(1, std::min(24 / NVF, (kRegisters - NVF - 2) / NVF));
      KernelGradVectors<O, 0, NVF, Max>(xp, dy, dw, s, n0, n1);
      KernelGradPartial<O>(xp, dy, dw, s, n0, n1);
      return;
    }
  }
  KernelGradAllChannels<O>(xp, dy, dw, s, n0, n1, std::make_index_sequence<Blocking<O, 24>::Blocks>());
}

}  // namespace FLAXCNN_NS

namespace FLAXCNN_NS {

// Explicit instantiations: a channel count's kernels are compiled in unit (index % FLAXCNN_UNITS)
// and declared extern in the others. The indices balance the units: with two, unit 1 takes the
// one-vector channel counts 8, 10, 16 (16-position blocks, the most code) and 32, unit 0 the
// FFI handlers, the pools and 24, 48, 64.
#define FLAXCNN_INSTANCES(PREFIX, O)                                                              \
  PREFIX template void ForwardRow<O>(const float*, const float*, float*, const Shape&, int64_t, int64_t); \
  PREFIX template void KernelGradSamples<O>(const float*, const float*, float*, const Shape&, int64_t, int64_t);
#if 1 % FLAXCNN_UNITS == FLAXCNN_UNIT
FLAXCNN_INSTANCES(, 8)
#else
FLAXCNN_INSTANCES(extern, 8)
#endif
#if 3 % FLAXCNN_UNITS == FLAXCNN_UNIT
FLAXCNN_INSTANCES(, 10)
#else
FLAXCNN_INSTANCES(extern, 10)
#endif
#if 5 % FLAXCNN_UNITS == FLAXCNN_UNIT
FLAXCNN_INSTANCES(, 16)
#else
FLAXCNN_INSTANCES(extern, 16)
#endif
#if 2 % FLAXCNN_UNITS == FLAXCNN_UNIT
FLAXCNN_INSTANCES(, 24)
#else
FLAXCNN_INSTANCES(extern, 24)
#endif
#if 7 % FLAXCNN_UNITS == FLAXCNN_UNIT
FLAXCNN_INSTANCES(, 32)
#else
FLAXCNN_INSTANCES(extern, 32)
#endif
#if 4 % FLAXCNN_UNITS == FLAXCNN_UNIT
FLAXCNN_INSTANCES(, 48)
#else
FLAXCNN_INSTANCES(extern, 48)
#endif
#if 6 % FLAXCNN_UNITS == FLAXCNN_UNIT
FLAXCNN_INSTANCES(, 64)
#else
FLAXCNN_INSTANCES(extern, 64)
#endif

}  // namespace FLAXCNN_NS

#if FLAXCNN_UNIT == 0

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace FLAXCNN_NS;

// Runs fn(chunk) for chunk in [0, chunks) on the caller and up to workers - 1 pool threads.
// The caller takes chunks too and returns once every chunk has run, so it never waits on a task
// that has not started (a pool thread that starts late finds no chunk left and returns). Which
// thread runs a chunk varies; callers make each chunk's result independent of that.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, int64_t workers, const F& fn) {
  workers = std::max<int64_t>(1, std::min(workers, chunks));
  if (workers == 1) {
    for (int64_t i = 0; i < chunks; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, chunks, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  // Pool tasks only touch `fn` while chunks remain, i.e. while the caller is still waiting below.
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

int64_t Workers(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

using RowFn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t);

// The channel counts with compiled kernels; flaxcnn/kernels/__init__.py routes others to XLA.
RowFn PickForward(int64_t o) {
  switch (o) {
    case 8: return ForwardRow<8>;
    case 10: return ForwardRow<10>;
    case 16: return ForwardRow<16>;
    case 24: return ForwardRow<24>;
    case 32: return ForwardRow<32>;
    case 48: return ForwardRow<48>;
    case 64: return ForwardRow<64>;
    default: return nullptr;
  }
}

Shape ShapeOf(ffi::AnyBuffer::Dimensions x, int64_t kh, int64_t kw, int64_t o) {
  Shape s{x[0], x[1], x[2], x[3], kh, kw, o, x[1] - kh + 1, x[2] - kw + 1};
  return s;
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = xp.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("conv_forward: expects xp (N, Hp, Wp, C) and w (KH, KW, C, O)");
  const Shape s = ShapeOf(xd, wd[0], wd[1], wd[3]);
  const RowFn row = PickForward(s.o);
  if (row == nullptr) return ffi::Error::InvalidArgument("conv_forward: no kernel for this output channel count");
  const float* x = xp.typed_data();
  const float* k = w.typed_data();
  float* out = y->typed_data();
  const int64_t rows = s.n * s.ho;
  const int64_t per_chunk = std::max<int64_t>(1, rows / (8 * Workers(pool)));
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  ParallelFor(pool, chunks, Workers(pool), [&](int64_t chunk) {
    for (int64_t r = chunk * per_chunk, end = std::min(rows, r + per_chunk); r < end; ++r)
      row(x, k, out, s, r / s.ho, r % s.ho);
  });
  return ffi::Error::Success();
}

// Sample groups of the kernel gradient: enough for 2-8 threads to share the work evenly.
constexpr int64_t kKernelGradGroups = 8;

using GradFn = void (*)(const float*, const float*, float*, const Shape&, int64_t, int64_t);

GradFn PickKernelGrad(int64_t o) {
  switch (o) {
    case 8: return KernelGradSamples<8>;
    case 10: return KernelGradSamples<10>;
    case 16: return KernelGradSamples<16>;
    case 24: return KernelGradSamples<24>;
    case 32: return KernelGradSamples<32>;
    case 48: return KernelGradSamples<48>;
    case 64: return KernelGradSamples<64>;
    default: return nullptr;
  }
}

ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xp, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = xp.dimensions(), gd = dy.dimensions(), kd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4 || gd[0] != xd[0] || kd[2] != xd[3] ||
      kd[3] != gd[3] || xd[1] - kd[0] + 1 != gd[1] || xd[2] - kd[1] + 1 != gd[2])
    return ffi::Error::InvalidArgument(
        "conv_kernel_grad: expects xp (N, Hp, Wp, C), dy (N, Hp-KH+1, Wp-KW+1, O), dw (KH, KW, C, O)");
  const Shape s = ShapeOf(xd, kd[0], kd[1], kd[3]);
  const GradFn grad = PickKernelGrad(s.o);
  if (grad == nullptr) return ffi::Error::InvalidArgument("conv_kernel_grad: no kernel for this output channel count");
  const int64_t size = s.kh * s.kw * s.c * s.o;
  if (s.n == 0) {  // an empty batch contributes nothing
    std::fill(dw->typed_data(), dw->typed_data() + size, 0.0f);
    return ffi::Error::Success();
  }
  // The batch is cut into a fixed number of sample groups (not one per thread), each summed into
  // its own buffer, and the buffers are added in group order: the result has the same bits
  // whichever thread ran which group and however many threads there are (a run is reproducible).
  const int64_t groups = std::min<int64_t>(kKernelGradGroups, s.n);
  std::vector<float> partial(static_cast<size_t>(size * groups), 0.0f);
  ParallelFor(pool, groups, Workers(pool), [&](int64_t g) {
    const int64_t n0 = g * s.n / groups, n1 = (g + 1) * s.n / groups;
    grad(xp.typed_data(), dy.typed_data(), partial.data() + g * size, s, n0, n1);
  });
  float* out = dw->typed_data();
  std::memcpy(out, partial.data(), size * sizeof(float));
  for (int64_t g = 1; g < groups; ++g)
    for (int64_t k = 0; k < size; ++k) out[k] += partial[g * size + k];
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// max-pool, stride k (floor mode): the forward pass also writes each window's first maximum
// (row-major position in the window), PyTorch's rule on ties, and like PyTorch's CPU kernel a
// NaN counts as the maximum (the last NaN of a window, as there); the backward pass writes the
// window's gradient at that position and zero everywhere else, cropped edge included.

ffi::Error MaxPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::S32> first, int64_t k) {
  auto d = x.dimensions();
  if (d.size() != 4 || k < 1 || d[1] < k || d[2] < k)
    return ffi::Error::InvalidArgument("max_pool_forward: expects x (N, H, W, C) with H, W >= k >= 1");
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3], ho = h / k, wo = w / k;
  const float* in = x.typed_data();
  float* out = y->typed_data();
  int32_t* index = first->typed_data();
  ParallelFor(pool, n, Workers(pool), [&](int64_t b) {
    for (int64_t oh = 0; oh < ho; ++oh)
      for (int64_t ow = 0; ow < wo; ++ow) {
        float* best = out + ((b * ho + oh) * wo + ow) * c;
        int32_t* at = index + ((b * ho + oh) * wo + ow) * c;
        const float* x0 = in + ((b * h + oh * k) * w + ow * k) * c;
        for (int64_t ch = 0; ch < c; ++ch) {
          best[ch] = x0[ch];
          at[ch] = 0;
        }
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = (i == 0 ? 1 : 0); j < k; ++j) {
            const float* xt = x0 + (i * w + j) * c;
            const int32_t t = static_cast<int32_t>(i * k + j);
            for (int64_t ch = 0; ch < c; ++ch) {
              const float v = xt[ch];
              const bool take = v > best[ch] || v != v;
              best[ch] = take ? v : best[ch];
              at[ch] = take ? t : at[ch];
            }
          }
      }
  });
  return ffi::Error::Success();
}

ffi::Error MaxPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S32> first,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t k) {
  auto gd = g.dimensions(), d = dx->dimensions();
  if (gd.size() != 4 || d.size() != 4 || gd[1] != d[1] / k || gd[2] != d[2] / k || gd[3] != d[3])
    return ffi::Error::InvalidArgument("max_pool_backward: expects g (N, H/k, W/k, C) and dx (N, H, W, C)");
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3], ho = h / k, wo = w / k;
  const float* grad = g.typed_data();
  const int32_t* index = first.typed_data();
  float* out = dx->typed_data();
  ParallelFor(pool, n, Workers(pool), [&](int64_t b) {
    float* sample = out + b * h * w * c;
    for (int64_t oh = 0; oh < ho; ++oh)
      for (int64_t i = 0; i < k; ++i) {
        float* row = sample + ((oh * k + i) * w) * c;
        for (int64_t ow = 0; ow < wo; ++ow) {
          const float* gv = grad + ((b * ho + oh) * wo + ow) * c;
          const int32_t* at = index + ((b * ho + oh) * wo + ow) * c;
          for (int64_t j = 0; j < k; ++j) {
            float* o = row + (ow * k + j) * c;
            const int32_t t = static_cast<int32_t>(i * k + j);
            for (int64_t ch = 0; ch < c; ++ch) o[ch] = at[ch] == t ? gv[ch] : 0.0f;
          }
        }
        std::fill(row + wo * k * c, row + w * c, 0.0f);  // columns past the last window
      }
    std::fill(sample + ho * k * w * c, sample + h * w * c, 0.0f);  // rows past the last window
  });
  return ffi::Error::Success();
}

}  // namespace

// The ISA variant this library was built as ("avx512", "avx2" or "generic"), checked on loading.
extern "C" const char* FlaxcnnKernelIsa() { return kIsa; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvKernelGrad, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnMaxPoolForward, MaxPoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k"));


#endif  // FLAXCNN_UNIT == 0