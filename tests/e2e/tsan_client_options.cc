// ThreadSanitizer defaults of the e2e test binaries (linked into them in TSan builds only).
//
// These binaries are gRPC clients whose calls run gRPC's inline client code on the test's threads
// against Debian's uninstrumented gRPC core, so TSan would report gRPC's own handoffs in them (the
// server side states them in server/reactors.h; the sync client API has no reactions to
// hang that on). What the TSan stage checks is the loraplex-server child, which does not inherit
// these defaults (only TSAN_OPTIONS): it runs with every report on and halts at the first one, and
// tests/testing/server_process.cc fails the test with the report. TSAN_OPTIONS may turn reports
// of the test process back on (report_bugs=1).
extern "C" const char* __tsan_default_options() { return "report_bugs=0"; }
