// An LD_PRELOAD interposer for crash_e2e_test: makes file writes, fsyncs, renames and creations
// fail (ENOSPC, EIO, ...) under one path prefix, the way a full or failing disk does, without
// privileges. Nothing else changes: calls on other paths, sockets and pipes go straight through.
//
// Control: LP_FAULT_CONTROL names a file of key=value lines, re-read whenever it is replaced (the
// test writes a new file and renames it over the old one; the counters restart then). A missing
// or empty file means no faults.
//   prefix=/abs/path      calls on files under this path are candidates (required)
//   write_after=N         write/pwrite/writev/copy_file_range: N more bytes succeed in all (a call
//                         that crosses the budget writes what is left: a short write), then they
//                         fail with write_errno (default ENOSPC)
//   create_after=N        open(O_CREAT) of a new file and mkdir: N succeed, then create_errno
//                         (default ENOSPC)
//   fsync_after=N         fsync/fdatasync: N succeed, then fsync_errno (default EIO)
//   fsync_path=/abs/path  fsync faults only for exactly this path (default: the whole prefix)
//   rename_after=N        rename whose target is under the prefix: N succeed, then rename_errno
//                         (default EIO)
//   rename_path=/abs/path rename faults only for exactly this target (default: the whole prefix)
// Every injected failure appends "<call> <path>\n" to <LP_FAULT_CONTROL>.hits, so a test can
// tell that its fault was reached.
//
// Built without sanitizers (crash_e2e.cmake); an ASan server needs ASAN_OPTIONS
// verify_asan_link_order=0 to accept a library preloaded before its runtime.
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

struct Config {
  bool active = false;
  char prefix[PATH_MAX] = {0};
  char fsync_path[PATH_MAX] = {0};
  char rename_path[PATH_MAX] = {0};
  int64_t write_after = -1, create_after = -1, fsync_after = -1, rename_after = -1;
  int write_errno = ENOSPC, create_errno = ENOSPC, fsync_errno = EIO, rename_errno = EIO;
};

pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
Config g_config;          // guarded by g_mu
struct stat g_seen = {};  // the control file's identity when last read
int64_t g_written = 0, g_created = 0, g_fsynced = 0, g_renamed = 0;  // since that read

template <typename F>
F Real(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}

using WriteFn = ssize_t (*)(int, const void*, size_t);
using PwriteFn = ssize_t (*)(int, const void*, size_t, off_t);
using WritevFn = ssize_t (*)(int, const struct iovec*, int);
using CopyFn = ssize_t (*)(int, off_t*, int, off_t*, size_t, unsigned int);
using FsyncFn = int (*)(int);
using RenameFn = int (*)(const char*, const char*);
using OpenFn = int (*)(const char*, int, ...);
using MkdirFn = int (*)(const char*, mode_t);

int ErrnoByName(const char* v, int fallback) {
  struct {
    const char* name;
    int value;
  } const kNames[] = {{"ENOSPC", ENOSPC}, {"EIO", EIO},     {"EDQUOT", EDQUOT},
                      {"EROFS", EROFS},   {"EFBIG", EFBIG}, {"EACCES", EACCES}};
  for (const auto& n : kNames) {
    if (std::strcmp(v, n.name) == 0) return n.value;
  }
  const int n = std::atoi(v);
  return n > 0 ? n : fallback;
}

