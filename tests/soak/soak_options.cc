#include "tests/soak/soak_options.h"

#include <string>

namespace loraplex::soak {

bool ParseArgs(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], v;
    if (a.rfind("--", 0) != 0) return false;
    if (size_t eq = a.find('='); eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (a != "--disconnect-child") {
      if (i + 1 >= argc) return false;
      v = argv[++i];
    }
    if (a == "--server")
      o->server = v;
    else if (a == "--server-pid")
      o->server_pid = std::stoi(v);
    else if (a == "--duration")
      o->duration_s = std::stod(v);
    else if (a == "--seed")
      o->seed = std::stoull(v), o->seed_given = true;
    else if (a == "--generate-bin")
      o->generate_bin = v;
    else if (a == "--model")
      o->model = v;
    else if (a == "--adapter-root")
      o->adapter_root = v;
    else if (a == "--admin-token")
      o->admin_token = v;
    else if (a == "--stream-threads")
      o->stream_threads = std::stoi(v);
    else if (a == "--greedy-threads")
      o->greedy_threads = std::stoi(v);
    else if (a == "--max-probe-s")
      o->max_probe_s = std::stod(v);
    else if (a == "--upload-limit")
      o->upload_limit = std::stoll(v);
    else if (a == "--rss-slack-frac")
      o->rss_slack_frac = std::stod(v);
    else if (a == "--rss-slack-mib")
      o->rss_slack_mib = std::stoll(v);
    else if (a == "--thread-slack")
      o->thread_slack = std::stoi(v);
    else if (a == "--fd-slack")
      o->fd_slack = std::stoi(v);
    else if (a == "--violations-file")
      o->violations_file = v;
    else if (a == "--disconnect-child")
      o->disconnect_child = true;
    else
      return false;
  }
  return !o->server.empty();
}

}  // namespace loraplex::soak
