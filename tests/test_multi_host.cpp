// mole across hosts over real TCP: two "hosts" on this machine (network and UTS namespaces joined
// by a bridge, tests/cluster/hosts.sh), Open MPI's rsh launcher entering them, MPI's TCP
// transport and Gloo limited to their network. Training over 2 hosts x 2 ranks (DP 2 x EP 2)
// equals one process; a cut link, an unknown host, a missing interface, a host name that
// resolves to loopback and two hosts with one host name each end every rank with a clear error.
// Needs root (CI runs as root); skipped with the reason where the machine forbids namespaces.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "tests/train_run_util.h"

namespace mole {
namespace {

using test::expect_same_steps;
using test::read_bytes;
using test::run;

const std::string kHosts = std::string(MOLE_SOURCE_DIR) + "/tests/cluster/hosts.sh";
const std::string kFp64 = " --set model.dtype=fp64";
#ifdef MOLE_HAVE_GLOO
const std::vector<std::string> kBackends = {"mpi", "gloo"};
#else
const std::vector<std::string> kBackends = {"mpi"};
#endif
bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class MultiHost : public test::MpiJobTest {
 protected:
  void SetUp() override {
    MpiJobTest::SetUp();
    prefix_ = "mh" + std::to_string(getpid() % 10000000);
    hosts_ = dir_.file("hosts");
    // Hosts of an earlier test that was killed before its teardown.
    run(kHosts + " down-stale mh", dir_.file("stale.log"));
    const int status = run(kHosts + " up " + hosts_ + " " + prefix_ + " 2", dir_.file("up.log"));
    made_ = true;
    const std::string log = read_bytes(dir_.file("up.log"));
    if (WIFEXITED(status) && WEXITSTATUS(status) == 77) GTEST_SKIP() << log;
    ASSERT_EQ(status, 0) << log;
  }

  void remake_hosts() {
    ASSERT_EQ(run(kHosts + " down " + prefix_, dir_.file("down.log")), 0)
        << read_bytes(dir_.file("down.log"));
    ASSERT_EQ(run(kHosts + " up " + hosts_ + " " + prefix_ + " 2", dir_.file("up.log")), 0)
        << read_bytes(dir_.file("up.log"));
  }

  void TearDown() override {
    if (!made_) return;
    EXPECT_EQ(run(kHosts + " down " + prefix_, dir_.file("down.log")), 0)
        << read_bytes(dir_.file("down.log"));
  }

  // mpirun started on node1 over both hosts (2 slots each), Open MPI's TCP transport and its
  // own traffic limited to the hosts' network. `mpi` goes before the program (more options).
  // `btl_if`: the interfaces (or subnet) of MPI's TCP transport.
  std::string mpirun_on_hosts(int np, const std::string& mpi = "",
                              const std::string& btl_if = "198.18.0.0/24") const {
    return hosts_ + "/on node1 " + test::mpirun(np) + "--hostfile " + hosts_ +
           "/hostfile --mca plm_rsh_agent " + hosts_ + "/agent --mca btl_tcp_if_include " +
           btl_if + " --mca oob_tcp_if_include 198.18.0.0/24 -x OMP_NUM_THREADS=1 " +
           (mpi.empty() ? "--mca btl tcp,vader,self" : mpi) + " ";
  }

  // `mole train` on the demo over 2 hosts x 2 ranks with EP 2; its log. Collectives and start-up
  // wait at most 60 s unless `extra` says otherwise, and the job is killed after 150 s: a hang
  // fails the test instead of outliving it (and its hosts).
  std::string train_on_hosts(const std::string& name, const std::string& extra, int* status,
                             const std::string& mpi = "",
                             const std::string& btl_if = "198.18.0.0/24") {
    const std::string log = dir_.file(name + ".log");
    *status = run("timeout 150 " + mpirun_on_hosts(4, mpi, btl_if) +
                      test::demo_train_args(dir_.file(name), 4) + " --set parallel.ep=2" + kFp64 +
                      " --set parallel.timeout_s=60" + extra,
                  log);
    return read_bytes(log);
  }

  // Starts `command` in its own process group; returns its pid.
  static pid_t start(const std::string& command) {
    const pid_t job = fork();
    if (job == 0) {
      setpgid(0, 0);
      execl("/bin/sh", "sh", "-c", ("exec " + command).c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    return job;
  }

  // The processes (on every host: one machine) whose command line holds `marker`, but this one.
  static std::vector<pid_t> processes_with(const std::string& marker) {
    std::vector<pid_t> found;
    for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
      const std::string name = entry.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      const pid_t pid = static_cast<pid_t>(std::stol(name));
      if (pid == getpid()) continue;
      std::ifstream in(entry.path() / "cmdline", std::ios::binary);
      const std::string line((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (line.find(marker) != std::string::npos) found.push_back(pid);
    }
    return found;
  }

  // Waits up to `limit_s` for `job` to end and for no process whose command line holds `marker`
  // to be left (on any host); kills what is left after that. The seconds it took, or -1.
  static double wait_all_gone(pid_t job, const std::string& marker, double limit_s, int* status) {
    const auto from = std::chrono::steady_clock::now();
    bool reaped = false;
    while (true) {
      if (!reaped && waitpid(job, status, WNOHANG) == job) reaped = true;
      const bool left = !processes_with(marker).empty();
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - from).count();
      if (reaped && !left) return seconds;
      if (seconds > limit_s) {
        for (const pid_t pid : processes_with(marker)) kill(pid, SIGKILL);
        kill(-job, SIGKILL);
        if (!reaped) waitpid(job, status, 0);
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }

  std::string prefix_, hosts_;
  bool made_ = false;
};

TEST_F(MultiHost, TwoHostsTrainLikeOneProcessWithMpiAndGloo) {
  const std::string ref = dir_.file("np1");
  ASSERT_EQ(run(test::demo_train_args(ref, 16) + kFp64, dir_.file("np1.log")), 0)
      << read_bytes(dir_.file("np1.log"));
  for (const std::string& backend : kBackends) {
    int status = 0;
    const std::string log = train_on_hosts(backend, " --set parallel.backend=" + backend, &status);
    ASSERT_EQ(status, 0) << log;
    // Every rank says where it runs: two ranks on each host, local ranks 0 and 1.
    for (const char* line : {"rank 0 of 4 on host node1 (local rank 0 of 2)",
                             "rank 1 of 4 on host node1 (local rank 1 of 2)",
                             "rank 2 of 4 on host node2 (local rank 0 of 2)",
                             "rank 3 of 4 on host node2 (local rank 1 of 2)"}) {
      EXPECT_TRUE(contains(log, std::string(line) + ", device cpu, " + backend + " backend"))
          << line << "\n" << log;
    }
    expect_same_steps(ref, dir_.file(backend), 5, 1e-5);
  }
}

// The link of node2 goes down mid-run: the ranks on both sides time out in their collective and
// every process of the job ends (nothing left on either host) within parallel.timeout_s + 30 s.
TEST_F(MultiHost, CutLinkEndsEveryRankWithinTheTimeout) {
  constexpr double kTimeout = 15;
  for (const std::string& backend : kBackends) {
    const std::string run_dir = dir_.file("cut-" + backend);
    const std::string log = run_dir + ".log";
    const pid_t job = start(mpirun_on_hosts(4) + test::demo_train_args(run_dir, 4) +
                            " --set parallel.ep=2 --set train.steps=100000 --set parallel.backend=" +
                            backend + " --set parallel.timeout_s=" + std::to_string(kTimeout) +
                            " > " + log + " 2>&1");
    ASSERT_GT(job, 0);
    bool training = false;
    for (int i = 0; i < 600 && !training; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      training = test::metrics_lines(run_dir) >= 2;
    }
    ASSERT_TRUE(training) << read_bytes(log);
    ASSERT_EQ(run(kHosts + " cut " + prefix_ + " node2", dir_.file("cut.log")), 0)
        << read_bytes(dir_.file("cut.log"));
    int status = 0;
    const double seconds = wait_all_gone(job, run_dir, kTimeout + 30, &status);
    RecordProperty("seconds_from_cut_to_end_" + backend, std::to_string(seconds));
    const std::string text = read_bytes(log);
    EXPECT_GE(seconds, 0) << backend << ": processes of the job were left " << kTimeout + 30
                          << " s after the cut\n" << text;
    EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << text;
    // MPI's wait runs out; Gloo's socket may fail first (TCP gives up after ~13 s here), naming
    // the peer's address.
    EXPECT_TRUE(contains(text, "timed out after 15 s in all_reduce") ||
                (contains(text, "a connection to a peer broke (Gloo: ") &&
                 contains(text, "[198.18.0.2]")))
        << backend << "\n" << text;
    // Fresh hosts for the next backend: nothing of this job left, no stale neighbour entries.
    remake_hosts();
    if (HasFatalFailure()) return;
  }
}

// Two hosts with one host name: Open MPI decides which ranks share a node by host name, and the
// ranks then hang in MPI_Comm_split_type or create_world at start-up (or Open MPI crashes there,
// in some runs). parallel.timeout_s ends every rank that hangs with a message naming the phase.
TEST_F(MultiHost, SharedHostNameEndsStartUpWithAMessageOnEveryRank) {
  constexpr double kTimeout = 10;
  const std::string run_dir = dir_.file("shared");
  const std::string log = run_dir + ".log";
  const pid_t job = start("env SHARED_HOSTNAME=1 " + mpirun_on_hosts(4, "--mca btl tcp,self") +
                          test::demo_train_args(run_dir, 4) + " --set parallel.ep=2" +
                          " --set parallel.timeout_s=" + std::to_string(kTimeout) + " > " + log +
                          " 2>&1");
  ASSERT_GT(job, 0);
  int status = 0;
  const double seconds = wait_all_gone(job, run_dir, kTimeout + 30, &status);
  RecordProperty("seconds_to_end", std::to_string(seconds));
  const std::string text = read_bytes(log);
  EXPECT_GE(seconds, 0) << text;
  EXPECT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << text;
  if (!contains(text, "Segmentation fault")) {
    EXPECT_TRUE(contains(text, "start-up did not finish within 10 s (parallel.timeout_s) while"))
        << text;
    EXPECT_TRUE(contains(text, "two hosts with the same host name")) << text;
  }
}

TEST_F(MultiHost, UnknownHostInTheHostfileIsAClearError) {
  test::write_bytes(dir_.file("wrong-hostfile"), "node1 slots=2\nnode7 slots=2\n");
  const std::string cmd = hosts_ + "/on node1 " + test::mpirun(4) + "--hostfile " +
                          dir_.file("wrong-hostfile") + " --mca plm_rsh_agent " + hosts_ +
                          "/agent " + test::demo_train_args(dir_.file("run"), 4);
  const auto from = std::chrono::steady_clock::now();
  const test::CommandResult result = test::run_command("timeout 120 " + cmd);
  RecordProperty("seconds", std::to_string(std::chrono::duration<double>(
                                               std::chrono::steady_clock::now() - from).count()));
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.exit_code, 124) << "mpirun hung\n" << result.output;
  EXPECT_TRUE(contains(result.output, "Could not resolve hostname node7")) << result.output;
}

// An interface that does not exist: for Gloo, mole's error names it; for MPI's TCP transport,
// Open MPI's does.
TEST_F(MultiHost, MissingNetworkInterfaceIsAClearError) {
  int status = 0;
  std::string log;
#ifdef MOLE_HAVE_GLOO
  log = train_on_hosts("gloo-iface", " --set parallel.backend=gloo", &status,
                                   "--mca btl tcp,vader,self -x GLOO_SOCKET_IFNAME=ib7");
  EXPECT_NE(status, 0) << log;
  EXPECT_TRUE(contains(log, "cannot open a Gloo TCP device on interface 'ib7' (GLOO_SOCKET_IFNAME)"))
      << log;
#endif
  log = train_on_hosts("mpi-iface", " --set parallel.timeout_s=20", &status, "", "ib7");
  EXPECT_NE(status, 0) << log;
  EXPECT_TRUE(contains(log, "ib7") && contains(log, "Unknown interface name")) << log;
}

// Gloo bound to an interface the other hosts cannot reach (data0 leads nowhere): the ranks that
// try to connect name the address they tried, and start-up ends on every rank within
// parallel.timeout_s.
#ifdef MOLE_HAVE_GLOO
TEST_F(MultiHost, UnreachablePeerIsNamedAndStartUpEnds) {
  int status = 0;
  const auto from = std::chrono::steady_clock::now();
  const std::string log = train_on_hosts("gloo-unreachable",
                                         " --set parallel.backend=gloo --set parallel.timeout_s=15",
                                         &status, "--mca btl tcp,vader,self -x GLOO_SOCKET_IFNAME=data0");
  RecordProperty("seconds", std::to_string(std::chrono::duration<double>(
                                               std::chrono::steady_clock::now() - from).count()));
  EXPECT_NE(status, 0) << log;
  EXPECT_TRUE(contains(log, "Gloo rendezvous failed: ") && contains(log, "connect [198.19.0."))
      << log;
  EXPECT_TRUE(contains(log, "start-up did not finish within 15 s (parallel.timeout_s) while "
                            "creating the world communicator"))
      << log;
}
#endif

// Debian's installer maps a host's own name to 127.0.1.1; Gloo, binding the host name's address,
// would then take connections where no other host can reach: every rank stops at start-up, and
// the rank concerned names the address.
#ifdef MOLE_HAVE_GLOO
TEST_F(MultiHost, HostNameOnLoopbackIsAClearGlooError) {
  ASSERT_EQ(run(kHosts + " loopback-name " + prefix_ + " node2", dir_.file("lo.log")), 0)
      << read_bytes(dir_.file("lo.log"));
  int status = 0;
  const std::string log = train_on_hosts("gloo-lo", " --set parallel.backend=gloo", &status);
  EXPECT_NE(status, 0) << log;
  EXPECT_TRUE(contains(log, "rank 2 (host 'node2') would take Gloo connections on 127.0.1.1, a "
                            "loopback address"))
      << log;
  EXPECT_TRUE(contains(log, "Set GLOO_SOCKET_IFNAME")) << log;
}
#endif

}  // namespace
}  // namespace mole
