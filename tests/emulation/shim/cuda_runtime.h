// A CPU stand-in for the parts of CUDA that ash_ext's kernels use, so that the kernels (and the
// launch sequence that drives them) run as plain C++ on a machine without a GPU.
//
// Each thread block runs as blockDim.x cooperative fibers (ucontext) on one OS thread, one block
// after another, in a shuffled block order. A fiber runs until it reaches a barrier
// (__syncthreads, or the warp barrier inside a shuffle) and the fibers of a round run in a
// shuffled order, so code that reads shared data without the barrier that orders it tends to
// see stale values. A barrier that some threads of the block never reach (a divergent
// __syncthreads or an early return) is reported as a deadlock and aborts. __shared__ variables
// become statics (one block runs at a time); dynamic shared memory is refilled with 0xCD before
// each block. This checks the kernels' logic, not the memory model (fences are no-ops) and not
// performance.
//
// Used only by tests/emulation; the real build includes CUDA's own <cuda_runtime.h>.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#ifndef ASH_EXT_CUDA_EMULATION
#error "the CUDA emulation shim needs ASH_EXT_CUDA_EMULATION defined"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __align__(n) alignas(n)

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline Dim3 thread_idx, block_idx, block_dim, grid_dim;

constexpr unsigned kWarp = 32;
constexpr size_t kFiberStackBytes = 256 * 1024;

class Runtime {
 public:
  static Runtime& get() {
    static Runtime runtime;
    return runtime;
  }

  void seed(uint64_t seed) { rng_.seed(seed); }

  unsigned char* dynamic_shared() { return dynamic_shared_.data(); }

