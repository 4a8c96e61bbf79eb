// A small persistent thread pool. run(n, fn) calls fn(task, worker) for every task in [0, n) and
// returns when all are done; the calling thread works too (worker 0), and waits only for the workers that joined
// (a worker still asleep when the caller has taken the last task skips that job). Tasks are claimed from an
// atomic counter, so which worker runs which task varies, but every kernel computes each output
// element entirely inside one task, so results never depend on the thread count or schedule.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qsim {

class ThreadPool {
 public:
  static ThreadPool& instance();
  // Largest accepted thread count: max(1024, 64 x hardware threads).
  static int max_threads();
  int num_threads() const { return nthreads_.load(); }
  void set_num_threads(int n);
  // Serialized: concurrent callers (e.g. Python threads with the GIL released) take turns.
  void run(int64_t ntasks, const std::function<void(int64_t, int)>& fn);
  ~ThreadPool();

 private:
  ThreadPool();
  void start_workers(int n);
  void stop_workers();
  void worker_main(int id, uint64_t gen_seen);
  void work(int id, const std::function<void(int64_t, int)>& fn);

  std::atomic<int> nthreads_{1};
  std::mutex run_mu_;  // one run() at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> gen_pub_{0};  // generation_, readable without the mutex (brief spin before sleeping)
  bool stop_ = false;
  int inside_ = 0;  // workers that joined the current job and have not left it
  const std::function<void(int64_t, int)>* job_ = nullptr;  // null once the caller has taken the last task
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
  long owner_pid_ = 0;
};

}  // namespace qsim
