// How the products share a weight's rows among torch's intra-op threads (products.cpp's
// `for_rows`): each thread starts on its own equal share and walks it in order, one sequential
// stream, claiming a few rows at a time from its front; a thread whose share is done takes
// rows from the back of the others' until none are left. So the threads finish together
// however the memory bus shares itself between them.
//
// Why: with a fixed half each, a two-thread bfloat16 step (212M model, Zen 4 VM, 600-1800
// positions) had its threads waiting in OpenMP's barriers for each other: 3.8% of all samples
// on the calling thread and 8.6% on the other (perf); taking rows, 0.8% and 7.0% (most of what
// is left is the other thread waiting while the calling one runs the step's serial parts).
// Decode, 128 tokens after 512, in turn in one process (benchmarks/row_shares.py, 10-12
// rounds): bfloat16 1.02x-1.12x, int8 1.04x-1.07x, int4 1.00x-1.03x the tokens a second.
// `balanced_rows` (`set_balanced_rows`) turns the taking off for that before and after.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace tramontane {

inline std::atomic<bool> balanced_rows{true};

namespace shares {

// A share's rows not yet claimed, [front, back), in one word so that its owner (from the
// front) and a thief (from the back) claim with one compare-and-swap each; one cache line a
// share, so that owners do not contend.
struct alignas(64) Share {
  std::atomic<uint64_t> rows{0};
};

inline uint64_t pack(int64_t front, int64_t back) {
  return static_cast<uint64_t>(front) | (static_cast<uint64_t>(back) << 32);
}
inline int64_t front_of(uint64_t s) { return static_cast<int64_t>(s & 0xffffffffu); }
inline int64_t back_of(uint64_t s) { return static_cast<int64_t>(s >> 32); }

// The owner's next claim from the front: an eighth of what is left, at least `claim` rows, a
// multiple of `align`: few claims while the share is long, small ones near its end.
inline bool claim_front(Share& share, int64_t claim, int64_t align, int64_t* r0, int64_t* r1) {
  uint64_t s = share.rows.load(std::memory_order_relaxed);
  while (true) {
    const int64_t front = front_of(s), back = back_of(s);
    if (front >= back) return false;
    const int64_t want = std::max(claim, (back - front) / 8 / align * align);
    const int64_t end = std::min(back, front + want);
    if (share.rows.compare_exchange_weak(s, pack(end, back), std::memory_order_relaxed)) {
      *r0 = front;
      *r1 = end;
      return true;
    }
  }
}

// A thief's claim from the back: `claim` rows, ending where the share ends, starting on a
// multiple of `align` (the share's first row is one).
inline bool claim_back(Share& share, int64_t claim, int64_t align, int64_t* r0, int64_t* r1) {
  uint64_t s = share.rows.load(std::memory_order_relaxed);
  while (true) {
    const int64_t front = front_of(s), back = back_of(s);
    if (front >= back) return false;
    const int64_t start = std::max(front, (back - claim + align - 1) / align * align);
    const int64_t begin = start < back ? start : std::max(front, back - align);
    if (share.rows.compare_exchange_weak(s, pack(front, begin), std::memory_order_relaxed)) {
      *r0 = begin;
      *r1 = back;
      return true;
    }
  }
}

}  // namespace shares

// run(r0, r1) for disjoint ranges covering rows 0..total, each range a multiple of `align`
// rows from row 0 on (but the last), on torch's intra-op threads as said above; `claim`: the
// fewest rows a claim takes (a multiple of `align`). `grain`: below this many rows, one
// thread does all.
template <typename F>
void share_rows(int64_t total, int64_t claim, int64_t align, int64_t grain, const F& run) {
  const int64_t threads = at::get_num_threads();
  if (!balanced_rows.load(std::memory_order_relaxed) || threads <= 1 || total <= grain ||
      at::in_parallel_region() || total >= (int64_t{1} << 31)) {
    at::parallel_for(0, total, grain, run);
    return;
  }
  const int64_t parts = std::min(threads, (total + grain - 1) / grain);
  std::unique_ptr<shares::Share[]> share(new shares::Share[parts]);
  for (int64_t t = 0; t < parts; ++t) {
    const int64_t front = total * t / parts / align * align;
    const int64_t back = t + 1 == parts ? total : total * (t + 1) / parts / align * align;
    share[t].rows.store(shares::pack(front, back), std::memory_order_relaxed);
  }
  // One task a thread (the pool may run fewer: then one thread runs several, in turn).
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    int64_t r0 = 0, r1 = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (shares::claim_front(share[t], claim, align, &r0, &r1)) run(r0, r1);
    }
    for (int64_t other = 1; other < parts; ++other) {
      shares::Share& victim = share[(t0 + other) % parts];
      while (shares::claim_back(victim, claim, align, &r0, &r1)) run(r0, r1);
    }
  });
}

}  // namespace tramontane
