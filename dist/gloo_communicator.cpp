// The Gloo backend: gloo::allreduce, allgather, alltoallv, broadcast and barrier on CPU tensors,
// each run to completion inside the call. Data movement goes as raw bytes (any dtype, bf16
// included); reductions are typed, with bf16 staged through float32 as in the MPI backend.
// Rendezvous: gloo::rendezvous::Context::connectFullMesh with GatherStore, a Store whose set()
// is an all_gather over another communicator.
#include "dist/gloo_communicator.h"

#include <ATen/ATen.h>
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "dist/runtime.h"
#include "kernels/check.h"

namespace mole::dist {
namespace {

using ::mole::detail::cat;

// Complete when returned: Gloo's collectives block. An error nobody waited for is printed when
// the Work is dropped, so that it is not lost.
class GlooWork final : public Work {
 public:
  GlooWork() = default;
  explicit GlooWork(std::string error) : error_(std::move(error)) {}
  ~GlooWork() override {
    if (!error_.empty() && !waited_) {
      std::fprintf(stderr, "mole: dropped without wait(): %s\n", error_.c_str());
    }
  }

  void wait() override {
    waited_ = true;
    if (!error_.empty()) throw Error(error_);
  }
  bool is_completed() override { return true; }

 private:
  std::string error_;
  bool waited_ = false;
};

// Gloo counts in milliseconds: at least 1, at most a year (an infinite timeout stays finite).
std::chrono::milliseconds to_millis(double timeout_s) {
  const double ms = std::clamp(std::ceil(timeout_s * 1000.0), 1.0, 365.0 * 24 * 3600 * 1000);
  return std::chrono::milliseconds(static_cast<int64_t>(ms));
}

// A rendezvous::Store whose set() is collective over `over`: each rank's connectFullMesh makes
// the same sequence of set() calls whatever its rank and group, so every rank of `over` is in
// set() at the same point, and one all_gather hands every rank every (key, value) pair. Only the
// pairs from the ranks of `over` marked in `member` are kept: during a split every color's
// group connects at once, and their keys ("0", "1", ...) overlap. So get() and wait() never
// block: a key still missing was set by no member, and waiting would hang.
class GatherStore final : public gloo::rendezvous::Store {
 public:
  GatherStore(Communicator& over, std::vector<bool> member)
      : over_(over), member_(std::move(member)) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    const int n = over_.size();
    // Sync point: the sizes of every rank's key and value, then the bytes, padded to the longest.
    at::Tensor sizes = at::tensor(
        {static_cast<int64_t>(key.size()), static_cast<int64_t>(data.size())}, at::kLong);
    at::Tensor all_sizes = at::empty({2 * n}, at::kLong);
    over_.all_gather(sizes, all_sizes)->wait();
    const int64_t* size_of = all_sizes.data_ptr<int64_t>();
    int64_t max_bytes = 0;
    for (int p = 0; p < n; ++p)
      max_bytes = std::max(max_bytes, size_of[2 * p] + size_of[2 * p + 1]);
    const int64_t words = std::max<int64_t>(1, (max_bytes + 7) / 8);
    at::Tensor mine = at::zeros({words}, at::kLong);
    char* out = static_cast<char*>(mine.data_ptr());
    std::memcpy(out, key.data(), key.size());
    std::memcpy(out + key.size(), data.data(), data.size());
    at::Tensor all = at::empty({n * words}, at::kLong);
    over_.all_gather(mine, all)->wait();
    const char* bytes = static_cast<const char*>(all.data_ptr());
    for (int p = 0; p < n; ++p) {
      if (!member_[static_cast<size_t>(p)]) continue;
      const char* entry = bytes + p * words * 8;
      const int64_t key_bytes = size_of[2 * p];
      entries_[std::string(entry, static_cast<size_t>(key_bytes))] =
          std::vector<char>(entry + key_bytes, entry + key_bytes + size_of[2 * p + 1]);
    }
  }

  std::vector<char> get(const std::string& key) override {
    wait({key});
    return entries_.at(key);
  }

