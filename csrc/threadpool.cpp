#include "threadpool.h"

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <system_error>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

namespace qsim {

namespace {
long current_pid() {
#if defined(__unix__) || defined(__APPLE__)
  return static_cast<long>(getpid());
#else
  return 0;
#endif
}

int default_threads() {
  if (const char* env = std::getenv("PYQSIM_NUM_THREADS")) {
    int v = std::atoi(env);
    if (v >= 1) return v < ThreadPool::max_threads() ? v : ThreadPool::max_threads();
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int c = CPU_COUNT(&set);
    if (c >= 1) return c;
  }
#endif
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}
}  // namespace

int ThreadPool::max_threads() {
  const unsigned hc = std::thread::hardware_concurrency();
  const long scaled = 64L * static_cast<long>(hc);
  return scaled > 1024 ? static_cast<int>(scaled) : 1024;
}

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: worker threads must not be joined during interpreter teardown.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

ThreadPool::ThreadPool() {
  owner_pid_ = current_pid();
  nthreads_ = default_threads();
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(run_mu_);
  if (n == nthreads_.load()) return;
  stop_workers();
  nthreads_ = n;
}

void ThreadPool::start_workers(int n) {
  stop_ = false;
  try {
    for (int i = 1; i < n; ++i) workers_.emplace_back(&ThreadPool::worker_main, this, i, generation_);
  } catch (const std::system_error& e) {
    // The OS refused a thread: do not keep a half-started pool (the next run would wait for workers that do
    // not exist); stop the ones that started and report. The next call tries again.
    const size_t started = workers_.size();
    stop_workers();
    throw std::runtime_error("could not start " + std::to_string(n - 1) + " worker threads (the system refused after " +
                             std::to_string(started) + "): " + e.what() + "; use fewer threads (set_num_threads)");
  }
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  workers_.clear();
  stop_ = false;
}

void ThreadPool::work(int id, const std::function<void(int64_t, int)>& fn) {
  for (;;) {
    int64_t t = next_.fetch_add(1);
    if (t >= ntasks_) break;
    fn(t, id);
  }
}

void ThreadPool::worker_main(int id, uint64_t gen_seen) {
  for (;;) {
    // Back-to-back calls (small GEMMs) are common: poll for a short while before blocking.
    for (int i = 0; i < 4000 && gen_pub_.load(std::memory_order_acquire) == gen_seen; ++i) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    const std::function<void(int64_t, int)>* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || generation_ != gen_seen; });
      if (stop_) return;
      gen_seen = generation_;
      job = job_;
      if (!job) continue;  // its caller took the last task and did not wait for this thread
      ++inside_;
    }
    work(id, *job);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (--inside_ == 0) done_cv_.notify_all();
    }
  }
}

void ThreadPool::run(int64_t ntasks, const std::function<void(int64_t, int)>& fn) {
  if (ntasks <= 0) return;
  std::lock_guard<std::mutex> run_lk(run_mu_);
  int n = nthreads_.load();
  if (n <= 1 || ntasks == 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t, 0);
    return;
  }
  long pid = current_pid();
  if (pid != owner_pid_) {
    // A forked child inherits no worker threads: forget them (never join) and start afresh.
    // (The handles are leaked: destroying or detaching them would touch threads that do not exist here.)
    new std::vector<std::thread>(std::move(workers_));
    workers_.clear();
    owner_pid_ = pid;
  }
  if (static_cast<int>(workers_.size()) != n - 1) {
    stop_workers();
    start_workers(n);
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &fn;
    ntasks_ = ntasks;
    next_ = 0;
    ++generation_;
    gen_pub_.store(generation_, std::memory_order_release);
  }
  cv_.notify_all();
  work(0, fn);
  // Every task is taken: the workers that joined finish theirs; later ones find no job (next_ and ntasks_ stay
  // until the next run, which waits for run_mu_)
  std::unique_lock<std::mutex> lk(mu_);
  job_ = nullptr;
  done_cv_.wait(lk, [&] { return inside_ == 0; });
}

}  // namespace qsim
