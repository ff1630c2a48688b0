// Minimal leveled logging to stderr (this Abseil has no absl/log). Thread-safe per line.
// LP_LOG(INFO) << "text";  LP_CHECK(cond) << "why";  LP_CHECK aborts: programmer errors only.
#pragma once

#include <sstream>
#include <string_view>

namespace loraplex {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kFatal = 4 };

// Messages below this level are dropped. Default kInfo; LP_LOG_LEVEL=debug|info|warning|error.
LogLevel MinLogLevel();
void SetMinLogLevel(LogLevel level);

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();  // writes the line; aborts for kFatal
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

// Swallows a stream expression when the level is disabled.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace loraplex

#define LP_LOG_LEVEL_DEBUG ::loraplex::LogLevel::kDebug
#define LP_LOG_LEVEL_INFO ::loraplex::LogLevel::kInfo
#define LP_LOG_LEVEL_WARNING ::loraplex::LogLevel::kWarning
#define LP_LOG_LEVEL_ERROR ::loraplex::LogLevel::kError
#define LP_LOG_LEVEL_FATAL ::loraplex::LogLevel::kFatal

#define LP_LOG(level)                                \
  (LP_LOG_LEVEL_##level < ::loraplex::MinLogLevel()) \
      ? (void)0                                      \
      : ::loraplex::LogVoidify() &                   \
            ::loraplex::LogMessage(LP_LOG_LEVEL_##level, __FILE__, __LINE__).stream()

#define LP_CHECK(cond)                                                                           \
  (cond) ? (void)0                                                                               \
         : ::loraplex::LogVoidify() &                                                            \
               ::loraplex::LogMessage(::loraplex::LogLevel::kFatal, __FILE__, __LINE__).stream() \
                   << "Check failed: " #cond " "
