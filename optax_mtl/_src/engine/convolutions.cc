// Two-dimensional float32 convolutions on the CPU, as XLA FFI handlers: the
// convolution itself, its gradient with respect to the input and its
// gradient with respect to the kernel, for NHWC inputs, HWIO kernels and NHWC
// outputs, any strides and non-negative paddings.
//
//   out[b, y, x, n] = sum_{i, j, c} in[b, y sy + i - py, x sx + j - px, c] k[i, j, c, n]
//
// XLA:CPU runs these through a generic tensor contraction that is about half
// as fast as a tuned convolution library at the sizes of a small convnet's
// layers. Here each is a register-blocked product: a tile of output pixels
// by a few vectors of output channels stays in registers while the kernel
// taps and channels are summed. Each pixel's taps are pointers, set once per
// chunk of pixels, to the input rows they read, or to a row of zeros outside
// the image (the padding): no bounds checks in the inner loop, and no padded
// copy.
//
// The input gradient is a convolution of the output gradient with the
// transposed kernel, run separately for each phase of the stride (the input
// pixels that the same kernel taps reach); the kernel gradient sums the
// products of input patches and output gradients over the pixels, each
// thread over its own pixels into a copy of its own, added up at the end.
//
// Numerics: float32 products summed in float32, in an order that differs from
// XLA's by rounding only.

#include <algorithm>
#include <array>
#include <initializer_list>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Lanes per vector, and the register tile: kPixels pixels by up to kVectors
// vectors of channels: with AVX-512, 24 accumulators and 4 operand vectors of
// the 32 registers; with AVX, 12 and 2 of 16 (6 pixels by 16 channels, which
// power-of-two channel counts fill); without, 12 and 3 of 16.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kPixels = 6;
constexpr int kVectors = 4;
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kPixels = 6;
constexpr int kVectors = 2;
#else
constexpr int kLanes = 4;
constexpr int kPixels = 4;
constexpr int kVectors = 3;
#endif

// Pixels per unit of work, whole tiles: its input rows stay in cache while
// every block of output channels is computed.
constexpr int64_t kChunk = 10 * kPixels;
// Floats of kernel-gradient sums a thread keeps in cache while it runs over
// its pixels (a quarter of a megabyte).
constexpr int64_t kPanelFloats = int64_t{1} << 16;
// Multiply-adds per thread below which a call is not split further.
constexpr int64_t kMacsPerPart = int64_t{1} << 21;

typedef float Lane __attribute__((vector_size(kLanes * sizeof(float))));

inline Lane Load(const float* p) {
  Lane v;
  std::memcpy(&v, p, sizeof(Lane));
  return v;
}

int64_t RoundUp(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// dst[p][0 .. lanes) = sum over taps t and depth k of
//   src[t * kPixels + p][k] * weights[t][k * ldw + (0 .. lanes)],
// where lanes = (V - 1) * kLanes + last (last lanes of the final vector kept).
template <int P, int V>
void GatherTile(const float* const* src, const float* const* weights, int64_t taps,
                int64_t depth, int64_t ldw, float* const* dst, int64_t last) {
  Lane acc[P][V];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[p][v] = Lane{};
  for (int64_t t = 0; t < taps; ++t) {
    const float* x[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) x[p] = src[t * kPixels + p];
    const float* w = weights[t];
    for (int64_t k = 0; k < depth; ++k, w += ldw) {
      Lane wv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) wv[v] = Load(w + v * kLanes);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const float xp = x[p][k];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[p][v] += xp * wv[v];
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v + 1 < V; ++v) std::memcpy(dst[p] + v * kLanes, &acc[p][v], sizeof(Lane));
    std::memcpy(dst[p] + (V - 1) * kLanes, &acc[p][V - 1], last * sizeof(float));
  }
}

