// Splitting one FFI call's work over XLA's intra-op thread pool.
//
// Shared by the kernels of this directory (products.cc, convolutions.cc).

#ifndef OPTAX_MTL_ENGINE_PARALLEL_H_
#define OPTAX_MTL_ENGINE_PARALLEL_H_

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace optax_mtl {

// How many parts to split `work` units into: one per `per_part` units, at
// least one, at most one per thread of the pool.
inline int64_t Parts(const xla::ffi::ThreadPool& pool, int64_t work, int64_t per_part) {
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  int64_t parts = work / per_part;
  return parts < 1 ? 1 : (parts > threads ? threads : parts);
}

// Runs part(p) for p in [0, parts) on the calling thread and the pool, and
// returns when all have run. A part is claimed and counted as running under
// one lock, so the caller never sees "none left, none running" while a
// helper is about to start; it waits only for parts already started, so a
// busy pool cannot stall it. A helper that starts after the caller returned
// finds no part left and touches nothing but the shared state it co-owns.
template <typename Part>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t parts, const Part& part) {
  struct Shared {
    std::mutex mutex;
    std::condition_variable done;
    int64_t next = 0;
    int64_t running = 0;
  };
  auto shared = std::make_shared<Shared>();
  const Part* body = &part;
  auto work = [shared, body, parts]() {
    for (;;) {
      int64_t p;
      {
        std::lock_guard<std::mutex> lock(shared->mutex);
        if (shared->next >= parts) return;
        p = shared->next++;
        ++shared->running;
      }
      (*body)(p);
      std::lock_guard<std::mutex> lock(shared->mutex);
      if (--shared->running == 0) shared->done.notify_all();
    }
  };
  for (int64_t p = 1; p < parts; ++p) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->done.wait(lock, [&] { return shared->running == 0; });
}

}  // namespace optax_mtl

#endif  // OPTAX_MTL_ENGINE_PARALLEL_H_
