// Multi-resolution hash-grid encoding (Instant-NGP, Mueller et al. 2022, Sec. 3) for the CPU.
//
// Plain C++17 + OpenMP, no torch headers: gstalk/deform/hashgrid.py calls these through ctypes
// with pointers to contiguous float32/int tensors. The forward pass is parallel over points;
// the backward pass is parallel over levels, and each level owns a disjoint block of the table,
// so gradients are accumulated without races and in a fixed order (deterministic).
#include <cmath>
#include <cstdint>
#include <omp.h>

namespace {

constexpr uint32_t kPrimes[3] = {1u, 2654435761u, 805459861u};

struct Level {
  int32_t res;
  int64_t offset;
  bool dense;
};

// Table rows and weights of the 2^dim corners of the cell around x at one level.
inline int corners(const float* x, int dim, const Level& lv, int64_t table_size, int64_t* rows, float* weights) {
  int32_t base[3];
  float frac[3];
  for (int k = 0; k < dim; ++k) {
    float v = x[k] < 0.f ? 0.f : (x[k] > 1.f ? 1.f : x[k]);
    float pos = v * (float)lv.res;
    float fl = std::floor(pos);
    if (fl > (float)(lv.res - 1)) fl = (float)(lv.res - 1);
    base[k] = (int32_t)fl;
    frac[k] = pos - fl;
  }
  const int n = 1 << dim;
  for (int c = 0; c < n; ++c) {
    float w = 1.f;
    int64_t idx;
    if (lv.dense) {
      idx = 0;
      int64_t stride = 1;
      for (int k = 0; k < dim; ++k) {
        const int bit = (c >> k) & 1;
        idx += (int64_t)(base[k] + bit) * stride;
        stride *= (int64_t)(lv.res + 1);
        w *= bit ? frac[k] : 1.f - frac[k];
      }
    } else {
      uint32_t h = 0;
      for (int k = 0; k < dim; ++k) {
        const int bit = (c >> k) & 1;
        h ^= (uint32_t)(base[k] + bit) * kPrimes[k];
        w *= bit ? frac[k] : 1.f - frac[k];
      }
      idx = (int64_t)(h & (uint32_t)(table_size - 1));
    }
    rows[c] = lv.offset + idx;
    weights[c] = w;
  }
  return n;
}

}  // namespace

extern "C" {

int gstalk_hashgrid_version() { return 1; }

// x [P, dim], table [rows, F], out [P, L*F] (overwritten).
int gstalk_hashgrid_forward(const float* x, int64_t P, int dim, int L, int F, const int32_t* res,
                            const int64_t* offsets, const uint8_t* dense, int64_t table_size,
                            const float* table, float* out, int nthreads) {
  if (dim < 1 || dim > 3) return 1;
  if (nthreads > 0) omp_set_num_threads(nthreads);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    int64_t rows[8];
    float w[8];
    float* o = out + p * (int64_t)L * F;
    for (int l = 0; l < L; ++l) {
      const Level lv{res[l], offsets[l], dense[l] != 0};
      const int n = corners(x + p * dim, dim, lv, table_size, rows, w);
      for (int f = 0; f < F; ++f) o[l * F + f] = 0.f;
      for (int c = 0; c < n; ++c) {
        const float* t = table + rows[c] * F;
        for (int f = 0; f < F; ++f) o[l * F + f] += w[c] * t[f];
      }
    }
  }
  return 0;
}

// grad_out [P, L*F] -> grad_table [rows, F] (accumulated into; caller zeroes it).
int gstalk_hashgrid_backward(const float* x, int64_t P, int dim, int L, int F, const int32_t* res,
                             const int64_t* offsets, const uint8_t* dense, int64_t table_size,
                             const float* grad_out, float* grad_table, int nthreads) {
  if (dim < 1 || dim > 3) return 1;
  if (nthreads > 0) omp_set_num_threads(nthreads);
#pragma omp parallel for schedule(static)
  for (int l = 0; l < L; ++l) {
    const Level lv{res[l], offsets[l], dense[l] != 0};
    int64_t rows[8];
    float w[8];
    for (int64_t p = 0; p < P; ++p) {
      const int n = corners(x + p * dim, dim, lv, table_size, rows, w);
      const float* g = grad_out + p * (int64_t)L * F + l * F;
      for (int c = 0; c < n; ++c) {
        float* t = grad_table + rows[c] * F;
        for (int f = 0; f < F; ++f) t[f] += w[c] * g[f];
      }
    }
  }
  return 0;
}

}  // extern "C"