// acc[r][v lanes] += sum over pixels q of src[q][c0 + r] * grad[q][offsets[v] +
// (0 .. kLanes)], for r < R and v < V, acc rows ldw floats apart; the last
// vector has `last` lanes (the gradient rows may end there: Tail, a separate
// instance, so that the full rows' loads stay in registers).
template <int R, int V, bool Tail>
void ReduceTile(const float* const* src, int64_t c0, const float* const* grad,
                const int64_t* offsets, int64_t pixels, float* acc_out, int64_t ldw,
                int64_t last) {
  Lane acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) std::memcpy(&acc[r][v], acc_out + r * ldw + v * kLanes,
                                            sizeof(Lane));
  for (int64_t q = 0; q < pixels; ++q) {
    Lane gv[V];
    for (int v = 0; v + 1 < V; ++v) gv[v] = Load(grad[q] + offsets[v]);
    if (Tail) {
      gv[V - 1] = Lane{};
      for (int64_t l = 0; l < last; ++l) gv[V - 1][l] = grad[q][offsets[V - 1] + l];
    } else {
      gv[V - 1] = Load(grad[q] + offsets[V - 1]);
    }
    const float* s = src[q] + c0;
    for (int r = 0; r < R; ++r) {
      const float x = s[r];
      for (int v = 0; v < V; ++v) acc[r][v] += x * gv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) std::memcpy(acc_out + r * ldw + v * kLanes, &acc[r][v],
                                            sizeof(Lane));
}

using GatherFn = void (*)(const float* const*, const float* const*, int64_t, int64_t, int64_t,
                          float* const*, int64_t);
using ReduceFn = void (*)(const float* const*, int64_t, const float* const*, const int64_t*,
                          int64_t, float*, int64_t, int64_t);

template <int P, int... V>
constexpr std::array<GatherFn, sizeof...(V)> GatherRow(std::integer_sequence<int, V...>) {
  return {GatherTile<P, V + 1>...};
}
template <int... P>
constexpr std::array<std::array<GatherFn, kVectors>, kPixels> GatherTable(
    std::integer_sequence<int, P...>) {
  return {GatherRow<P + 1>(std::make_integer_sequence<int, kVectors>())...};
}
template <bool Tail, int R, int... V>
constexpr std::array<ReduceFn, sizeof...(V)> ReduceRow(std::integer_sequence<int, V...>) {
  return {ReduceTile<R, V + 1, Tail>...};
}
template <bool Tail, int... R>
constexpr std::array<std::array<ReduceFn, kVectors>, kPixels> ReduceTable(
    std::integer_sequence<int, R...>) {
  return {ReduceRow<Tail, R + 1>(std::make_integer_sequence<int, kVectors>())...};
}

// kGather[p - 1][v - 1] is GatherTile<p, v>, kReduce[tail][r - 1][v - 1]
// ReduceTile<r, v, tail>.
constexpr auto kGather = GatherTable(std::make_integer_sequence<int, kPixels>());
constexpr std::array<std::array<std::array<ReduceFn, kVectors>, kPixels>, 2> kReduce = {
    ReduceTable<false>(std::make_integer_sequence<int, kPixels>()),
    ReduceTable<true>(std::make_integer_sequence<int, kPixels>())};

// Kernel rows (and the kernel gradient's rows) are padded to whole vectors of
// kRowMultiple floats, by the caller (see convolution.py), so that XLA
// accounts for that memory too.
constexpr int64_t kRowMultiple = 16;
static_assert(kRowMultiple % kLanes == 0, "rows must be whole vectors");

// A row-major [b, h, w, c] array.
struct Image {
  const float* data;
  int64_t b, h, w, c;
  const float* at(int64_t i, int64_t y, int64_t x) const {
    return data + ((i * h + y) * w + x) * c;
  }
  bool inside(int64_t y, int64_t x) const { return y >= 0 && y < h && x >= 0 && x < w; }
};

Image View(const ffi::Buffer<ffi::F32>& buffer) {
  const auto d = buffer.dimensions();
  return {buffer.typed_data(), d[0], d[1], d[2], d[3]};
}

struct Window {
  int64_t kh, kw, stride_h, stride_w, pad_top, pad_left;
};

// Runs fn(begin, end) over [0, count) in parts of whole tiles, on the
// calling thread and the pool; `macs` is the whole call's multiply-adds.
template <typename Fn>
void SplitPixels(ffi::ThreadPool& pool, int64_t count, int64_t macs, const Fn& fn) {
  const int64_t parts = std::min(optax_mtl::Parts(pool, macs, kMacsPerPart),
                                 std::max<int64_t>(1, (count + kChunk - 1) / kChunk));
  const int64_t per_part = RoundUp((count + parts - 1) / parts, kPixels);
  optax_mtl::ParallelFor(pool, parts, [&](int64_t p) {
    const int64_t begin = p * per_part, end = std::min(count, begin + per_part);
    if (begin < end) fn(begin, end);
  });
}