  void wait(const std::vector<std::string>& keys) override {
    for (const std::string& key : keys) {
      MOLE_CHECK(entries_.count(key) != 0, "Gloo rendezvous over ", over_.describe(), ": key '",
                 key, "' was set by no rank of the group");
    }
  }

  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds&) override {
    wait(keys);
  }

 private:
  Communicator& over_;
  std::vector<bool> member_;
  std::map<std::string, std::vector<char>> entries_;
};

// What the TCP device binds to: GLOO_SOCKET_IFNAME's interface, or this host's name.
gloo::transport::tcp::attr device_attr() {
  gloo::transport::tcp::attr attr;
  const char* iface = std::getenv("GLOO_SOCKET_IFNAME");
  if (iface != nullptr && *iface != '\0') {
    attr.iface = iface;
  } else {
    attr.hostname = host_name();
  }
  return attr;
}

// The address a device made from `attr` takes connections on (Gloo's resolution of the host
// name or interface): its text and whether it is a loopback address.
struct ListenAddress {
  std::string text;
  bool loopback = false;
};
ListenAddress listen_address(const gloo::transport::tcp::attr& attr) {
  const gloo::transport::tcp::attr resolved = gloo::transport::tcp::CreateDeviceAttr(attr);
  ListenAddress out;
  char text[INET6_ADDRSTRLEN] = {};
  if (resolved.ai_addr.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(&resolved.ai_addr);
    inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
    out.loopback = (ntohl(in->sin_addr.s_addr) >> 24) == IN_LOOPBACKNET;
  } else if (resolved.ai_addr.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&resolved.ai_addr);
    inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
    out.loopback = IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr) ||
                   (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) && in6->sin6_addr.s6_addr[12] == 127);
  }
  out.text = text;
  return out;
}

// FNV-1a: the same value on every host, whatever its C++ library.
int64_t name_hash(const std::string& name) {
  uint64_t h = 14695981039346656037ull;
  for (const unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return static_cast<int64_t>(h >> 1);
}

std::string describe_attr(const gloo::transport::tcp::attr& attr) {
  return attr.iface.empty() ? "host name '" + attr.hostname + "'"
                            : "interface '" + attr.iface + "' (GLOO_SOCKET_IFNAME)";
}

// Connects rank `rank` of a group of `size` to every other member, swapping addresses with
// all_gathers over `over` (`member`: which ranks of `over` are in this rank's group). Collective
// over all of `over`.
std::shared_ptr<gloo::Context> connect_mesh(int rank, int size, Communicator& over,
                                            std::vector<bool> member,
                                            std::shared_ptr<gloo::transport::Device> device,
                                            double timeout_s, const std::string& where) {
  auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
  context->setTimeout(to_millis(timeout_s));
  GatherStore store(over, std::move(member));
  std::string error;
  try {
    context->connectFullMesh(store, device);
  } catch (const std::exception& e) {
    error = e.what();
    // Said at once: the sync below waits for peers that may still be trying to connect.
    std::fprintf(stderr, "mole: %s on host '%s': Gloo rendezvous failed: %s\n", where.c_str(),
                 host_name().c_str(), error.c_str());
    std::fflush(stderr);
  }
  // Sync point: nobody returns before every rank has connected. connectFullMesh connects its
  // pairs one by one, and a pair that a peer already closed fails its connect: without this, a
  // rank that destroys the new communicator at once (having nothing to send) breaks the
  // rendezvous of a slower peer. A failure on one rank fails every rank here too.
  at::Tensor failed = at::full({1}, error.empty() ? 0 : 1, at::kLong);
  over.all_reduce(failed, ReduceOp::kMax)->wait();
  MOLE_CHECK(error.empty(), where, ": Gloo rendezvous failed: ", error);
  MOLE_CHECK(failed.item<int64_t>() == 0, where, ": the Gloo rendezvous failed on another rank");
  return context;
}

std::string where_is(const std::string& name, int rank, int size) {
  return cat("Gloo communicator '", name, "' (rank ", rank, " of ", size, ")");
}

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

template <typename T>
ReduceFn reduce_fn(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return static_cast<ReduceFn>(&gloo::sum<T>);
    case ReduceOp::kMax:
      return static_cast<ReduceFn>(&gloo::max<T>);
    case ReduceOp::kMin:
      return static_cast<ReduceFn>(&gloo::min<T>);
  }
  MOLE_FAIL("Gloo backend: unknown ReduceOp ", static_cast<int>(op));
}

