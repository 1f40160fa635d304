// A CPU stand-in for the parts of CUDA that ash_ext's kernels use, so that the kernels (and the
// launch sequence that drives them) run as plain C++ on a machine without a GPU, with the rules
// a GPU enforces checked and the bugs a GPU would punish made visible.
//
// Execution. Every thread of a block is a cooperative fiber on the calling OS thread.
// Up to kResidentFibers fibers' worth of blocks of one grid are resident at once, as on a GPU's
// multiprocessors, started in a shuffled order; the scheduler runs rounds in which every
// runnable fiber of every resident block, in a shuffled order, runs until its next switch point:
// a barrier (__syncthreads, and the warp barrier inside a shuffle or match), an atomic (the
// switch comes before the read-modify-write) or a fence; in each round a random half of the
// resident blocks stands still. So blocks of a grid interleave at different speeds, the
// last-block protocols of the chunked pipeline run with other blocks half-way, and code that
// reads shared data without the barrier that orders it tends to see stale values. A barrier
// that some threads never reach is reported as a deadlock (abort).
//
// Clusters. A launch may group its blocks into thread-block clusters (consecutive blocks, as
// cudaLaunchKernelEx's cluster dimension does): a cluster's blocks are made resident together,
// cluster_sync is a barrier over all their threads, and a block reads another's shared memory
// only through map_cluster_shared, which maps an address in the caller's shared memory to the
// same variable in the other block. Checked: the cluster size (at most 8, or 16 where the
// kernel's non-portable attribute is set, and only on a device with clusters), a grid that is a
// whole number of clusters, a rank inside the cluster, a mapped address inside shared memory,
// no read of a block that has exited, and no block exiting while another block of its cluster
// may still read it (a cluster barrier must come between the last read and the exit). Reads of
// another block's memory before it was written show up as the poison below, or as races under
// ThreadSanitizer (cluster barriers are the only happens-before between a cluster's blocks).
//
// Traffic. Every access the kernels make to a tensor's elements (load_pack, store_pack,
// load_element, store_element in block_ops.cuh) is counted, in bytes read and written, unless it
// is to shared memory; take_traffic() returns the counts, which tests compare with the plan's.
//
// Memory. Each block has its own dynamic and static shared memory, filled with 0xCD when the
// block starts; static shared variables are declared with ASH_SHARED (block_ops.cuh), since a
// plain `__shared__` (a C++ static) would be shared by interleaved blocks and keep the last
// block's values. Out-of-bounds accesses are found by building the emulation with
// AddressSanitizer and UndefinedBehaviorSanitizer; data races (a missing barrier, a plain +=
// where an atomic is needed, a missing fence) by building it with ThreadSanitizer, where every
// emulated thread is a TSan fiber and only barriers, fences and kernel boundaries create
// happens-before (run_emulation.py --sanitize).
//
// Launch rules (checked for every launch; a violation raises, as the launch would fail):
// blocks of 1..1024 threads, a multiple of 32 (the kernels' own assumption); 1..2^31-1 blocks;
// static shared memory at most 48 KiB; dynamic shared memory at most 48 KiB minus the kernel's
// static shared memory unless cudaFuncSetAttribute raised the kernel's limit, and static +
// dynamic within the device's opt-in limit. Lowering a kernel's limit once set is refused too:
// with several host threads launching, it can undercut a launch of another thread. A kernel's
// static shared memory is what its ASH_SHARED variables took in the blocks run so far, so a
// kernel's first launch is checked when it ends. Not emulated: registers and __launch_bounds__
// (tests/test_cuda_resources.py checks them on the compiled kernels), the memory model beyond
// the happens-before above, warp-synchronous execution, numerics (host expf, no FMA), streams.
//
// Used only by tests/emulation; the real build includes CUDA's own <cuda_runtime.h>.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef ASH_EXT_CUDA_EMULATION
#error "the CUDA emulation shim needs ASH_EXT_CUDA_EMULATION defined"
#endif

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define ASH_EMU_TSAN 1
// In the runtime, not in GCC's header: ignore the calling fiber's memory accesses (not its
// synchronisation) between the two.
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define ASH_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
// Static shared memory must be declared with ASH_SHARED; a plain __shared__ does not compile.
#define __shared__ ASH_EMULATION_declare_static_shared_memory_with_ASH_SHARED