// The pixels a kernel call computes, in row-major order over [images, rows,
// cols], and where pixel q of them is.
struct Grid {
  int64_t rows, cols;
};

struct Pixel {
  int64_t image, row, col;
};

Pixel Locate(const Grid& grid, int64_t q) {
  return {q / (grid.rows * grid.cols), (q / grid.cols) % grid.rows, q % grid.cols};
}

void Advance(const Grid& grid, Pixel& pixel) {
  if (++pixel.col < grid.cols) return;
  pixel.col = 0;
  if (++pixel.row < grid.rows) return;
  pixel.row = 0;
  ++pixel.image;
}

// For the grid's pixels q in [begin, end): point(pixel, column, &dst) points
// column[t * kPixels] at the row tap t reads (or zeros) and dst at the
// pixel's output row; the products with the taps' `weights` (`depth` rows of
// `ldw` floats each) give its `lanes` outputs. Chunk by chunk of pixels (their
// taps located once), block by block of output channels, tile by tile.
template <typename Point>
void Gather(int64_t begin, int64_t end, const Grid& grid, const Point& point,
            const std::vector<const float*>& weights, int64_t depth, int64_t ldw,
            int64_t lanes) {
  const int64_t taps = static_cast<int64_t>(weights.size());
  const int64_t block = kVectors * kLanes;
  std::vector<const float*> tap_weights(weights.size());
  // Tile k's taps at table[k * taps * kPixels], as GatherTile reads them.
  std::vector<const float*> table(static_cast<size_t>(taps * kChunk));
  float* dst[kChunk];
  Pixel pixel = Locate(grid, begin);
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t pixels = std::min(kChunk, end - c0);
    for (int64_t q = 0; q < pixels; ++q, Advance(grid, pixel))
      point(pixel, table.data() + q / kPixels * taps * kPixels + q % kPixels, &dst[q]);
    for (int64_t n0 = 0; n0 < lanes; n0 += block) {
      const int64_t n = std::min(block, lanes - n0);
      const int64_t vectors = (n + kLanes - 1) / kLanes;
      const int64_t last = n - (vectors - 1) * kLanes;
      for (int64_t t = 0; t < taps; ++t) tap_weights[t] = weights[t] + n0;
      for (int64_t p0 = 0; p0 < pixels; p0 += kPixels) {
        const int64_t count = std::min<int64_t>(kPixels, pixels - p0);
        float* out[kPixels];
        for (int64_t p = 0; p < count; ++p) out[p] = dst[p0 + p] + n0;
        kGather[count - 1][vectors - 1](table.data() + p0 * taps, tap_weights.data(), taps,
                                        depth, ldw, out, last);
      }
    }
  }
}

// in [b, h, w, c]; kernel [kh, kw, c, n rounded up]; out [b, oh, ow, n].
ffi::Error Forward(ffi::ThreadPool& pool, const Image& in, ffi::Span<const int64_t> kernel,
                   const float* weights, ffi::Result<ffi::Buffer<ffi::F32>>& out_buffer,
                   const Window& win) {
  const auto od = out_buffer->dimensions();
  const int64_t ldw = kernel[3], oh = od[1], ow = od[2], n = od[3];
  if (kernel[2] != in.c || od[0] != in.b || ldw != RoundUp(n, kRowMultiple))
    return ffi::Error::InvalidArgument("convolution: operand shapes do not match");
  float* out = out_buffer->typed_data();
  const std::vector<float> zeros(static_cast<size_t>(in.c), 0.0f);
  std::vector<const float*> taps;
  for (int64_t t = 0; t < win.kh * win.kw; ++t) taps.push_back(weights + t * in.c * ldw);
  auto point = [&](const Pixel& q, const float** column, float** dst) {
    *dst = out + ((q.image * oh + q.row) * ow + q.col) * n;
    for (int64_t i = 0, t = 0; i < win.kh; ++i)
      for (int64_t j = 0; j < win.kw; ++j, ++t) {
        const int64_t iy = q.row * win.stride_h + i - win.pad_top;
        const int64_t ix = q.col * win.stride_w + j - win.pad_left;
        column[t * kPixels] = in.inside(iy, ix) ? in.at(q.image, iy, ix) : zeros.data();
      }
  };
  const int64_t count = in.b * oh * ow;
  SplitPixels(pool, count, count * win.kh * win.kw * in.c * n,
              [&](int64_t begin, int64_t end) {
                Gather(begin, end, {oh, ow}, point, taps, in.c, ldw, n);
              });
  return ffi::Error::Success();
}

