// Task-by-task inner products of row-major [T, n] float32 matrices on the CPU,
// as XLA FFI handlers: G = A A^T (the Gramian of a leaf's T task gradients),
// and C = A B^T with the rows' squared norms (the cross matrix of two
// batches and both batches' norms, from one read of each).
//
// XLA:CPU computes these products with a general matrix multiply that reads a
// [T, n] operand against its contracting axis (or transposes it first) and
// works out all T^2 entries. Here each output tile is a register-blocked run
// of dot products along the rows, which are contiguous, and the Gramian's
// symmetric half is skipped: at T = 40, n = 500k this is about twice as fast
// as a BLAS sgemm on a 2-core AVX-512 machine, and at small T it runs at
// memory bandwidth.
//
// Numerics: each tile accumulates float32 products in vector lanes over one
// panel of PANEL columns, the lanes are summed in float32 and the panel sums
// in float64, so the result is at least as accurate as a float32 GEMM.

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vector width in floats and tile size in rows, by instruction set: a tile of
// R x R accumulators plus R + 1 operand vectors fits in the register file
// (32 registers with AVX-512, 16 otherwise).
#if defined(__AVX512F__)
constexpr int kWidth = 16;
constexpr int kTile = 5;
#elif defined(__AVX__)
constexpr int kWidth = 8;
constexpr int kTile = 3;
#else
constexpr int kWidth = 4;
constexpr int kTile = 3;
#endif

// Columns per panel: a panel of T rows stays in the core's L2 cache while its
// tiles are computed (4096 measured fastest of 1k-8k at T = 10 and 40).
constexpr int64_t kPanel = 4096;

// Fewer entries than this (1 MiB) per thread are not worth a task of their own.
constexpr int64_t kEntriesPerTask = int64_t{1} << 18;

typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));

// out[r * stride + c] += <a[r], b[c]> over columns [k0, k1) of the rows a[0..RI)
// and b[0..RJ).
template <int RI, int RJ>
void Tile(const float* const* a, const float* const* b, int64_t k0, int64_t k1,
          double* out, int64_t stride) {
  Vec acc[RI][RJ];
  for (int r = 0; r < RI; ++r)
    for (int c = 0; c < RJ; ++c) acc[r][c] = Vec{};
  int64_t k = k0;
  for (; k + kWidth <= k1; k += kWidth) {
    Vec x[RI];
    for (int r = 0; r < RI; ++r) std::memcpy(&x[r], a[r] + k, sizeof(Vec));
    for (int c = 0; c < RJ; ++c) {
      Vec y;
      std::memcpy(&y, b[c] + k, sizeof(Vec));
      for (int r = 0; r < RI; ++r) acc[r][c] += x[r] * y;
    }
  }
  for (int r = 0; r < RI; ++r) {
    for (int c = 0; c < RJ; ++c) {
      float sum = 0.0f;
      for (int64_t q = k; q < k1; ++q) sum += a[r][q] * b[c][q];
      for (int lane = 0; lane < kWidth; ++lane) sum += acc[r][c][lane];
      out[r * stride + c] += sum;
    }
  }
}

using TileFn = void (*)(const float* const*, const float* const*, int64_t, int64_t,
                        double*, int64_t);

// kTiles[ri - 1][rj - 1] is Tile<ri, rj>: the edge tiles of a T that is not a
// multiple of kTile.
template <int RI, int... RJ>
constexpr std::array<TileFn, sizeof...(RJ)> Row(std::integer_sequence<int, RJ...>) {
  return {Tile<RI, RJ + 1>...};
}

template <int... RI>
constexpr std::array<std::array<TileFn, kTile>, kTile> Table(std::integer_sequence<int, RI...>) {
  return {Row<RI + 1>(std::make_integer_sequence<int, kTile>())...};
}

constexpr auto kTiles = Table(std::make_integer_sequence<int, kTile>());

// What one call computes, from row pointers into the operands.
struct Problem {
  std::vector<const float*> a, b;  // rows of the two operands
  int64_t n;                       // columns
  bool symmetric;                  // a == b: tiles on or above the diagonal only
  // Squared norms of every row of a and of b, beside the product (the cross
  // matrix's statistics; a Gramian has them on its diagonal).
  bool norms;
  int64_t size() const {
    return static_cast<int64_t>(a.size() * b.size() + (norms ? a.size() + b.size() : 0));
  }
};

