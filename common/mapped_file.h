// Read-only memory mapping of a whole file. Movable, not copyable; unmaps on destruction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace loraplex {

class MappedFile {
 public:
  // NOT_FOUND when the file does not exist, PERMISSION_DENIED when it cannot be read,
  // INVALID_ARGUMENT when it is a directory; every message names the path.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Hints for the pages of [p, p + n), a range inside the mapping: WillNeed starts reading them in
  // (asynchronously); DontNeed drops the whole pages inside the range from this process's resident
  // set (they stay in the page cache, and a later read maps them again). Both are advice: errors
  // are ignored.
  void WillNeed(const uint8_t* p, size_t n) const;
  void DontNeed(const uint8_t* p, size_t n) const;

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// Reads a whole (small) file into a string; same error codes as MappedFile::Open.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace loraplex