// The taps of one stride phase along an axis: input index i with
// i % stride == phase reaches output index (i + pad - k) / stride through
// each kernel index k = first + m stride.
struct Phase {
  int64_t first;  // smallest kernel index of the phase
  int64_t taps;   // how many
};

Phase AxisPhase(int64_t phase, int64_t stride, int64_t pad, int64_t kernel) {
  const int64_t first = ((phase + pad) % stride + stride) % stride;
  return {first, first < kernel ? (kernel - first + stride - 1) / stride : 0};
}

// grad [b, oh, ow, n]; kernel transposed, [kh, kw, n, c rounded up];
// out [b, h, w, c]. One pass per stride phase (the input pixels the same
// taps reach); a pixel no tap reaches gets zeros.
ffi::Error InputGradient(ffi::ThreadPool& pool, const Image& grad,
                         ffi::Span<const int64_t> kernel, const float* weights,
                         ffi::Result<ffi::Buffer<ffi::F32>>& out_buffer, const Window& win) {
  const auto od = out_buffer->dimensions();
  const int64_t n = kernel[2], ldw = kernel[3];
  const int64_t b = od[0], h = od[1], w = od[2], c = od[3];
  if (grad.b != b || grad.c != n || ldw != RoundUp(c, kRowMultiple))
    return ffi::Error::InvalidArgument("convolution input gradient: operand shapes do not match");
  float* out = out_buffer->typed_data();
  const std::vector<float> zeros(static_cast<size_t>(n), 0.0f);
  for (int64_t ph = 0; ph < std::min(win.stride_h, h); ++ph) {
    for (int64_t pw = 0; pw < std::min(win.stride_w, w); ++pw) {
      const Phase rows = AxisPhase(ph, win.stride_h, win.pad_top, win.kh);
      const Phase cols = AxisPhase(pw, win.stride_w, win.pad_left, win.kw);
      std::vector<const float*> taps;
      for (int64_t a = 0; a < rows.taps; ++a)
        for (int64_t e = 0; e < cols.taps; ++e) {
          const int64_t i = rows.first + a * win.stride_h, j = cols.first + e * win.stride_w;
          taps.push_back(weights + (i * win.kw + j) * n * ldw);
        }
      const int64_t ny = (h - ph + win.stride_h - 1) / win.stride_h;
      const int64_t nx = (w - pw + win.stride_w - 1) / win.stride_w;
      // The output pixel of a phase pixel's first tap is its own, shifted by
      // an exact quotient (the phase's taps are the ones that divide).
      const int64_t dy = (ph + win.pad_top - rows.first) / win.stride_h;
      const int64_t dx = (pw + win.pad_left - cols.first) / win.stride_w;
      auto point = [&](const Pixel& q, const float** column, float** dst) {
        const int64_t x = pw + q.col * win.stride_w, y = ph + q.row * win.stride_h;
        const int64_t i = q.image;
        *dst = out + ((i * h + y) * w + x) * c;
        const int64_t oy0 = q.row + dy, ox0 = q.col + dx;
        for (int64_t a = 0, t = 0; a < rows.taps; ++a)
          for (int64_t e = 0; e < cols.taps; ++e, ++t) {
            const int64_t oy = oy0 - a, ox = ox0 - e;
            column[t * kPixels] = grad.inside(oy, ox) ? grad.at(i, oy, ox) : zeros.data();
          }
      };
      const int64_t count = b * ny * nx;
      SplitPixels(pool, count, count * static_cast<int64_t>(taps.size()) * n * c,
                  [&](int64_t begin, int64_t end) {
                    Gather(begin, end, {ny, nx}, point, taps, n, ldw, c);
                  });
    }
  }
  return ffi::Error::Success();
}

