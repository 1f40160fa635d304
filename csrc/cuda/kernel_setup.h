// How every kernel launch is prepared and checked, shared by the CUDA launcher (ash_cuda_run.cuh)
// and the emulated one (tests/emulation), which provides the same runtime calls, so that the
// emulator's launch rules test this very code.
//
// A kernel's dynamic shared memory beyond 48 KiB minus its static shared memory needs
// cudaFuncAttributeMaxDynamicSharedMemorySize. It is set once per kernel and device, before the
// kernel's first launch with dynamic shared memory, to the most any plan uses on that device
// (max_dynamic_shared_bytes), whatever the size of the launch at hand: a launch just under 48
// KiB needs it as much as one above, and a value that never changes cannot be lowered by one
// host thread between another's setting and launch.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/launch_plan.h"

namespace ash_ext {
namespace cuda_detail {

// What the runtime reports of a compiled kernel.
struct KernelFacts {
  int max_threads;       // per block: 1024, or less under __launch_bounds__ / register use
  size_t static_shared;  // bytes of __shared__ variables
};

class KernelSetup {
 public:
  static KernelSetup& instance() {
    static KernelSetup setup;
    return setup;
  }

  // The kernel's facts on `device`, with its dynamic shared-memory limit raised to
  // `dynamic_limit` first if `uses_dynamic_shared`. Thread-safe; the runtime is called once per
  // kernel and device (twice where a kernel is first launched without dynamic shared memory).
  // Clusters of more than 8 blocks need cudaFuncAttributeNonPortableClusterSizeAllowed, set once
  // on the first such launch (`large_clusters`).
  KernelFacts prepare(const void* kernel, int device, bool uses_dynamic_shared, size_t dynamic_limit,
                      bool large_clusters = false) {
    const std::lock_guard<std::mutex> lock(mutex_);
    Entry& entry = entries_[std::make_pair(kernel, device)];
    if (!entry.have_facts) {
      cudaFuncAttributes attributes{};
      check(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
      entry.facts = KernelFacts{attributes.maxThreadsPerBlock, attributes.sharedSizeBytes};
      entry.have_facts = true;
    }
    if (uses_dynamic_shared && !entry.dynamic_limit_set) {
      // The planner leaves kStaticSharedAllowance beside the dynamic allocation.
      TORCH_CHECK(entry.facts.static_shared <= kStaticSharedAllowance, "ash_ext: a CUDA kernel with dynamic shared ",
                  "memory declares ", entry.facts.static_shared, " bytes of static shared memory, more than the ",
                  kStaticSharedAllowance, " the launch planner allows for");
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_limit)),
            "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
      entry.dynamic_limit_set = true;
    }
    if (large_clusters && !entry.large_clusters_set) {
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
            "cudaFuncSetAttribute(NonPortableClusterSizeAllowed)");
      entry.large_clusters_set = true;
    }
    return entry.facts;
  }

 private:
  struct Entry {
    KernelFacts facts{};
    bool have_facts = false;
    bool dynamic_limit_set = false;
    bool large_clusters_set = false;
  };

  static void check(cudaError_t status, const char* call) {
    TORCH_CHECK(status == cudaSuccess, "ash_ext: ", call, " failed: ", cudaGetErrorString(status));
  }

  std::mutex mutex_;
  std::map<std::pair<const void*, int>, Entry> entries_;
};

// Prepares `kernel` for a launch of grid x block threads (in clusters of cluster_blocks blocks)
// with `shared_bytes` of dynamic shared memory on `device`, and checks the launch against the
// kernel's facts and the plan's limits, so that a planner bug is a clear error here and never a
// failed launch.
inline void prepare_launch(const void* kernel, int device, unsigned grid, unsigned block, size_t shared_bytes,
                           size_t dynamic_limit, unsigned cluster_blocks = 1) {
  TORCH_CHECK(cluster_blocks >= 1 && cluster_blocks <= static_cast<unsigned>(kMaxClusterBlocks) &&
                  grid % cluster_blocks == 0,
              "ash_ext: a launch of ", grid, " blocks in clusters of ", cluster_blocks);
  const bool large_clusters = cluster_blocks > static_cast<unsigned>(kMaxPortableClusterBlocks);
  const KernelFacts facts = KernelSetup::instance().prepare(
      kernel, device, shared_bytes > 0, dynamic_limit, large_clusters);
  TORCH_CHECK(grid >= 1 && grid <= static_cast<unsigned>(INT_MAX), "ash_ext: a launch of ", grid, " blocks");
  TORCH_CHECK(block >= 1 && static_cast<int>(block) <= facts.max_threads, "ash_ext: a launch of ", block,
              " threads per block, but the kernel allows at most ", facts.max_threads);
  TORCH_CHECK(shared_bytes <= dynamic_limit, "ash_ext: a launch with ", shared_bytes,
              " bytes of dynamic shared memory, over the kernel's limit of ", dynamic_limit);
}

}  // namespace cuda_detail
}  // namespace ash_ext