// Re-reads the control file when it was replaced. Called with g_mu held.
void RefreshLocked() {
  const char* control = std::getenv("LP_FAULT_CONTROL");
  if (control == nullptr) return;
  struct stat st = {};
  if (stat(control, &st) != 0) {
    if (g_config.active || g_seen.st_ino != 0) {
      g_config = Config();
      g_seen = {};
    }
    return;
  }
  if (st.st_ino == g_seen.st_ino && st.st_dev == g_seen.st_dev &&
      st.st_mtim.tv_nsec == g_seen.st_mtim.tv_nsec && st.st_mtim.tv_sec == g_seen.st_mtim.tv_sec &&
      st.st_size == g_seen.st_size) {
    return;
  }
  g_seen = st;
  g_config = Config();
  g_written = g_created = g_fsynced = g_renamed = 0;
  const int fd = open(control, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char text[8192];
  ssize_t n = read(fd, text, sizeof(text) - 1);
  close(fd);
  if (n <= 0) return;
  text[n] = 0;
  for (char* line = std::strtok(text, "\n"); line != nullptr; line = std::strtok(nullptr, "\n")) {
    char* eq = std::strchr(line, '=');
    if (eq == nullptr) continue;
    *eq = 0;
    const char* key = line;
    const char* value = eq + 1;
    auto copy = [&](char* to) {
      std::strncpy(to, value, PATH_MAX - 1);
      to[PATH_MAX - 1] = 0;
    };
    if (std::strcmp(key, "prefix") == 0)
      copy(g_config.prefix);
    else if (std::strcmp(key, "fsync_path") == 0)
      copy(g_config.fsync_path);
    else if (std::strcmp(key, "rename_path") == 0)
      copy(g_config.rename_path);
    else if (std::strcmp(key, "write_after") == 0)
      g_config.write_after = std::atoll(value);
    else if (std::strcmp(key, "create_after") == 0)
      g_config.create_after = std::atoll(value);
    else if (std::strcmp(key, "fsync_after") == 0)
      g_config.fsync_after = std::atoll(value);
    else if (std::strcmp(key, "rename_after") == 0)
      g_config.rename_after = std::atoll(value);
    else if (std::strcmp(key, "write_errno") == 0)
      g_config.write_errno = ErrnoByName(value, ENOSPC);
    else if (std::strcmp(key, "create_errno") == 0)
      g_config.create_errno = ErrnoByName(value, ENOSPC);
    else if (std::strcmp(key, "fsync_errno") == 0)
      g_config.fsync_errno = ErrnoByName(value, EIO);
    else if (std::strcmp(key, "rename_errno") == 0)
      g_config.rename_errno = ErrnoByName(value, EIO);
  }
  g_config.active = g_config.prefix[0] != 0;
}

bool Under(const char* path, const char* prefix) {
  const size_t n = std::strlen(prefix);
  return n > 0 && std::strncmp(path, prefix, n) == 0 && (path[n] == 0 || path[n] == '/');
}

// The absolute path of `path` (relative ones against the working directory; not normalised).
void Absolute(const char* path, char* out) {
  if (path[0] == '/') {
    std::snprintf(out, PATH_MAX, "%s", path);
    return;
  }
  char cwd[PATH_MAX];
  if (getcwd(cwd, sizeof(cwd)) == nullptr) cwd[0] = 0;
  std::snprintf(out, PATH_MAX, "%s/%s", cwd, path);
}

bool FdPath(int fd, char* out) {
  char link[64];
  std::snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, out, PATH_MAX - 1);
  if (n <= 0) return false;
  out[n] = 0;
  return out[0] == '/';  // sockets, pipes and anonymous files are never candidates
}