// Adds the terms of columns [c0, c1) into out: the [rows, cols] product, then
// (with norms) the rows' and the columns' squared norms; float64.
void Columns(const Problem& problem, int64_t c0, int64_t c1, double* out) {
  const int64_t rows = problem.a.size(), cols = problem.b.size();
  for (int64_t k0 = c0; k0 < c1; k0 += kPanel) {
    const int64_t k1 = k0 + kPanel < c1 ? k0 + kPanel : c1;
    for (int64_t i = 0; i < rows; i += kTile) {
      const int64_t ri = rows - i < kTile ? rows - i : kTile;
      for (int64_t j = problem.symmetric ? i : 0; j < cols; j += kTile) {
        const int64_t rj = cols - j < kTile ? cols - j : kTile;
        kTiles[ri - 1][rj - 1](&problem.a[i], &problem.b[j], k0, k1, out + i * cols + j,
                               cols);
      }
    }
    if (problem.norms) {
      // The panel is still in cache: each norm is one more pass over it.
      double* norms = out + rows * cols;
      for (int64_t i = 0; i < rows; ++i)
        Tile<1, 1>(&problem.a[i], &problem.a[i], k0, k1, norms + i, 1);
      for (int64_t j = 0; j < cols; ++j)
        Tile<1, 1>(&problem.b[j], &problem.b[j], k0, k1, norms + rows + j, 1);
    }
  }
}

// Splits the columns into parts, each summed into its own float64 terms, run
// on the calling thread and XLA's intra-op pool, and writes the float32 sums
// into result (the symmetric product mirrored).
void Solve(ffi::ThreadPool& pool, const Problem& problem, float* result) {
  const int64_t n = problem.n, size = problem.size();
  const int64_t operand_rows = static_cast<int64_t>(
      problem.a.size() + (problem.symmetric ? 0 : problem.b.size()));
  const int64_t parts = optax_mtl::Parts(pool, n * operand_rows, kEntriesPerTask);
  // Part boundaries on vector-width multiples keep every part's vectors whole.
  const int64_t per_part = ((n + parts - 1) / parts + kWidth - 1) / kWidth * kWidth;
  std::vector<double> sums(static_cast<size_t>(parts * size), 0.0);
  optax_mtl::ParallelFor(pool, parts, [&](int64_t p) {
    const int64_t c0 = p * per_part;
    const int64_t c1 = c0 + per_part < n ? c0 + per_part : n;
    if (c0 < c1) Columns(problem, c0, c1, sums.data() + p * size);
  });

  const int64_t rows = problem.a.size(), cols = problem.b.size();
  auto total = [&](int64_t index) {
    double value = 0.0;
    for (int64_t p = 0; p < parts; ++p) value += sums[p * size + index];
    return static_cast<float>(value);
  };
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = problem.symmetric ? i : 0; j < cols; ++j) {
      result[i * cols + j] = total(i * cols + j);
      if (problem.symmetric) result[j * cols + i] = result[i * cols + j];
    }
  }
  for (int64_t index = rows * cols; index < size; ++index) result[index] = total(index);
}

std::vector<const float*> Rows(const float* data, int64_t rows, int64_t n) {
  std::vector<const float*> out(rows);
  for (int64_t i = 0; i < rows; ++i) out[i] = data + i * n;
  return out;
}

ffi::Error CheckMatrix(const ffi::Buffer<ffi::F32>& x) {
  if (x.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("expected a [T, n] matrix");
  return ffi::Error::Success();
}

ffi::Error GramianImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                       ffi::ResultBuffer<ffi::F32> out) {
  if (ffi::Error error = CheckMatrix(a); error.failure()) return error;
  const int64_t rows = a.dimensions()[0], n = a.dimensions()[1];
  const std::vector<const float*> rows_a = Rows(a.typed_data(), rows, n);
  Solve(pool, Problem{rows_a, rows_a, n, true, false}, out->typed_data());
  return ffi::Error::Success();
}

// out: the [T, S] product, then the T squared norms of a and the S of b.
ffi::Error CrossImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                     ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  if (ffi::Error error = CheckMatrix(a); error.failure()) return error;
  if (ffi::Error error = CheckMatrix(b); error.failure()) return error;
  const int64_t n = a.dimensions()[1];
  if (b.dimensions()[1] != n)
    return ffi::Error::InvalidArgument("the two matrices need as many columns");
  Solve(pool,
        Problem{Rows(a.typed_data(), a.dimensions()[0], n),
                Rows(b.typed_data(), b.dimensions()[0], n), n, false, true},
        out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxMtlGramian, GramianImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxMtlCross, CrossImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
