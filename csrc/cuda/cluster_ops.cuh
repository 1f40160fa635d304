// Thread-block clusters (sm_90 and later): the few cluster operations the cluster regime uses,
// behind one interface that the CUDA build maps to cooperative groups and the emulator
// (tests/emulation/shim) to its own model of clusters, which checks their rules.
//
// The rules the cluster kernel follows, and the emulator enforces:
//  * cluster_sync() is reached by every thread of every block of the cluster (else: deadlock);
//    it orders every block's shared-memory writes before every block's reads after it;
//  * another block's shared memory is read only through cluster_read, and only what that block
//    wrote before a cluster_sync the reader has passed since;
//  * no block exits while another block may still read its shared memory: a cluster_sync comes
//    between the last remote read and the exit of the block read from.
// Compiled for architectures before sm_90, the operations trap: the planner never chooses the
// cluster regime there (DeviceLimits::max_cluster_blocks is 0).
#pragma once

#include <cuda_runtime.h>

#if !defined(ASH_EXT_CUDA_EMULATION)
#include <cooperative_groups.h>
#endif

namespace ash_ext {
namespace cuda_detail {

#if defined(ASH_EXT_CUDA_EMULATION)
__device__ __forceinline__ unsigned cluster_block_rank() {
  return ::emu::Runtime::get().cluster_rank();
}
__device__ __forceinline__ unsigned cluster_block_count() {
  return ::emu::Runtime::get().cluster_size();
}
__device__ __forceinline__ void cluster_sync() {
  ::emu::Runtime::get().sync_cluster();
}
// *local as block `rank` of the cluster holds it (local: an address in this block's shared memory).
template <typename T>
__device__ __forceinline__ T cluster_read(const T* local, unsigned rank) {
  return *static_cast<const T*>(::emu::Runtime::get().map_cluster_shared(local, sizeof(T), rank));
}
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_block_rank() {
  return cooperative_groups::this_cluster().block_rank();
}
__device__ __forceinline__ unsigned cluster_block_count() {
  return cooperative_groups::this_cluster().num_blocks();
}
__device__ __forceinline__ void cluster_sync() {
  cooperative_groups::this_cluster().sync();
}
template <typename T>
__device__ __forceinline__ T cluster_read(const T* local, unsigned rank) {
  return *cooperative_groups::this_cluster().map_shared_rank(const_cast<T*>(local), rank);
}
#else
__device__ __forceinline__ unsigned cluster_block_rank() {
  __trap();
  return 0;
}
__device__ __forceinline__ unsigned cluster_block_count() {
  __trap();
  return 1;
}
__device__ __forceinline__ void cluster_sync() {
  __trap();
}
template <typename T>
__device__ __forceinline__ T cluster_read(const T* local, unsigned) {
  __trap();
  return *local;
}
#endif

// The digit counts of a selection made by a whole cluster (see BlockHistogram, radix_select.cuh):
// each block counts its slice into its own histogram; after a cluster barrier every block adds
// the cluster's histograms bucket by bucket (integers: the order does not matter), so all blocks
// choose the same bucket; a second barrier lets the next pass clear the histograms.
struct ClusterHistogram {
  unsigned* hist;  // this block's
  unsigned blocks;

  __device__ __forceinline__ void counted() const { cluster_sync(); }
  __device__ __forceinline__ unsigned long long count(int digit) const {
    unsigned long long total = 0;
    for (unsigned rank = 0; rank < blocks; ++rank) {
      total += cluster_read(hist + digit, rank);
    }
    return total;
  }
  __device__ __forceinline__ void read() const { cluster_sync(); }
};

}  // namespace cuda_detail
}  // namespace ash_ext