void RecordHit(const char* call, const char* path) {
  const char* control = std::getenv("LP_FAULT_CONTROL");
  if (control == nullptr) return;
  char hits[PATH_MAX + 8];
  std::snprintf(hits, sizeof(hits), "%s.hits", control);
  const int fd = open(hits, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return;
  char line[PATH_MAX + 64];
  const int n = std::snprintf(line, sizeof(line), "%s %s\n", call, path);
  static WriteFn real_write = Real<WriteFn>("write");
  if (n > 0) real_write(fd, line, static_cast<size_t>(n));
  close(fd);
}

// How many of `size` bytes a write to `fd` may write: size when no fault applies, fewer (maybe 0)
// when the budget runs out; -1 with errno set when the budget is spent. `counted` says whether the
// allowance came out of the budget: then Settle gives back what the call did not write.
ssize_t WriteAllowance(int fd, size_t size, const char* call, bool* counted) {
  *counted = false;
  if (std::getenv("LP_FAULT_CONTROL") == nullptr) return static_cast<ssize_t>(size);
  char path[PATH_MAX];
  pthread_mutex_lock(&g_mu);
  RefreshLocked();
  if (!g_config.active || g_config.write_after < 0 || !FdPath(fd, path) ||
      !Under(path, g_config.prefix)) {
    pthread_mutex_unlock(&g_mu);
    return static_cast<ssize_t>(size);
  }
  const int64_t left = g_config.write_after - g_written;
  if (left <= 0) {
    const int err = g_config.write_errno;
    pthread_mutex_unlock(&g_mu);
    RecordHit(call, path);
    errno = err;
    return -1;
  }
  const size_t allowed = static_cast<size_t>(left) < size ? static_cast<size_t>(left) : size;
  g_written += static_cast<int64_t>(allowed);
  *counted = true;
  pthread_mutex_unlock(&g_mu);
  return static_cast<ssize_t>(allowed);
}

// After the real call: returns `written` (its result) and gives back the unused allowance.
ssize_t Settle(bool counted, ssize_t allowed, ssize_t written) {
  if (counted && written < allowed) {
    pthread_mutex_lock(&g_mu);
    g_written -= allowed - (written > 0 ? written : 0);
    pthread_mutex_unlock(&g_mu);
  }
  return written;
}

enum class Kind { kCreate, kFsync, kRename };

// Whether a call of `kind` on `path` fails now (errno set when it does).
bool Fails(const char* path, Kind kind, const char* call) {
  if (std::getenv("LP_FAULT_CONTROL") == nullptr) return false;
  pthread_mutex_lock(&g_mu);
  RefreshLocked();
  int64_t after = -1;
  int64_t* counter = nullptr;
  const char* exact = "";
  int err = 0;
  switch (kind) {
    case Kind::kCreate:
      after = g_config.create_after, counter = &g_created, err = g_config.create_errno;
      break;
    case Kind::kFsync:
      after = g_config.fsync_after, counter = &g_fsynced, err = g_config.fsync_errno;
      exact = g_config.fsync_path;
      break;
    case Kind::kRename:
      after = g_config.rename_after, counter = &g_renamed, err = g_config.rename_errno;
      exact = g_config.rename_path;
      break;
  }
  const bool candidate =
      g_config.active && after >= 0 &&
      (exact[0] != 0 ? std::strcmp(path, exact) == 0 : Under(path, g_config.prefix));
  bool fail = false;
  if (candidate) {
    fail = *counter >= after;
    if (!fail) ++*counter;
  }
  pthread_mutex_unlock(&g_mu);
  if (fail) {
    RecordHit(call, path);
    errno = err;
  }
  return fail;
}

}  // namespace