// in [b, h, w, c]; grad [groups * b, oh, ow, n], `groups` output gradients
// of the same images one after another; out [parts, kh, kw, c, groups * n
// rounded up], column g * n + j for channel j of group g. Part p sums its own
// pixels into out[p], panel by panel of columns and chunk by chunk of pixels
// (a chunk's rows stay in cache for every tap and every column of the
// panel), and out[0] gets the total; the caller sizes `parts` (the memory is
// XLA's) and fewer may be used.
ffi::Error KernelGradient(ffi::ThreadPool& pool, const Image& in, const Image& grad,
                          ffi::Result<ffi::Buffer<ffi::F32>>& out_buffer, const Window& win) {
  const auto od = out_buffer->dimensions();
  if (od.size() != 5) return ffi::Error::InvalidArgument("kernel gradient: expected 5 dims");
  const int64_t slots = od[0], ldw = od[4], oh = grad.h, ow = grad.w;
  const int64_t groups = in.b > 0 ? grad.b / in.b : 0, columns = groups * grad.c;
  // A vector of columns reads one group's gradient rows: whole vectors per group.
  if (slots < 1 || od[1] != win.kh || od[2] != win.kw || od[3] != in.c || groups < 1 ||
      grad.b != groups * in.b || ldw != RoundUp(columns, kRowMultiple) ||
      (groups > 1 && grad.c % kLanes != 0))
    return ffi::Error::InvalidArgument("convolution kernel gradient: operand shapes do not match");
  const int64_t group_stride = in.b * oh * ow * grad.c;
  float* out = out_buffer->typed_data();
  const int64_t size = win.kh * win.kw * in.c * ldw, count = in.b * oh * ow;
  const int64_t parts = std::min({optax_mtl::Parts(pool, count * size, kMacsPerPart), slots,
                                  std::max<int64_t>(1, (count + kChunk - 1) / kChunk)});
  std::fill_n(out, parts * size, 0.0f);
  const std::vector<float> zeros(static_cast<size_t>(in.c), 0.0f);
  const int64_t per_part = RoundUp((count + parts - 1) / parts, kChunk);
  const int64_t block = kVectors * kLanes;
  // Columns in panels whose slice of a part's sums, [kh, kw, c, panel],
  // stays in cache over the part's pixels (groups of gradients make many
  // columns); each chunk's taps are located once per panel.
  const int64_t panel = std::max(block, kPanelFloats / (win.kh * win.kw * in.c) / block * block);
  optax_mtl::ParallelFor(pool, parts, [&](int64_t p) {
    float* acc = out + p * size;
    int64_t base[kChunk][3];  // (b, first input row, first input column) per pixel
    const float* sources[kChunk];
    const float* grads[kChunk];
    for (int64_t p0 = 0; p0 < columns; p0 += panel) {
      const int64_t p1 = std::min(columns, p0 + panel);
      for (int64_t q0 = p * per_part; q0 < std::min(count, (p + 1) * per_part); q0 += kChunk) {
        const int64_t pixels = std::min(kChunk, count - q0);
        Pixel pixel = Locate({oh, ow}, q0);
        for (int64_t q = 0; q < pixels; ++q, Advance({oh, ow}, pixel)) {
          base[q][0] = pixel.image;
          base[q][1] = pixel.row * win.stride_h - win.pad_top;
          base[q][2] = pixel.col * win.stride_w - win.pad_left;
          grads[q] = grad.data + (q0 + q) * grad.c;
        }
        for (int64_t i = 0; i < win.kh; ++i)
          for (int64_t j = 0; j < win.kw; ++j) {
            for (int64_t q = 0; q < pixels; ++q) {
              const int64_t iy = base[q][1] + i, ix = base[q][2] + j;
              sources[q] = in.inside(iy, ix) ? in.at(base[q][0], iy, ix) : zeros.data();
            }
            float* tap = acc + (i * win.kw + j) * in.c * ldw;
            for (int64_t n0 = p0; n0 < p1; n0 += block) {
              const int64_t n = std::min(block, p1 - n0);
              const int64_t vectors = (n + kLanes - 1) / kLanes;
              const int64_t last = n - (vectors - 1) * kLanes;
              int64_t offsets[kVectors];
              for (int64_t v = 0; v < vectors; ++v) {
                const int64_t column = n0 + v * kLanes;
                offsets[v] = column / grad.c * group_stride + column % grad.c;
              }
              for (int64_t c0 = 0; c0 < in.c; c0 += kPixels) {
                const int64_t rows = std::min<int64_t>(kPixels, in.c - c0);
                kReduce[last != kLanes][rows - 1][vectors - 1](
                    sources, c0, grads, offsets, pixels, tap + c0 * ldw + n0, ldw, last);
              }
            }
          }
      }
    }
  });
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t e = 0; e < size; ++e) out[e] += out[p * size + e];
  return ffi::Error::Success();
}