// The runtime API calls that kernel_setup.h makes.
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
};

namespace emu {

// Switching fibers. On x86-64 a few instructions save the callee-saved registers and swap stack
// pointers: ucontext's swapcontext makes a system call per switch (the signal mask), and the
// emulator switches several times per element of a sample. Elsewhere, ucontext.
#if defined(__x86_64__)
extern "C" void ash_emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl ash_emu_switch_stack
  .hidden ash_emu_switch_stack
  .type ash_emu_switch_stack, @function
ash_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ash_emu_switch_stack, .-ash_emu_switch_stack
)");

struct Context {
  void* sp = nullptr;
};

// A context that starts `entry` (which must never return) on the stack [stack, stack + bytes).
inline void make_context(Context* context, void* stack, size_t bytes, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top - 16);
  slots[1] = nullptr;                           // the entry's return address: none
  slots[0] = reinterpret_cast<void*>(entry);    // where the first switch's `ret` goes
  void** registers = slots - 6;                 // r15, r14, r13, r12, rbx, rbp: zero
  for (int i = 0; i < 6; ++i) {
    registers[i] = nullptr;
  }
  context->sp = registers;
}

inline void switch_context(Context* from, Context* to) {
  ash_emu_switch_stack(&from->sp, to->sp);
}
#else
struct Context {
  ucontext_t uc{};
};

inline void make_context(Context* context, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&context->uc);
  context->uc.uc_stack.ss_sp = stack;
  context->uc.uc_stack.ss_size = bytes;
  context->uc.uc_link = nullptr;
  makecontext(&context->uc, entry, 0);
}

inline void switch_context(Context* from, Context* to) {
  swapcontext(&from->uc, &to->uc);
}
#endif

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline Dim3 thread_idx, block_idx, block_dim, grid_dim;

constexpr unsigned kWarp = 32;
constexpr size_t kFiberStackBytes = 256 * 1024;
constexpr size_t kResidentFibers = 4096;       // e.g. 8 blocks of 512 threads at once
constexpr size_t kStaticSharedLimit = 48 * 1024;  // per block, as on every GPU
constexpr size_t kDefaultDynamicLimit = 48 * 1024;
constexpr unsigned kPortableClusterLimit = 8;
constexpr unsigned kClusterLimit = 16;
constexpr unsigned char kPoison = 0xCD;

// A violated launch rule: raised on the host, before the launch or when it has finished.
struct LaunchRuleError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#ifdef ASH_EMU_TSAN
// The shim's own bookkeeping is not the kernels' business: ThreadSanitizer ignores its accesses.
struct Internal {
  Internal() { __tsan_ignore_thread_begin(); }
  ~Internal() { __tsan_ignore_thread_end(); }
};
inline void tsan_release(void* address) { __tsan_release(address); }
inline void tsan_acquire(void* address) { __tsan_acquire(address); }
#else
struct Internal {};
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif

class Runtime {
 public:
  static Runtime& get() {
    static Runtime runtime;
    return runtime;
  }

  void seed(uint64_t seed) { rng_.seed(seed); }
  // Makes `device`, with that opt-in shared-memory limit per block, the current device: kernel
  // attributes are per device, as on a GPU.
  void select_device(int device, size_t shared_optin, bool clusters) {
    device_ = device;
    shared_optin_ = shared_optin;
    clusters_ = clusters;
  }

  // Bytes of global memory the kernels read and wrote since the last call.
  std::pair<uint64_t, uint64_t> take_traffic() {
    const std::pair<uint64_t, uint64_t> traffic{bytes_read_, bytes_written_};
    bytes_read_ = 0;
    bytes_written_ = 0;
    return traffic;
  }

  // -- the runtime API ------------------------------------------------------------------------

  cudaError_t func_get_attributes(cudaFuncAttributes* attributes, const void* kernel) {
    const KernelRecord& record = records_[std::make_pair(device_, kernel)];
    attributes->sharedSizeBytes = record.static_bytes;
    attributes->maxThreadsPerBlock = 1024;
    return cudaSuccess;
  }

  cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attribute, int value) {
    KernelRecord& record = records_[std::make_pair(device_, kernel)];
    if (attribute == cudaFuncAttributeNonPortableClusterSizeAllowed && (value == 0 || value == 1)) {
      record.large_clusters = value == 1;
      return cudaSuccess;
    }
    if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0) {
      return cudaErrorInvalidValue;
    }
    const size_t limit = static_cast<size_t>(value);
    if (record.ran && record.static_bytes + limit > shared_optin_) {
      return cudaErrorInvalidValue;
    }
    if (record.limit_set && limit < record.limit) {
      throw LaunchRuleError("CUDA emulation: cudaFuncSetAttribute lowers the dynamic shared-memory limit of " +
                            kernel_name(kernel) + " from " + std::to_string(record.limit) + " to " +
                            std::to_string(limit) + " bytes: another host thread may be about to launch it with "
                            "the higher limit in force");
    }
    record.limit = limit;
    record.limit_set = true;
    return cudaSuccess;
  }

  // -- launches -------------------------------------------------------------------------------

  // Runs `body` as the kernel `kernel` on grid x block threads, in clusters of cluster_blocks
  // blocks, with `shared_bytes` of dynamic shared memory, after checking the launch rules (and
  // again when the grid has run).
  void run_grid(const void* kernel, unsigned grid, unsigned block, size_t shared_bytes,
                const std::function<void()>& body, unsigned cluster_blocks = 1) {
    KernelRecord& record = records_[std::make_pair(device_, kernel)];
    if (cluster_blocks > 1 && !clusters_) {
      throw LaunchRuleError("CUDA emulation: a launch of " + kernel_name(kernel) + " in clusters of " +
                            std::to_string(cluster_blocks) + " blocks on a device without thread-block clusters");
    }
    const unsigned cluster_limit = record.large_clusters ? kClusterLimit : kPortableClusterLimit;
    if (cluster_blocks == 0 || cluster_blocks > cluster_limit) {
      throw LaunchRuleError("CUDA emulation: a launch of " + kernel_name(kernel) + " in clusters of " +
                            std::to_string(cluster_blocks) + " blocks (1.." + std::to_string(cluster_limit) +
                            (record.large_clusters ? std::string(")")
                                                   : std::string("; more than 8 needs "
                                                                 "cudaFuncAttributeNonPortableClusterSizeAllowed)")));
    }
    if (grid % cluster_blocks != 0) {
      throw LaunchRuleError("CUDA emulation: a launch of " + kernel_name(kernel) + " with " + std::to_string(grid) +
                            " blocks, not a whole number of clusters of " + std::to_string(cluster_blocks));
    }
    if (block == 0 || block % kWarp != 0 || block > 1024) {
      throw LaunchRuleError("CUDA emulation: a launch of " + kernel_name(kernel) + " with " + std::to_string(block) +
                            " threads per block (1..1024, a multiple of 32)");
    }
    if (grid == 0 || grid > static_cast<unsigned>(INT_MAX)) {
      throw LaunchRuleError("CUDA emulation: a launch of " + kernel_name(kernel) + " with " + std::to_string(grid) +
                            " blocks");
    }
    if (record.ran) {
      check_shared(kernel, record, shared_bytes);
    }
    size_t static_bytes = 0;
    {
      const Internal internal;
      static_bytes = run_blocks(grid, block, shared_bytes, cluster_blocks, body);
    }
    record.static_bytes = std::max(record.static_bytes, static_bytes);
    record.ran = true;
    check_shared(kernel, record, shared_bytes);
  }

  // -- called from the kernels (on a fiber) ---------------------------------------------------

  unsigned char* dynamic_shared() { return current_->block->dynamic_shared; }

  void* static_shared(const void* site, size_t size, size_t alignment) {
    const Internal internal;
    site_facts_[site] = std::make_pair(size, alignment);
    return static_shared_of(*current_->block, site, size, alignment);
  }

  void sync_block() {
    Block& block = *current_->block;
    uint64_t generation;
    {
      const Internal internal;
      generation = block.generation;
      tsan_release(&block.barrier_sync[generation & 1]);
      if (++block.arrived == block.size) {
        block.arrived = 0;
        ++block.generation;
        yield();  // the last to arrive does not run on at once either
      } else {
        wait_until_changed(&block.generation, generation);
      }
    }
    tsan_acquire(&block.barrier_sync[generation & 1]);
  }

  // A barrier over every thread of every block of the caller's cluster (cluster.sync()).
  void sync_cluster() {
    Cluster& cluster = *current_->block->cluster;
    uint64_t generation;
    {
      const Internal internal;
      generation = cluster.generation;
      tsan_release(&cluster.barrier_sync[generation & 1]);
      if (++cluster.arrived == cluster.threads) {
        cluster.arrived = 0;
        ++cluster.generation;
        yield();
      } else {
        wait_until_changed(&cluster.generation, generation);
      }
    }
    tsan_acquire(&cluster.barrier_sync[generation & 1]);
  }

  unsigned cluster_rank() { return current_->block->rank; }
  unsigned cluster_size() { return current_->block->cluster->size; }

  // The address in block `rank` of the caller's cluster of what `local` (bytes long) is in the
  // caller's shared memory, for a read (cluster.map_shared_rank).
  const void* map_cluster_shared(const void* local, size_t bytes, unsigned rank) {
    const Internal internal;
    Block& self = *current_->block;
    Cluster& cluster = *self.cluster;
    if (rank >= cluster.size) {
      fail("a read of the shared memory of a cluster rank outside the cluster");
    }
    Block& other = *cluster.blocks[rank];
    if (other.exited) {
      fail("a read of the shared memory of a block of the cluster that has exited");
    }
    const auto* address = static_cast<const unsigned char*>(local);
    const unsigned char* mapped = nullptr;
    if (address >= self.dynamic_shared && address + bytes <= self.dynamic_shared + self.dynamic_size) {
      mapped = other.dynamic_shared + (address - self.dynamic_shared);
    } else if (address >= self.static_shared && address + bytes <= self.static_shared + self.static_used) {
      // Static variables by declaration site: blocks may have declared them in different orders.
      const size_t offset = static_cast<size_t>(address - self.static_shared);
      for (const auto& [site, start] : self.static_sites) {
        const size_t size = site_size(site);
        if (offset >= start && offset + bytes <= start + size) {
          mapped = static_cast<const unsigned char*>(static_shared_of(other, site, size, site_alignment(site))) +
                   (offset - start);
          break;
        }
      }
    }
    if (mapped == nullptr) {
      fail("a cluster read of an address outside the caller's shared memory");
    }
    if (&other != &self) {
      other.read_by_cluster = true;
      other.read_generation = cluster.generation;
    }
    return mapped;
  }

  // A kernel's access to global memory (shared-memory addresses are not counted).
  void count_access(const void* address, size_t bytes, bool write) {
    const Internal internal;
    const auto* p = static_cast<const unsigned char*>(address);
    const Block& block = *current_->block;
    if ((p >= block.dynamic_shared && p < block.dynamic_shared + block.dynamic_size) ||
        (p >= block.static_shared && p < block.static_shared + kStaticSharedLimit)) {
      return;
    }
    (write ? bytes_written_ : bytes_read_) += bytes;
  }

  void sync_warp() {
    Block& block = *current_->block;
    const unsigned warp = thread_idx.x / kWarp;
    uint64_t generation;
    {
      const Internal internal;
      generation = block.warp_generation[warp];
      tsan_release(&block.warp_sync[2 * warp + (generation & 1)]);
      if (++block.warp_arrived[warp] == kWarp) {
        block.warp_arrived[warp] = 0;
        ++block.warp_generation[warp];
      } else {
        wait_until_changed(&block.warp_generation[warp], generation);
      }
    }
    tsan_acquire(&block.warp_sync[2 * warp + (generation & 1)]);
  }

  // The value `lane_delta` lanes away (down: higher lanes), or the caller's own value where that
  // lane is outside the warp, like __shfl_down_sync / __shfl_up_sync with a full mask.
  template <typename T>
  T shuffle(T value, int lane_delta, bool down) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
    const unsigned lane = thread_idx.x % kWarp;
    const unsigned warp_base = thread_idx.x - lane;
    std::vector<uint64_t>& lanes = current_->block->lane_values;
    {
      const Internal internal;
      uint64_t bits = 0;
      std::memcpy(&bits, &value, sizeof(T));
      lanes[thread_idx.x] = bits;
    }
    sync_warp();
    const int source = down ? static_cast<int>(lane) + lane_delta : static_cast<int>(lane) - lane_delta;
    T result = value;
    if (source >= 0 && source < static_cast<int>(kWarp)) {
      const Internal internal;
      std::memcpy(&result, &lanes[warp_base + static_cast<unsigned>(source)], sizeof(T));
    }
    sync_warp();
    return result;
  }

  // The lanes whose value equals the caller's, like __match_any_sync with a full mask.
  unsigned match_any(unsigned value) {
    const unsigned lane = thread_idx.x % kWarp;
    const unsigned warp_base = thread_idx.x - lane;
    std::vector<uint64_t>& lanes = current_->block->lane_values;
    {
      const Internal internal;
      lanes[thread_idx.x] = value;
    }
    sync_warp();
    unsigned peers = 0;
    {
      const Internal internal;
      for (unsigned other = 0; other < kWarp; ++other) {
        if (lanes[warp_base + other] == value) {
          peers |= 1u << other;
        }
      }
    }
    sync_warp();
    return peers;
  }

  // Before an atomic: let every other runnable thread run first.
  void before_atomic() {
    const Internal internal;
    yield();
  }

  // A fence: a switch point, and (for ThreadSanitizer) an exchange of happens-before with every
  // other fence, which is more order than a GPU fence gives but none where a fence is missing.
  void fence() {
    {
      const Internal internal;
      yield();
    }
    tsan_release(&fence_sync_);
    tsan_acquire(&fence_sync_);
  }

  [[noreturn]] static void fail(const char* what) {
    std::fprintf(stderr, "CUDA emulation: %s (block %u, thread %u)\n", what, block_idx.x, thread_idx.x);
    std::fflush(stderr);
    std::abort();
  }

 private:
  struct Block;

  struct Cluster {
    unsigned size = 1;              // blocks
    unsigned threads = 0;           // of all its blocks
    std::vector<Block*> blocks;     // by rank
    unsigned arrived = 0;
    uint64_t generation = 0;        // cluster barriers completed
    unsigned exited = 0;
    char barrier_sync[2] = {0, 0};  // (ThreadSanitizer)
  };

  struct Fiber {
    Context context;
    void* stack = nullptr;
    Block* block = nullptr;
    unsigned thread = 0;
    bool finished = false;
    const uint64_t* wait_counter = nullptr;  // blocked until *wait_counter != wait_value
    uint64_t wait_value = 0;
    void* asan_fake_stack = nullptr;
#ifdef ASH_EMU_TSAN
    void* tsan_fiber = nullptr;
#endif
  };

  struct Block {
    unsigned index = 0;
    unsigned size = 0;
    std::shared_ptr<Cluster> cluster;
    unsigned rank = 0;
    bool exited = false;
    bool read_by_cluster = false;  // another block of the cluster has read this block's memory,
    uint64_t read_generation = 0;  // the last time when the cluster had passed this many barriers
    size_t dynamic_size = 0;
    std::vector<Fiber*> fibers;
    unsigned running = 0;
    std::vector<unsigned char> dynamic_storage;
    unsigned char* dynamic_shared = nullptr;  // 16-byte aligned, into dynamic_storage
    alignas(16) unsigned char static_shared[kStaticSharedLimit];
    std::vector<std::pair<const void*, size_t>> static_sites;
    size_t static_used = 0;
    unsigned arrived = 0;
    uint64_t generation = 0;
    std::vector<unsigned> warp_arrived;
    std::vector<uint64_t> warp_generation;
    std::vector<uint64_t> lane_values;
    // Addresses ThreadSanitizer synchronises on (their contents are never used).
    char start_sync = 0, end_sync = 0, barrier_sync[2] = {0, 0};
    std::vector<char> warp_sync;
  };

  struct KernelRecord {
    size_t static_bytes = 0;  // the most static shared memory a block of it used so far
    bool ran = false;
    bool limit_set = false;  // cudaFuncAttributeMaxDynamicSharedMemorySize
    size_t limit = 0;
    bool large_clusters = false;  // cudaFuncAttributeNonPortableClusterSizeAllowed
  };

  size_t site_size(const void* site) const { return site_facts_.at(site).first; }
  size_t site_alignment(const void* site) const { return site_facts_.at(site).second; }

  // The static shared variable declared at `site` in `block`, placed on its first use there.
  void* static_shared_of(Block& block, const void* site, size_t size, size_t alignment) {
    for (const auto& [known, offset] : block.static_sites) {
      if (known == site) {
        return block.static_shared + offset;
      }
    }
    const size_t offset = (block.static_used + alignment - 1) / alignment * alignment;
    if (offset + size > kStaticSharedLimit) {
      fail("static shared memory over 48 KiB");
    }
    block.static_sites.emplace_back(site, offset);
    block.static_used = offset + size;
    return block.static_shared + offset;
  }

  static std::string kernel_name(const void* kernel) {
    Dl_info info{};
    if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr) {
      int status = 0;
      char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
      std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
      std::free(demangled);
      return name;
    }
    char buffer[32];
    std::snprintf(buffer, sizeof(buffer), "kernel %p", kernel);
    return buffer;
  }

  void check_shared(const void* kernel, const KernelRecord& record, size_t dynamic) const {
    const size_t limit = record.limit_set ? record.limit : kDefaultDynamicLimit - record.static_bytes;
    std::string problem;
    if (record.limit_set && record.static_bytes + record.limit > shared_optin_) {
      problem = "its dynamic shared-memory limit was set to " + std::to_string(record.limit) +
                " bytes, more than the opt-in limit of " + std::to_string(shared_optin_) + " minus its " +
                std::to_string(record.static_bytes) + " static bytes (cudaFuncSetAttribute fails)";
    } else if (dynamic > limit) {
      problem = std::to_string(dynamic) + " bytes of dynamic shared memory over the kernel's limit of " +
                std::to_string(limit) +
                (record.limit_set ? std::string(" set by cudaFuncSetAttribute")
                                  : " (48 KiB minus " + std::to_string(record.static_bytes) +
                                        " static bytes; cudaFuncSetAttribute was not called)");
    } else if (record.static_bytes + dynamic > shared_optin_) {
      problem = std::to_string(record.static_bytes) + " static + " + std::to_string(dynamic) +
                " dynamic bytes of shared memory over the opt-in limit of " + std::to_string(shared_optin_);
    }
    if (!problem.empty()) {
      throw LaunchRuleError("CUDA emulation: the launch of " + kernel_name(kernel) +
                            " fails with cudaErrorInvalidValue: " + problem);
    }
  }

  Fiber* new_fiber() {
    if (!free_fibers_.empty()) {
      Fiber* fiber = free_fibers_.back();
      free_fibers_.pop_back();
      return fiber;
    }
    auto fiber = std::make_unique<Fiber>();
    fiber->stack = mmap(nullptr, kFiberStackBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (fiber->stack == MAP_FAILED) {
      fail("no memory for a fiber stack");
    }
#ifdef ASH_EMU_TSAN
    fiber->tsan_fiber = __tsan_create_fiber(0);
#endif
    all_fibers_.push_back(std::move(fiber));
    return all_fibers_.back().get();
  }

  std::unique_ptr<Block> start_block(unsigned index, unsigned size, size_t shared_bytes) {
    auto block = std::make_unique<Block>();
    block->index = index;
    block->size = size;
    block->dynamic_storage.assign(shared_bytes + 16, kPoison);
    block->dynamic_size = shared_bytes;
    const uintptr_t base = reinterpret_cast<uintptr_t>(block->dynamic_storage.data());
    block->dynamic_shared = block->dynamic_storage.data() + (16 - base % 16) % 16;
    std::memset(block->static_shared, kPoison, sizeof(block->static_shared));
    block->warp_arrived.assign(size / kWarp, 0);
    block->warp_generation.assign(size / kWarp, 0);
    block->lane_values.assign(size, 0);
    block->warp_sync.assign(2 * (size / kWarp), 0);
    block->running = size;
    for (unsigned t = 0; t < size; ++t) {
      Fiber* fiber = new_fiber();
      fiber->block = block.get();
      fiber->thread = t;
      fiber->finished = false;
      fiber->wait_counter = nullptr;
      make_context(&fiber->context, fiber->stack, kFiberStackBytes, &Runtime::fiber_main);
      block->fibers.push_back(fiber);
    }
    tsan_release(&block->start_sync);  // the host's writes before the launch, and the poison
    return block;
  }

  // Runs every block of the grid, a cluster's blocks resident together; returns the most static
  // shared memory a block used.
  size_t run_blocks(unsigned grid, unsigned block_size, size_t shared_bytes, unsigned cluster_blocks,
                    const std::function<void()>& body) {
    grid_dim = Dim3{grid, 1, 1};
    block_dim = Dim3{block_size, 1, 1};
    body_ = &body;
#ifdef ASH_EMU_TSAN
    scheduler_tsan_ = __tsan_get_current_fiber();
#endif
    const unsigned clusters = grid / cluster_blocks;
    std::vector<unsigned> order(clusters);
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin(), order.end(), rng_);
    const size_t by_threads = kResidentFibers / block_size / cluster_blocks * cluster_blocks;
    const size_t resident_limit = std::max<size_t>(cluster_blocks, by_threads);
    std::vector<std::unique_ptr<Block>> resident;
    std::vector<Fiber*> round;
    size_t next = 0;
    size_t static_high = 0;
    for (;;) {
      while (resident.size() + cluster_blocks <= resident_limit && next < clusters) {
        auto cluster = std::make_shared<Cluster>();
        cluster->size = cluster_blocks;
        cluster->threads = cluster_blocks * block_size;
        const unsigned first = order[next++] * cluster_blocks;
        for (unsigned rank = 0; rank < cluster_blocks; ++rank) {
          resident.push_back(start_block(first + rank, block_size, shared_bytes));
          resident.back()->cluster = cluster;
          resident.back()->rank = rank;
          cluster->blocks.push_back(resident.back().get());
        }
      }
      if (resident.empty()) {
        break;
      }
      // Each round, a random half of the resident blocks stands still, as blocks of a grid
      // progress at different speeds on a GPU: one block may stall right after its arrival
      // while another finishes.
      round.clear();
      bool all_blocks = true;
      const size_t always = std::uniform_int_distribution<size_t>(0, resident.size() - 1)(rng_);
      for (size_t b = 0; b < resident.size(); ++b) {
        if (b != always && (rng_() & 1) != 0) {
          all_blocks = false;
          continue;
        }
        for (Fiber* fiber : resident[b]->fibers) {
          if (!fiber->finished) {
            round.push_back(fiber);
          }
        }
      }
      std::shuffle(round.begin(), round.end(), rng_);
      bool progressed = false;
      for (Fiber* fiber : round) {
        if (fiber->finished || (fiber->wait_counter != nullptr && *fiber->wait_counter == fiber->wait_value)) {
          continue;
        }
        fiber->wait_counter = nullptr;
        resume(fiber);
        progressed = true;
      }
      if (!progressed && all_blocks) {
        fail("deadlock: threads wait at a barrier that others never reach");
      }
      for (auto& block : resident) {
        if (block->running == 0 && !block->exited) {
          block_exits(*block);
        }
      }
      // A block's memory stays until every block of its cluster has exited (exits are checked,
      // and a later read of an exited block is reported, not a use after free).
      for (auto it = resident.begin(); it != resident.end();) {
        Block& block = **it;
        if (!block.exited || block.cluster->exited != block.cluster->size) {
          ++it;
          continue;
        }
        static_high = std::max(static_high, block.static_used);
        for (Fiber* fiber : block.fibers) {
          free_fibers_.push_back(fiber);
        }
        it = resident.erase(it);
      }
    }
    return static_high;
  }

  void block_exits(Block& block) {
    tsan_acquire(&block.end_sync);
    Cluster& cluster = *block.cluster;
    if (block.read_by_cluster && block.read_generation >= cluster.generation) {
      std::fprintf(stderr,
                   "CUDA emulation: block %u (rank %u of its cluster) exits while another block of its cluster "
                   "may still read its shared memory: no cluster barrier between that read and the exit\n",
                   block.index, block.rank);
      std::fflush(stderr);
      std::abort();
    }
    block.exited = true;
    ++cluster.exited;
  }

  void resume(Fiber* fiber) {
    current_ = fiber;
    thread_idx = Dim3{fiber->thread, 0, 0};
    block_idx = Dim3{fiber->block->index, 0, 0};
#ifdef ASH_EMU_TSAN
    __tsan_switch_to_fiber(fiber->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef ASH_EMU_ASAN
    __sanitizer_start_switch_fiber(&scheduler_fake_stack_, fiber->stack, kFiberStackBytes);
#endif
    switch_context(&scheduler_, &fiber->context);
#ifdef ASH_EMU_ASAN
    __sanitizer_finish_switch_fiber(scheduler_fake_stack_, nullptr, nullptr);
#endif
  }

  // Back to the scheduler; returns when the scheduler resumes this fiber.
  void yield() {
    Fiber* fiber = current_;
#ifdef ASH_EMU_TSAN
    __tsan_switch_to_fiber(scheduler_tsan_, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef ASH_EMU_ASAN
    __sanitizer_start_switch_fiber(&fiber->asan_fake_stack, scheduler_stack_bottom_, scheduler_stack_size_);
#endif
    switch_context(&fiber->context, &scheduler_);
#ifdef ASH_EMU_ASAN
    __sanitizer_finish_switch_fiber(fiber->asan_fake_stack, &scheduler_stack_bottom_, &scheduler_stack_size_);
#endif
  }

  void wait_until_changed(const uint64_t* counter, uint64_t value) {
    while (*counter == value) {
      current_->wait_counter = counter;
      current_->wait_value = value;
      yield();
    }
  }

  static void fiber_main() {
    Runtime& r = get();
#ifdef ASH_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack_bottom_, &r.scheduler_stack_size_);
#endif
    Block* block = r.current_->block;
    tsan_acquire(&block->start_sync);
    (*r.body_)();
    tsan_release(&block->end_sync);
    Fiber* fiber = r.current_;
    {
      const Internal internal;  // (ThreadSanitizer's ignore count is per fiber)
      fiber->finished = true;
      --block->running;
    }
#ifdef ASH_EMU_TSAN
    __tsan_switch_to_fiber(r.scheduler_tsan_, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef ASH_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, r.scheduler_stack_bottom_, r.scheduler_stack_size_);
#endif
    switch_context(&fiber->context, &r.scheduler_);
    fail("a finished fiber was resumed");
  }

  std::mt19937_64 rng_{20240601u};
  size_t shared_optin_ = 227 * 1024;
  bool clusters_ = false;
  uint64_t bytes_read_ = 0;
  uint64_t bytes_written_ = 0;
  std::map<const void*, std::pair<size_t, size_t>> site_facts_;  // static shared: size, alignment
  int device_ = 0;
  std::map<std::pair<int, const void*>, KernelRecord> records_;
  Context scheduler_;
  std::vector<std::unique_ptr<Fiber>> all_fibers_;
  std::vector<Fiber*> free_fibers_;
  Fiber* current_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  char fence_sync_ = 0;
  void* scheduler_fake_stack_ = nullptr;
  const void* scheduler_stack_bottom_ = nullptr;
  size_t scheduler_stack_size_ = 0;
#ifdef ASH_EMU_TSAN
  void* scheduler_tsan_ = nullptr;
#endif
};

// The current block's static shared variable declared at `site` (see ASH_SHARED).
template <typename T>
T& static_shared(const void* site) {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "shared memory holds trivially constructible types only");
  return *static_cast<T*>(Runtime::get().static_shared(site, sizeof(T), alignof(T)));
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel) {
  return emu::Runtime::get().func_get_attributes(attributes, kernel);
}

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  return emu::Runtime::get().func_set_attribute(kernel, attribute, value);
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}

inline void __syncthreads() {
  emu::Runtime::get().sync_block();
}

inline void __threadfence() {
  emu::Runtime::get().fence();
}

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

// Other threads run first; the read-modify-write itself is atomic (and relaxed, as on a GPU).
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  emu::Runtime::get().before_atomic();
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  emu::Runtime::get().before_atomic();
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

inline unsigned atomicExch(unsigned* address, unsigned value) {
  emu::Runtime::get().before_atomic();
  return __atomic_exchange_n(address, value, __ATOMIC_RELAXED);
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
  return emu::Runtime::get().dynamic_shared();
}
