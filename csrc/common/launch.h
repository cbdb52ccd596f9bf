// Launch configurations of the CUDA kernels as plain host functions, so their limits can be
// checked without a GPU (neurosens._C.launch_config exposes them to the tests).
//
// Grid dims y and z hold at most 65535 blocks and x at most 2^31 - 1; every kernel loops
// (grid-stride) over whatever its grid does not cover, so any N, C and D get a valid launch.
#pragma once

#include <algorithm>
#include <cstdint>

namespace neurosens {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

struct Launch {
  int64_t grid[3];  // x, y, z
  int threads;      // per block
  int64_t segs;     // segments each map is cut into (statistics kernels)
};

// Segments per map so that about `target` workers are busy, each with at least `min_len` elements.
inline int64_t choose_segments(int64_t workers, int64_t D, int64_t target, int64_t min_len) {
  const int64_t want = (target + workers - 1) / workers;
  const int64_t most = std::max<int64_t>(1, D / min_len);
  return std::max<int64_t>(1, std::min<int64_t>({want, most, kMaxGridYZ}));
}

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Statistics and the backward by columns, a thread per (sample, neuron, segment), or per pair of
// neurons when the caller passes C / 2: neurons along x so that loads coalesce
// when neurons are adjacent in memory, samples along y (looped over beyond 65535), segments on z.
inline Launch stats_columns_launch(int64_t N, int64_t C, int64_t D, int64_t sms) {
  Launch l;
  l.threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(C, kWarp) * kWarp));
  l.segs = choose_segments(N * C, D, sms * 2048, 8);
  l.grid[0] = ceil_div(C, l.threads);
  l.grid[1] = std::min<int64_t>(N, kMaxGridYZ);
  l.grid[2] = l.segs;
  return l;
}

// Statistics and the flat-row backward, a warp per (sample, neuron, segment): maps along x
// (looped over beyond the grid), segments on y.
inline Launch stats_rows_launch(int64_t N, int64_t C, int64_t D, int64_t sms) {
  Launch l;
  l.threads = kThreads;
  l.segs = choose_segments(N * C, D, sms * 64, 4 * kWarp);
  l.grid[0] = std::min<int64_t>(ceil_div(N * C, kThreads / kWarp), kMaxGridX);
  l.grid[1] = l.segs;
  l.grid[2] = 1;
  return l;
}

// Elementwise kernels over `total` items (grid-stride): a few waves of blocks per multiprocessor.
inline Launch elementwise_launch(int64_t total, int64_t sms) {
  Launch l;
  l.threads = kThreads;
  l.segs = 1;
  l.grid[0] = std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kThreads), sms * 32));
  l.grid[1] = 1;
  l.grid[2] = 1;
  return l;
}

}  // namespace neurosens
