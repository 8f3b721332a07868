// Differentiable all-to-all and all-gather (see exchange.h).
#include "parallel/exchange.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <numeric>

#include "dist/communicator.h"
#include "kernels/check.h"

namespace mole::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The communicator and the traffic counter travel through autograd's saved data as integers:
// both outlive the graph (the process grid and the dispatcher live for the whole run).
int64_t as_int(const void* p) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(p)); }
template <typename T>
T* from_int(int64_t v) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(v));
}

int64_t row_bytes(const at::Tensor& t) {
  int64_t n = static_cast<int64_t>(t.element_size());
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

at::Tensor exchange(dist::Communicator& comm, const at::Tensor& rows,
                    const std::vector<int64_t>& send, const std::vector<int64_t>& recv,
                    Traffic* traffic) {
  const at::Device device = rows.device();
  at::Tensor in = rows.to(comm.tensor_device()).contiguous();
  std::vector<int64_t> shape = in.sizes().vec();
  shape[0] = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  at::Tensor out = at::empty(shape, in.options());
  comm.all_to_all(in, out, send, recv)->wait();
  if (traffic != nullptr) {
    int64_t remote = 0;
    for (size_t p = 0; p < send.size(); ++p) {
      if (static_cast<int>(p) != comm.rank()) remote += send[p];
    }
    traffic->bytes_sent += remote * row_bytes(in);
  }
  return out.to(device);
}

class ExchangeRows : public torch::autograd::Function<ExchangeRows> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& rows, int64_t comm,
                               int64_t traffic, std::vector<int64_t> send,
                               std::vector<int64_t> recv) {
    at::Tensor out = exchange(*from_int<dist::Communicator>(comm), rows, send, recv,
                              from_int<Traffic>(traffic));
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["traffic"] = traffic;
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Gradients are materialised (zeros when unused), so every rank takes part.
    at::Tensor g = exchange(*from_int<dist::Communicator>(ctx->saved_data["comm"].toInt()),
                            grads[0], ctx->saved_data["recv"].toIntVector(),
                            ctx->saved_data["send"].toIntVector(),
                            from_int<Traffic>(ctx->saved_data["traffic"].toInt()));
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class AllGatherFlat : public torch::autograd::Function<AllGatherFlat> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& flat, int64_t comm_int,
                               int64_t traffic_int) {
    dist::Communicator& comm = *from_int<dist::Communicator>(comm_int);
    at::Tensor in = flat.to(comm.tensor_device()).contiguous();
    at::Tensor out = at::empty({comm.size() * in.numel()}, in.options());
    comm.all_gather(in, out)->wait();
    if (Traffic* t = from_int<Traffic>(traffic_int)) {
      t->bytes_sent += (comm.size() - 1) * in.numel() * static_cast<int64_t>(in.element_size());
    }
    ctx->saved_data["comm"] = comm_int;
    ctx->saved_data["traffic"] = traffic_int;
    return {out.to(flat.device())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    dist::Communicator& comm = *from_int<dist::Communicator>(ctx->saved_data["comm"].toInt());
    const at::Device device = grads[0].device();
    at::Tensor g = grads[0].to(comm.tensor_device()).contiguous();
    at::Tensor out = at::empty({g.numel() / comm.size()}, g.options());
    comm.reduce_scatter(g, out)->wait();
    if (Traffic* t = from_int<Traffic>(ctx->saved_data["traffic"].toInt())) {
      t->bytes_sent += (comm.size() - 1) * out.numel() * static_cast<int64_t>(out.element_size());
    }
    return {out.to(device), at::Tensor(), at::Tensor()};
  }
};

void check_splits(const dist::Communicator& comm, const at::Tensor& rows,
                  const std::vector<int64_t>& send, const std::vector<int64_t>& recv) {
  MOLE_CHECK(static_cast<int>(send.size()) == comm.size() &&
                 static_cast<int>(recv.size()) == comm.size(),
             "exchange_rows on ", comm.describe(), ": ", send.size(), " send and ", recv.size(),
             " receive counts for ", comm.size(), " ranks");
  MOLE_CHECK(rows.dim() >= 1 && std::accumulate(send.begin(), send.end(), int64_t{0}) == rows.size(0),
             "exchange_rows on ", comm.describe(), ": send counts do not sum to the ",
             rows.dim() >= 1 ? rows.size(0) : 0, " rows given");
}

}  // namespace

at::Tensor exchange_rows(dist::Communicator& comm, const at::Tensor& rows_nD,
                         const std::vector<int64_t>& send_rows,
                         const std::vector<int64_t>& recv_rows, Traffic* traffic) {
  check_splits(comm, rows_nD, send_rows, recv_rows);
  return ExchangeRows::apply(rows_nD, as_int(&comm), as_int(traffic), send_rows, recv_rows)[0];
}

at::Tensor all_gather_flat(dist::Communicator& comm, const at::Tensor& flat_L, Traffic* traffic) {
  MOLE_CHECK(flat_L.dim() == 1, "all_gather_flat: expected a 1-D tensor, got ", flat_L.sizes());
  return AllGatherFlat::apply(flat_L, as_int(&comm), as_int(traffic))[0];
}

std::vector<int64_t> exchange_counts(dist::Communicator& comm, const std::vector<int64_t>& counts) {
  const int64_t P = comm.size();
  MOLE_CHECK(static_cast<int64_t>(counts.size()) % P == 0, "exchange_counts: ", counts.size(),
             " counts do not split over ", P, " ranks");
  const int64_t per_rank = static_cast<int64_t>(counts.size()) / P;
  at::Tensor in = at::tensor(counts, at::kLong).to(comm.tensor_device());
  at::Tensor out = at::empty_like(in);
  const std::vector<int64_t> splits(static_cast<size_t>(P), per_rank);
  comm.all_to_all(in, out, splits, splits)->wait();
  // Sync point: the counts decide the row splits on the host.
  at::Tensor host = out.cpu();
  return std::vector<int64_t>(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
}

}  // namespace mole::parallel
