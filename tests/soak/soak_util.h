// Small helpers every part of loraplex-soak uses: gRPC code names, files and hashes, clocks and
// deadlines, the seeded choices of a thread (Uniform, Chance, Pick on its own Rng) and channels
// with a connection of their own. Stateless: safe from any thread (an Rng is one thread's).
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace loraplex::soak {

using Clock = std::chrono::steady_clock;
using grpc::StatusCode;
using Rng = std::mt19937_64;

// "OK", "CANCELLED", ... ("?" past UNAUTHENTICATED).
const char* CodeName(StatusCode c);

// The whole file ("" if unreadable).
std::string ReadAll(const std::string& path);

// SHA-256 of `data`, lowercase hex.
std::string Sha256Hex(const std::string& data);

double SecondsSince(Clock::time_point t);

// A deadline `ms` from now.
std::chrono::system_clock::time_point In(std::chrono::milliseconds ms);

int Uniform(Rng& rng, int lo, int hi);  // [lo, hi]
bool Chance(Rng& rng, double p);
template <typename T>
const T& Pick(Rng& rng, const std::vector<T>& v) {
  return v[Uniform(rng, 0, static_cast<int>(v.size()) - 1)];
}
void SleepMs(int ms);

// A channel with a connection of its own (gRPC shares subchannels between equal channels
// otherwise): slow readers then hold back only their own connection's flow-control window.
std::shared_ptr<grpc::Channel> NewChannel(const std::string& address);

}  // namespace loraplex::soak