  void run_grid(unsigned grid, unsigned block, size_t shared_bytes, const std::function<void()>& body) {
    if (block == 0 || block % kWarp != 0 || block > 1024) {
      fail("block size must be a positive multiple of 32, at most 1024");
    }
    grid_dim = Dim3{grid, 1, 1};
    block_dim = Dim3{block, 1, 1};
    std::vector<unsigned> order(grid);
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin(), order.end(), rng_);
    for (unsigned b : order) {
      block_idx = Dim3{b, 0, 0};
      dynamic_shared_.assign(shared_bytes + 16, 0xCD);
      run_block(block, body);
    }
  }

  void sync_block() {
    ++progress_;
    const uint64_t generation = block_generation_;
    if (++block_arrived_ == block_dim.x) {
      block_arrived_ = 0;
      ++block_generation_;
      return;
    }
    while (block_generation_ == generation) {
      yield();
    }
  }

  void sync_warp() {
    ++progress_;
    const unsigned warp = thread_idx.x / kWarp;
    const uint64_t generation = warp_generation_[warp];
    if (++warp_arrived_[warp] == kWarp) {
      warp_arrived_[warp] = 0;
      ++warp_generation_[warp];
      return;
    }
    while (warp_generation_[warp] == generation) {
      yield();
    }
  }

  // The value `lane_delta` lanes away (down: higher lanes), or the caller's own value where that
  // lane is outside the warp, like __shfl_down_sync / __shfl_up_sync with a full mask.
  template <typename T>
  T shuffle(T value, int lane_delta, bool down) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
    const unsigned lane = thread_idx.x % kWarp;
    const unsigned warp_base = thread_idx.x - lane;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    lane_values_[thread_idx.x] = bits;
    sync_warp();
    const int source = down ? static_cast<int>(lane) + lane_delta : static_cast<int>(lane) - lane_delta;
    T result = value;
    if (source >= 0 && source < static_cast<int>(kWarp)) {
      std::memcpy(&result, &lane_values_[warp_base + static_cast<unsigned>(source)], sizeof(T));
    }
    sync_warp();
    return result;
  }

  // The lanes whose value equals the caller's, like __match_any_sync with a full mask.
  unsigned match_any(unsigned value) {
    const unsigned lane = thread_idx.x % kWarp;
    const unsigned warp_base = thread_idx.x - lane;
    lane_values_[thread_idx.x] = value;
    sync_warp();
    unsigned peers = 0;
    for (unsigned other = 0; other < kWarp; ++other) {
      if (lane_values_[warp_base + other] == value) {
        peers |= 1u << other;
      }
    }
    sync_warp();
    return peers;
  }

  [[noreturn]] static void fail(const char* what) {
    std::fprintf(stderr, "CUDA emulation: %s (block %u, thread %u)\n", what, block_idx.x, thread_idx.x);
    std::fflush(stderr);
    std::abort();
  }

 private:
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool finished = false;
  };

  static void fiber_main() {
    Runtime& r = get();
    (*r.body_)();
    r.fibers_[r.current_].finished = true;
    ++r.progress_;
    swapcontext(&r.fibers_[r.current_].context, &r.scheduler_);
    fail("a finished fiber was resumed");
  }

  void yield() { swapcontext(&fibers_[current_].context, &scheduler_); }

  void run_block(unsigned block, const std::function<void()>& body) {
    body_ = &body;
    fibers_.resize(block);
    for (Fiber& fiber : fibers_) {
      if (!fiber.stack) {
        fiber.stack.reset(new char[kFiberStackBytes]);
      }
      fiber.finished = false;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kFiberStackBytes;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, &Runtime::fiber_main, 0);
    }
    block_arrived_ = 0;
    warp_arrived_.assign(block / kWarp, 0);
    warp_generation_.assign(block / kWarp, 0);
    lane_values_.assign(block, 0);
    std::vector<unsigned> order(block);
    std::iota(order.begin(), order.end(), 0u);
    for (;;) {
      const uint64_t progress_before = progress_;
      std::shuffle(order.begin(), order.end(), rng_);
      bool any_running = false;
      for (unsigned t : order) {
        if (fibers_[t].finished) {
          continue;
        }
        any_running = true;
        current_ = t;
        thread_idx = Dim3{t, 0, 0};
        swapcontext(&scheduler_, &fibers_[t].context);
      }
      if (!any_running) {
        break;
      }
      if (progress_ == progress_before) {
        fail("deadlock: threads wait at a barrier that others never reach");
      }
    }
  }

  std::mt19937_64 rng_{20240601u};
  ucontext_t scheduler_{};
  std::vector<Fiber> fibers_;
  unsigned current_ = 0;
  const std::function<void()>* body_ = nullptr;
  unsigned block_arrived_ = 0;
  uint64_t block_generation_ = 0;
  std::vector<unsigned> warp_arrived_;
  std::vector<uint64_t> warp_generation_;
  std::vector<uint64_t> lane_values_;
  uint64_t progress_ = 0;
  std::vector<unsigned char> dynamic_shared_;
};

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() {
  emu::Runtime::get().sync_block();
}

inline void __threadfence() {}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, int delta) {
  if (mask != 0xffffffffu) {
    emu::Runtime::fail("only full-warp shuffles are emulated");
  }
  return emu::Runtime::get().shuffle(value, delta, true);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, int delta) {
  if (mask != 0xffffffffu) {
    emu::Runtime::fail("only full-warp shuffles are emulated");
  }
  return emu::Runtime::get().shuffle(value, delta, false);
}

inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  if (mask != 0xffffffffu) {
    emu::Runtime::fail("only full-warp matches are emulated");
  }
  return emu::Runtime::get().match_any(value);
}

inline int __ffs(unsigned x) {
  return x == 0 ? 0 : __builtin_ctz(x) + 1;
}

inline int __popc(unsigned x) {
  return __builtin_popcount(x);
}

// Fibers never run at the same time, so a read-modify-write is atomic as it stands.
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T __ldcg(const T* address) {
  return *address;
}

inline int min(int a, int b) {
  return a < b ? a : b;
}

// The kernels' dynamic shared memory (ash_kernels.cuh leaves its own out under emulation), 16-byte
// aligned like CUDA's.
inline unsigned char* dynamic_shared_memory() {
  unsigned char* base = emu::Runtime::get().dynamic_shared();
  const uintptr_t misalignment = reinterpret_cast<uintptr_t>(base) % 16;
  return misalignment == 0 ? base : base + (16 - misalignment);
}
