// Runtime choice of the per-ISA loop table (see cpu_ops.h).
#include "kernels/cpu/cpu_ops.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels/kernels.h"

namespace loraplex::kernels::cpu {
namespace {

const CpuOps* Choose() {
  const char* want = std::getenv("LP_CPU_ISA");
  if (want != nullptr && std::strcmp(want, "scalar") == 0) return &ScalarOps();
  if (Avx2Supported() && Avx2Ops() != nullptr) return Avx2Ops();
  return &ScalarOps();
}

std::atomic<const CpuOps*>& Active() {
  static std::atomic<const CpuOps*> active{Choose()};
  return active;
}

}  // namespace

bool Avx2Supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const CpuOps& ActiveCpuOps() { return *Active().load(std::memory_order_relaxed); }

bool SetActiveCpuOpsForTesting(const char* name) {
  if (std::strcmp(name, "scalar") == 0) {
    Active().store(&ScalarOps());
    return true;
  }
  if (std::strcmp(name, "avx2") == 0 && Avx2Supported() && Avx2Ops() != nullptr) {
    Active().store(Avx2Ops());
    return true;
  }
  return false;
}

}  // namespace loraplex::kernels::cpu

namespace loraplex::kernels {

const char* CpuKernelIsa() { return cpu::ActiveCpuOps().name; }

}  // namespace loraplex::kernels
