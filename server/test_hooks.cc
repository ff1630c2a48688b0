#include "server/test_hooks.h"

namespace loraplex::server {

TestHooks& GetTestHooks() {
  static TestHooks hooks;
  return hooks;
}

}  // namespace loraplex::server