template <typename T>
void allreduce_as(const std::shared_ptr<gloo::Context>& context, uint32_t tag, at::Tensor& buffer,
                  ReduceOp op) {
  gloo::AllreduceOptions opts(context);
  opts.setOutput(buffer.data_ptr<T>(), static_cast<size_t>(buffer.numel()));
  opts.setReduceFunction(reduce_fn<T>(op));
  opts.setTag(tag);
  gloo::allreduce(opts);
}

// In place on `buffer`; bf16 is staged by the caller.
void allreduce(const std::shared_ptr<gloo::Context>& context, uint32_t tag, at::Tensor& buffer,
               ReduceOp op) {
  if (buffer.numel() == 0) return;  // same shape on every rank: all skip alike
  switch (buffer.scalar_type()) {
    case at::kFloat:
      return allreduce_as<float>(context, tag, buffer, op);
    case at::kDouble:
      return allreduce_as<double>(context, tag, buffer, op);
    case at::kLong:
      return allreduce_as<int64_t>(context, tag, buffer, op);
    case at::kInt:
      return allreduce_as<int32_t>(context, tag, buffer, op);
    default:
      MOLE_FAIL("Gloo backend: no reduction for dtype ", buffer.scalar_type());
  }
}

// Gloo moves bytes; bf16 (no Gloo type) travels as raw 16-bit words like every other dtype.
uint8_t* bytes_of(const at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }
size_t num_bytes(const at::Tensor& t) {
  return static_cast<size_t>(t.numel()) * static_cast<size_t>(t.element_size());
}

std::vector<int64_t> rows_to_bytes(const std::vector<int64_t>& rows, int64_t row_bytes) {
  std::vector<int64_t> bytes;
  bytes.reserve(rows.size());
  for (int64_t r : rows) bytes.push_back(r * row_bytes);
  return bytes;
}

}  // namespace

struct GlooCommunicator::State {
  std::shared_ptr<gloo::transport::Device> device;  // shared with the groups split from this one
  std::shared_ptr<gloo::Context> context;
  uint32_t next_tag = 0;  // same sequence on every rank: the collectives are called in order
  std::string broken;     // the first error, once there was one
};