// Checks a call's operands, output and attributes.
ffi::Error CheckCall(std::initializer_list<const ffi::Buffer<ffi::F32>*> operands,
                     ffi::ResultBuffer<ffi::F32>& out, size_t out_rank,
                     int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_left) {
  for (const auto* operand : operands)
    if (operand->dimensions().size() != 4)
      return ffi::Error::InvalidArgument("expected NHWC images and HWIO kernels");
  if (out->dimensions().size() != out_rank)
    return ffi::Error::InvalidArgument("convolution: unexpected output rank");
  if (stride_h < 1 || stride_w < 1 || pad_top < 0 || pad_left < 0)
    return ffi::Error::InvalidArgument("strides must be positive and paddings non-negative");
  return ffi::Error::Success();
}

ffi::Error ConvolutionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> in,
                           ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> out,
                           int64_t stride_h, int64_t stride_w, int64_t pad_top,
                           int64_t pad_left) {
  ffi::Error e = CheckCall({&in, &kernel}, out, 4, stride_h, stride_w, pad_top, pad_left);
  if (e.failure() || out->element_count() == 0) return e;
  const auto k = kernel.dimensions();
  return Forward(pool, View(in), k, kernel.typed_data(), out,
                 {k[0], k[1], stride_h, stride_w, pad_top, pad_left});
}

ffi::Error InputGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> grad,
                             ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> out,
                             int64_t stride_h, int64_t stride_w, int64_t pad_top,
                             int64_t pad_left) {
  ffi::Error e = CheckCall({&grad, &kernel}, out, 4, stride_h, stride_w, pad_top, pad_left);
  if (e.failure() || out->element_count() == 0) return e;
  const auto k = kernel.dimensions();
  return InputGradient(pool, View(grad), k, kernel.typed_data(), out,
                       {k[0], k[1], stride_h, stride_w, pad_top, pad_left});
}

// The output holds one [kh, kw, c, n] slot per thread; the total lands in slot 0.
ffi::Error KernelGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> in,
                              ffi::Buffer<ffi::F32> grad, ffi::ResultBuffer<ffi::F32> out,
                              int64_t stride_h, int64_t stride_w, int64_t pad_top,
                              int64_t pad_left) {
  ffi::Error e = CheckCall({&in, &grad}, out, 5, stride_h, stride_w, pad_top, pad_left);
  if (e.failure() || out->element_count() == 0) return e;
  const auto d = out->dimensions();
  return KernelGradient(pool, View(in), View(grad), out,
                        {d[1], d[2], stride_h, stride_w, pad_top, pad_left});
}

#define OPTAX_MTL_CONVOLUTION_BINDING                \
  ffi::Ffi::Bind()                                   \
      .Ctx<ffi::ThreadPool>()                        \
      .Arg<ffi::Buffer<ffi::F32>>()                  \
      .Arg<ffi::Buffer<ffi::F32>>()                  \
      .Ret<ffi::Buffer<ffi::F32>>()                  \
      .Attr<int64_t>("stride_h")                     \
      .Attr<int64_t>("stride_w")                     \
      .Attr<int64_t>("pad_top")                      \
      .Attr<int64_t>("pad_left")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxMtlConvolution, ConvolutionImpl,
                              OPTAX_MTL_CONVOLUTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxMtlConvolutionInputGradient, InputGradientImpl,
                              OPTAX_MTL_CONVOLUTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxMtlConvolutionKernelGradient, KernelGradientImpl,
                              OPTAX_MTL_CONVOLUTION_BINDING);

// The vector width the kernels were built with, in floats: the gradient paths
// use them with 8 (AVX) or 16 (AVX-512), where they were measured faster than
// XLA:CPU's convolutions, not with 4 (native.py).
extern "C" int OptaxMtlConvolutionLanes() { return kLanes; }
