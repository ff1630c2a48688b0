// A stand-in for loraplex-server with one deliberate bug, built like the rest of the tree (so with
// the sanitizer of a sanitizer build): tests/testing/server_process_test.cc starts it through
// ServerProcess and checks that the report in its log fails the test. Not a test by itself.
//
//   lp_sanitizer_canary [--listen=... --metrics-listen=... --port-file=...] --bug=BUG
//   BUG: heap-use-after-free (ASan), signed-overflow (UBSan), data-race (TSan), leak (LSan, at a
//   normal exit)
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

namespace {

volatile int sink = 0;
int* volatile leaked = nullptr;  // --bug=leak: the only pointer to the block, then cleared
int shared_counter = 0;          // written by two threads without a lock (--bug=data-race)

void Race() {
  for (int i = 0; i < 1000; ++i) shared_counter = shared_counter + 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string bug;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--bug=", 6) == 0) bug = argv[i] + 6;
  }
  if (bug == "heap-use-after-free") {
    int* volatile p = new int[4];
    delete[] p;
    sink = p[1];
  } else if (bug == "signed-overflow") {
    volatile int big = 0x7fffffff;
    sink = big + 1;
  } else if (bug == "data-race") {
    std::thread a(Race), b(Race);
    a.join();
    b.join();
    sink = shared_counter;
  } else if (bug == "leak") {
    leaked = new int[1000];
    leaked[0] = 1;
    leaked = nullptr;
    return 0;  // LeakSanitizer reports at exit
  } else {
    std::fprintf(stderr, "lp_sanitizer_canary: unknown --bug=%s\n", bug.c_str());
    return 2;
  }
  std::fprintf(stderr, "lp_sanitizer_canary: %s went unreported\n", bug.c_str());
  return 1;
}