std::unique_ptr<GlooCommunicator> GlooCommunicator::create(Communicator& bootstrap,
                                                           double timeout_s,
                                                           const std::string& name) {
  const std::string where = where_is(name, bootstrap.rank(), bootstrap.size());
  MOLE_CHECK(timeout_s > 0 && !std::isnan(timeout_s), where, ": timeout_s ", timeout_s,
             " must be positive");
  auto state = std::make_unique<State>();
  std::string device_error;
  gloo::transport::tcp::attr attr;
  ListenAddress address;
  try {
    attr = device_attr();
    address = listen_address(attr);
    state->device = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {
    device_error = e.what();
  }
  // Sync point: a rank that cannot open its device, or that would listen on a loopback address
  // while the job spans hosts, fails every rank here, rather than leaving the others waiting in
  // the rendezvous until the bootstrap's timeout. Per rank: device failed, loopback, a hash of
  // the host name, and "host address" as text (kTextWords words), for every rank's message.
  constexpr int64_t kTextWords = 32;
  constexpr int64_t kWords = 3 + kTextWords;
  const std::string host = host_name();
  at::Tensor mine = at::zeros({kWords}, at::kLong);
  int64_t* word = mine.data_ptr<int64_t>();
  word[0] = device_error.empty() ? 0 : 1;
  word[1] = address.loopback ? 1 : 0;
  word[2] = name_hash(host);
  const std::string text = host + " " + address.text;
  std::memcpy(word + 3, text.data(), std::min<size_t>(text.size(), kTextWords * 8 - 1));
  at::Tensor all = at::empty({kWords * bootstrap.size()}, at::kLong);
  bootstrap.all_gather(mine, all)->wait();
  MOLE_CHECK(device_error.empty(), where, ": cannot open a Gloo TCP device on ",
             describe_attr(attr), ": ", device_error);
  const int64_t* rank_of = all.data_ptr<int64_t>();
  int first_failed = -1, first_loopback = -1;
  bool several_hosts = false;
  for (int p = 0; p < bootstrap.size(); ++p) {
    const int64_t* r = rank_of + kWords * p;
    if (r[0] != 0 && first_failed < 0) first_failed = p;
    if (r[1] != 0 && first_loopback < 0) first_loopback = p;
    several_hosts = several_hosts || r[2] != rank_of[2];
  }
  MOLE_CHECK(first_failed < 0, where, ": rank ", first_failed,
             " could not open its Gloo TCP device (see its message)");
  if (several_hosts && first_loopback >= 0) {
    const char* chars = reinterpret_cast<const char*>(rank_of + kWords * first_loopback + 3);
    const std::string theirs(chars, strnlen(chars, kTextWords * 8));
    const size_t space = theirs.find(' ');
    MOLE_FAIL(where, ": rank ", first_loopback, " (host '", theirs.substr(0, space),
              "') would take Gloo connections on ", theirs.substr(space + 1),
              ", a loopback address, but the job spans several hosts, whose ranks cannot connect "
              "to it. Set GLOO_SOCKET_IFNAME to the interface of the network between the hosts, "
              "or make the host name resolve to its address there (Debian's /etc/hosts maps a "
              "host's own name to 127.0.1.1)");
  }
  state->context = connect_mesh(bootstrap.rank(), bootstrap.size(), bootstrap,
                                std::vector<bool>(static_cast<size_t>(bootstrap.size()), true),
                                state->device, timeout_s, where);
  return std::unique_ptr<GlooCommunicator>(new GlooCommunicator(std::move(state), name, timeout_s));
}

GlooCommunicator::GlooCommunicator(std::unique_ptr<State> state, std::string name, double timeout_s)
    : state_(std::move(state)),
      name_(std::move(name)),
      timeout_s_(timeout_s),
      rank_(state_->context->rank),
      size_(state_->context->size) {}

GlooCommunicator::~GlooCommunicator() = default;

std::shared_ptr<Work> GlooCommunicator::run(const char* op,
                                            const std::function<void(uint32_t tag)>& body) {
  if (!state_->broken.empty()) {
    return std::make_shared<GlooWork>(cat(op, " on ", describe(),
                                          ": the communicator is unusable after an earlier "
                                          "error: ",
                                          state_->broken));
  }
  try {
    body(state_->next_tag++);
  } catch (const gloo::IoException& e) {
    const std::string what = e.what();
    // Gloo's words for an expired wait: "Timed out waiting 1000ms for recv operation ...". A
    // rank that times out closes its connections in this context, so its peers' operations fail
    // at once with "Connection closed by peer" instead of waiting out their own timeouts.
    state_->broken =
        what.find("Timed out") != std::string::npos
            ? cat("timed out after ", timeout_s_, " s in ", op, " on ", describe(),
                  "; a peer rank may have died (Gloo: ", what, ")")
            : cat(op, " on ", describe(), " failed: a connection to a peer broke (Gloo: ", what,
                  "); a peer rank may have died or timed out");
  } catch (const std::exception& e) {  // gloo::EnforceNotMet and the like
    state_->broken = cat(op, " on ", describe(), " failed in Gloo: ", e.what());
  }
  if (!state_->broken.empty()) return std::make_shared<GlooWork>(state_->broken);
  return std::make_shared<GlooWork>();
}

std::shared_ptr<Work> GlooCommunicator::all_reduce_impl(at::Tensor& inout, ReduceOp op) {
  return run("all_reduce", [&](uint32_t tag) {
    if (inout.scalar_type() != at::kBFloat16) return allreduce(state_->context, tag, inout, op);
    at::Tensor staged = inout.to(at::kFloat);
    allreduce(state_->context, tag, staged, op);
    inout.copy_(staged);
  });
}

std::shared_ptr<Work> GlooCommunicator::reduce_scatter_impl(const at::Tensor& input,
                                                            at::Tensor& output) {
  return run("reduce_scatter", [&](uint32_t tag) {
    at::Tensor sum = input.scalar_type() == at::kBFloat16 ? input.to(at::kFloat) : input.clone();
    allreduce(state_->context, tag, sum, ReduceOp::kSum);
    const int64_t rows = output.size(0);
    output.copy_(sum.narrow(0, rank_ * rows, rows));
  });
}

std::shared_ptr<Work> GlooCommunicator::all_gather_impl(const at::Tensor& input,
                                                        at::Tensor& output) {
  return run("all_gather", [&](uint32_t tag) {
    if (input.numel() == 0) return;  // same shape on every rank
    gloo::AllgatherOptions opts(state_->context);
    opts.setInput(bytes_of(input), num_bytes(input));
    opts.setOutput(bytes_of(output), num_bytes(output));
    opts.setTag(tag);
    gloo::allgather(opts);
  });
}

std::shared_ptr<Work> GlooCommunicator::all_to_all_impl(const at::Tensor& input, at::Tensor& output,
                                                        const std::vector<int64_t>& send_rows,
                                                        const std::vector<int64_t>& recv_rows) {
  return run("all_to_all", [&](uint32_t tag) {
    int64_t row_bytes = input.element_size();
    for (int64_t d = 1; d < input.dim(); ++d) row_bytes *= input.size(d);
    // Sizes differ between ranks here: never skip. An empty tensor may have no storage.
    uint8_t placeholder[2] = {};
    uint8_t* in = input.numel() > 0 ? bytes_of(input) : &placeholder[0];
    uint8_t* out = output.numel() > 0 ? bytes_of(output) : &placeholder[1];
    gloo::AlltoallvOptions opts(state_->context);
    opts.setInput(in, rows_to_bytes(send_rows, row_bytes));
    opts.setOutput(out, rows_to_bytes(recv_rows, row_bytes));
    opts.setTag(tag);
    gloo::alltoallv(opts);
  });
}

std::shared_ptr<Work> GlooCommunicator::broadcast_impl(at::Tensor& tensor, int root) {
  return run("broadcast", [&](uint32_t tag) {
    if (tensor.numel() == 0) return;  // same shape on every rank
    gloo::BroadcastOptions opts(state_->context);
    opts.setOutput(bytes_of(tensor), num_bytes(tensor));
    opts.setRoot(root);
    opts.setTag(tag);
    gloo::broadcast(opts);
  });
}

void GlooCommunicator::barrier_impl() {
  run("barrier", [&](uint32_t tag) {
    gloo::BarrierOptions opts(state_->context);
    opts.setTag(tag);
    gloo::barrier(opts);
  })->wait();
}

std::unique_ptr<Communicator> GlooCommunicator::split_impl(int color, int key,
                                                           const std::string& name,
                                                           double timeout_s) {
  // Sync point: every rank learns every rank's (color, key).
  at::Tensor mine = at::tensor({int64_t{color}, int64_t{key}}, at::kLong);
  at::Tensor all = at::empty({2 * size_}, at::kLong);
  all_gather(mine, all)->wait();
  const int64_t* color_key = all.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int>> group;  // (key, rank here), ordered as the new ranks
  std::vector<bool> member(static_cast<size_t>(size_), false);
  for (int p = 0; p < size_; ++p) {
    if (color_key[2 * p] != color) continue;
    group.emplace_back(color_key[2 * p + 1], p);
    member[static_cast<size_t>(p)] = true;
  }
  std::sort(group.begin(), group.end());
  const int new_size = static_cast<int>(group.size());
  const int new_rank = static_cast<int>(
      std::find(group.begin(), group.end(), std::pair<int64_t, int>(key, rank_)) - group.begin());
  auto state = std::make_unique<State>();
  state->device = state_->device;
  state->context = connect_mesh(new_rank, new_size, *this, std::move(member), state->device,
                                timeout_s, where_is(name, new_rank, new_size));
  return std::unique_ptr<Communicator>(new GlooCommunicator(std::move(state), name, timeout_s));
}

}  // namespace mole::dist
