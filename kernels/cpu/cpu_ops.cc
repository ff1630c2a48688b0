// Runtime choice of the per-ISA loop table (see cpu_ops.h).
#include "kernels/cpu/cpu_ops.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "kernels/cpu/quant_ops.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
// F16C from CPUID leaf 1 (ECX bit 29): clang before 16 rejects "f16c" in __builtin_cpu_supports.
// Its registers are the AVX (ymm) state, which the avx2/avx512f checks find the OS saving.
bool F16cSupported() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}
#endif

// One choice of ISA: a CpuOps table, and whether quantized GEMMs may use the AMX tiles.
struct Choice {
  const CpuOps* ops = nullptr;
  bool amx = false;
};

// The choice called `name` when this CPU and build can run it, else {nullptr}.
Choice Supported(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return {&ScalarOps()};
  if (std::strcmp(name, "avx2") == 0) return {Avx2Supported() ? Avx2Ops() : nullptr};
  if (std::strcmp(name, "avx512") == 0) return {Avx512Supported() ? Avx512Ops() : nullptr};
  if (std::strcmp(name, "amx") == 0 && Avx512Supported() && Avx512Ops() != nullptr &&
      AmxSupported()) {
    return {Avx512Ops(), true};
  }
  return {};
}

// Best first.
constexpr const char* kPreference[] = {"amx", "avx512", "avx2", "scalar"};

Choice Choose() {
  const char* want = std::getenv("LP_CPU_ISA");
  if (want != nullptr) {
    if (const Choice c = Supported(want); c.ops != nullptr) return c;
  }
  for (const char* name : kPreference) {
    if (const Choice c = Supported(name); c.ops != nullptr) return c;
  }
  return {&ScalarOps()};
}

// The active choice, made once (and changed only by SetActiveCpuOpsForTesting); the kernels read
// it relaxed.
struct Active {
  Active() {
    const Choice c = Choose();
    ops.store(c.ops);
    amx.store(c.amx);
  }
  std::atomic<const CpuOps*> ops;
  std::atomic<bool> amx;
};
Active& ActiveChoice() {
  static Active active;
  return active;
}

}  // namespace

// __builtin_cpu_supports reports a vector extension only when the OS also saves its registers
// (GCC and Clang check XCR0 for the ymm and zmm state), so these need no separate xgetbv.
bool Avx2Supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && F16cSupported();
#else
  return false;
#endif
}

// Every feature cpu_ops_avx512.cc is compiled for.
bool Avx512Supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && F16cSupported();
#else
  return false;
#endif
}

const CpuOps& ActiveCpuOps() { return *ActiveChoice().ops.load(std::memory_order_relaxed); }

bool AmxEnabled() { return ActiveChoice().amx.load(std::memory_order_relaxed); }

bool SetActiveCpuOpsForTesting(const char* name) {
  const Choice c = Supported(name);
  if (c.ops == nullptr) return false;
  ActiveChoice().ops.store(c.ops);
  ActiveChoice().amx.store(c.amx);
  return true;
}

}  // namespace loraplex::kernels::cpu

namespace loraplex::kernels {

const char* CpuKernelIsa() { return cpu::AmxEnabled() ? "amx" : cpu::ActiveCpuOps().name; }

}  // namespace loraplex::kernels