extern "C" {

ssize_t write(int fd, const void* buf, size_t size) {
  static WriteFn real = Real<WriteFn>("write");
  bool counted;
  const ssize_t allowed = WriteAllowance(fd, size, "write", &counted);
  if (allowed < 0) return -1;
  return Settle(counted, allowed, real(fd, buf, static_cast<size_t>(allowed)));
}

ssize_t pwrite(int fd, const void* buf, size_t size, off_t offset) {
  static PwriteFn real = Real<PwriteFn>("pwrite");
  bool counted;
  const ssize_t allowed = WriteAllowance(fd, size, "pwrite", &counted);
  if (allowed < 0) return -1;
  return Settle(counted, allowed, real(fd, buf, static_cast<size_t>(allowed), offset));
}

ssize_t pwrite64(int fd, const void* buf, size_t size, off_t offset) {
  static PwriteFn real = Real<PwriteFn>("pwrite64");
  bool counted;
  const ssize_t allowed = WriteAllowance(fd, size, "pwrite64", &counted);
  if (allowed < 0) return -1;
  return Settle(counted, allowed, real(fd, buf, static_cast<size_t>(allowed), offset));
}

ssize_t writev(int fd, const struct iovec* iov, int count) {
  static WritevFn real = Real<WritevFn>("writev");
  size_t total = 0;
  for (int i = 0; i < count; ++i) total += iov[i].iov_len;
  bool counted;
  const ssize_t allowed = WriteAllowance(fd, total, "writev", &counted);
  if (allowed < 0) return -1;
  if (static_cast<size_t>(allowed) == total) return Settle(counted, allowed, real(fd, iov, count));
  // A short write: only the first `allowed` bytes.
  struct iovec cut[64];
  int n = 0;
  size_t left = static_cast<size_t>(allowed);
  for (int i = 0; i < count && n < 64 && left > 0; ++i) {
    cut[n] = iov[i];
    if (cut[n].iov_len > left) cut[n].iov_len = left;
    left -= cut[n].iov_len;
    ++n;
  }
  return n == 0 ? 0 : Settle(counted, allowed, real(fd, cut, n));
}

ssize_t copy_file_range(int in, off_t* in_off, int out, off_t* out_off, size_t size,
                        unsigned int flags) {
  static CopyFn real = Real<CopyFn>("copy_file_range");
  // At the end of the input the kernel answers 0 before it needs any space.
  struct stat st = {};
  const off_t at = in_off != nullptr ? *in_off : lseek(in, 0, SEEK_CUR);
  if (fstat(in, &st) == 0 && S_ISREG(st.st_mode) && at >= st.st_size) return 0;
  bool counted;
  const ssize_t allowed = WriteAllowance(out, size, "copy_file_range", &counted);
  if (allowed < 0) return -1;
  return Settle(counted, allowed,
                real(in, in_off, out, out_off, static_cast<size_t>(allowed), flags));
}

int fsync(int fd) {
  static FsyncFn real = Real<FsyncFn>("fsync");
  char path[PATH_MAX];
  if (FdPath(fd, path) && Fails(path, Kind::kFsync, "fsync")) {
    return -1;
  }
  return real(fd);
}

int fdatasync(int fd) {
  static FsyncFn real = Real<FsyncFn>("fdatasync");
  char path[PATH_MAX];
  if (FdPath(fd, path) && Fails(path, Kind::kFsync, "fdatasync")) {
    return -1;
  }
  return real(fd);
}

int rename(const char* from, const char* to) {
  static RenameFn real = Real<RenameFn>("rename");
  char path[PATH_MAX];
  Absolute(to, path);
  if (Fails(path, Kind::kRename, "rename")) {
    return -1;
  }
  return real(from, to);
}

int mkdir(const char* path, mode_t mode) {
  static MkdirFn real = Real<MkdirFn>("mkdir");
  char abs[PATH_MAX];
  Absolute(path, abs);
  struct stat st;
  if (stat(abs, &st) != 0 && Fails(abs, Kind::kCreate, "mkdir")) {
    return -1;
  }
  return real(path, mode);
}

static int OpenCommon(const char* name, const char* path, int flags, mode_t mode) {
  if ((flags & O_CREAT) != 0) {
    char abs[PATH_MAX];
    Absolute(path, abs);
    struct stat st;
    if (stat(abs, &st) != 0 && Fails(abs, Kind::kCreate, name)) {
      return -1;
    }
  }
  static OpenFn real_open = Real<OpenFn>("open");
  static OpenFn real_open64 = Real<OpenFn>("open64");
  return std::strcmp(name, "open64") == 0 ? real_open64(path, flags, mode)
                                          : real_open(path, flags, mode);
}

int open(const char* path, int flags, ...) {
  mode_t mode = 0;
  if ((flags & (O_CREAT | O_TMPFILE)) != 0) {
    va_list ap;
    va_start(ap, flags);
    mode = static_cast<mode_t>(va_arg(ap, int));
    va_end(ap);
  }
  return OpenCommon("open", path, flags, mode);
}

int open64(const char* path, int flags, ...) {
  mode_t mode = 0;
  if ((flags & (O_CREAT | O_TMPFILE)) != 0) {
    va_list ap;
    va_start(ap, flags);
    mode = static_cast<mode_t>(va_arg(ap, int));
    va_end(ap);
  }
  return OpenCommon("open64", path, flags, mode);
}

}  // extern "C"
