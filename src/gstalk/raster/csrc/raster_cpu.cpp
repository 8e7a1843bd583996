// gstalk CPU tile rasterizer: projection (no-grad calls), tile binning, front-to-back
// compositing of 2D Gaussians and the hand-written backward (3DGS, Kerbl et al. 2023,
// Eq. 2-3).
//
// Plain C++17 + OpenMP, no torch headers: the Python side (gstalk/raster/composite_cpu.py,
// binning_cpu.py, projection_cpu.py) passes raw pointers to contiguous float32/int32/int64
// buffers through ctypes.
//
// Conventions (shared with gstalk/raster/composite_torch.py, the readable reference):
//   * Gaussian g = b*N + n of camera b; pixel (x, y) has its centre at (x + 0.5, y + 0.5).
//   * conic (a, b, c) is the inverse 2D covariance [[a, b], [b, c]];
//     power = -0.5 (a dx^2 + c dy^2) - b dx dy with d = pixel centre - mean.
//   * alpha = min(alpha_max, o * exp(power)); skipped when power > 0 or alpha < alpha_min.
//   * a pixel stops before the Gaussian whose composite would bring T below t_min.
//   * colour is composited over black; the caller adds T * background.
//
// Speed: a tile's pixels are laid out in rows of `stride` (tile size rounded up to 8) and
// processed in chunks of 8 pixels (one AVX2 register via GCC vector extensions; no
// branches, no masked stores). Each tile copies its Gaussians, 64 at a time, into a small
// struct of arrays. For every Gaussian only the chunks inside the bounding box of the
// ellipse where alpha can reach alpha_min are visited (bound slightly enlarged so that
// rounding never drops a pixel), chunks whose pixels have all stopped are skipped, and a
// tile ends as soon as all its pixels stopped. exp() is a vectorised polynomial.
//
// Determinism: every tile is processed by exactly one thread (dynamic schedule: a thread
// that the OS preempts does not hold the others back; which thread runs a tile does not
// change its result), partial sums are reduced in a fixed order, the backward writes one
// gradient record per intersection (an intersection belongs to one tile: no races) and a
// final serial pass adds the records into per-Gaussian gradients in intersection order.
// The library is built with -ffp-contract=off (fused multiply-adds only where written),
// so the backward recomputes exactly the alphas of the forward. Results are bit-identical
// whatever the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int VW = 8;      // pixels per SIMD chunk (one AVX2 register of floats)
constexpr int BLOCK = 64;  // Gaussians copied to the tile's struct of arrays at a time
// Ellipse bound slack: pixels where alpha >= alpha_min * exp(-kSlack) are visited, so that
// rounding can never drop a pixel the exact test would keep.
constexpr float kSlack = 0.05f;

// Portable SIMD through GCC/Clang vector extensions: 8 lanes, compiled to AVX2 here and to
// pairs of SSE/NEON registers elsewhere. Whole-vector loads/stores and `?:` blends keep the
// hot loops branch-free and free of (slow) masked stores.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline v8i splat_i(int32_t x) { return v8i{x, x, x, x, x, x, x, x}; }
inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
inline v8i load8i(const int32_t* p) { v8i v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline void store8i(int32_t* p, v8i v) { std::memcpy(p, &v, sizeof(v)); }
inline v8f vmin(v8f a, v8f b) { return a < b ? a : b; }
inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// a * b + c. The library is compiled with -ffp-contract=off so that the forward and the
// backward (which recomputes alpha and must take exactly the same decisions) round
// identically; fused multiply-adds are requested explicitly here instead.
inline v8f fmadd(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
    return reinterpret_cast<v8f>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                 reinterpret_cast<__m256>(c)));
#else
    return a * b + c;
#endif
}

// exp(x) per lane, no libm call: 2^n * p(r), r = x - n ln2 (|r| <= ln2/2), p = degree-7
// Taylor polynomial (relative error ~1e-7). Inputs are clamped to [-87, 88].
inline v8f exp8(v8f x) {
    x = vmin(vmax(x, splat(-87.0f)), splat(88.0f));
    const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const v8f n = fmadd(x, splat(1.4426950408889634f), magic) - magic;
    v8f r = fmadd(n, splat(-0.693145751953125f), x);
    r = fmadd(n, splat(-1.4286068203094172e-06f), r);
    v8f p = splat(1.0f / 5040.0f);
    p = fmadd(p, r, splat(1.0f / 720.0f));
    p = fmadd(p, r, splat(1.0f / 120.0f));
    p = fmadd(p, r, splat(1.0f / 24.0f));
    p = fmadd(p, r, splat(1.0f / 6.0f));
    p = fmadd(p, r, splat(0.5f));
    p = fmadd(p, r, splat(1.0f));
    p = fmadd(p, r, splat(1.0f));
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8f)e;  // vector cast: reinterpret the bits
}

// Exponent of the 2D Gaussian, -0.5 (a dx^2 + c dy^2) - b dx dy, given adx2 = a dx^2,
// cdy2 = c dy^2 and bdy = b dy. Shared by the forward and the backward.
inline v8f power8(v8f dx, v8f adx2, float cdy2, float bdy) {
    return fmadd(splat(-bdy), dx, (adx2 + cdy2) * -0.5f);
}

// Number of lanes set in a comparison mask (lanes are -1 or 0).
#if defined(__AVX__)
inline int count_set(v8i m) { return __builtin_popcount(_mm256_movemask_ps(reinterpret_cast<__m256>(m))); }
#else
inline int count_set(v8i m) {
    int s = 0;
    for (int l = 0; l < VW; ++l) s += m[l] != 0;
    return s;
}
#endif

// 64-byte aligned scratch buffer.
template <typename T>
class AlignedBuf {
  public:
    AlignedBuf() = default;
    AlignedBuf(const AlignedBuf&) = delete;
    AlignedBuf& operator=(const AlignedBuf&) = delete;
    ~AlignedBuf() { std::free(ptr_); }
    void resize(size_t n) {
        std::free(ptr_);
        const size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
        ptr_ = static_cast<T*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    }
    T* data() { return ptr_; }

  private:
    T* ptr_ = nullptr;
};

struct Geometry {
    int n_images, width, height, ts, tiles_x, tiles_y, n_per_image, channels, colors_shared;
    float alpha_min, alpha_max, t_min;
    int stride, nch;  // row stride of tile buffers (multiple of VW), chunks per row
};

Geometry make_geometry(int n_images, int width, int height, int ts, int tiles_x, int tiles_y, int n_per_image,
                       int channels, int colors_shared, float amin, float amax, float tmin) {
    const int stride = ((ts + VW - 1) / VW) * VW;
    return Geometry{n_images, width, height, ts, tiles_x, tiles_y, n_per_image, channels, colors_shared,
                    amin, amax, tmin, stride, stride / VW};
}

inline int clamp_int(float v, int lo, int hi) {
    v = std::min(std::max(v, static_cast<float>(lo) - 1.0f), static_cast<float>(hi) + 1.0f);
    return std::min(std::max(static_cast<int>(v), lo), hi);
}

// Per-Gaussian footprint bound, computed once per call (not per intersection): alpha can
// only reach alpha_min where -power <= L = ln(o / alpha_min), an ellipse whose bounding box
// has half-extents ex = sqrt(2 L' Sxx), ey = sqrt(2 L' Syy) (S = conic^-1, L' = L + slack).
// ey = kNever: o < alpha_min, never visible; ey = kWholeTile: no usable bound.
constexpr float kNever = -2.0f, kWholeTile = -1.0f;

struct Footprints {
    std::vector<float> ex, ey;
};

// Called inside a parallel region (work-shared loop); F must already have size G.
void compute_footprints(const Geometry& g, int64_t G, const float* conics, const float* opac, Footprints& F) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < G; ++i) {
        const float a = conics[3 * i], b = conics[3 * i + 1], c = conics[3 * i + 2], o = opac[i];
        const float det = a * c - b * b;
        if (!(o >= g.alpha_min)) {  // alpha <= o < alpha_min everywhere
            F.ex[i] = 0.0f; F.ey[i] = kNever;
        } else if (g.alpha_min > 0.0f && det > 0.0f && a > 0.0f && c > 0.0f) {
            const float two_l = 2.0f * (std::log(o / g.alpha_min) + kSlack);
            F.ex[i] = std::sqrt(two_l * c / det);  // Sigma_xx = c / det
            F.ey[i] = std::sqrt(two_l * a / det);  // Sigma_yy = a / det
        } else {
            F.ex[i] = 0.0f; F.ey[i] = kWholeTile;
        }
    }
}

// Up to BLOCK Gaussians of one tile as a struct of arrays, with the tile-local rows
// [y0, y1) and 8-pixel chunks [c0, c1) covering their footprint.
struct Block {
    float mx[BLOCK], my[BLOCK], a[BLOCK], b[BLOCK], c[BLOCK], o[BLOCK];
    int32_t y0[BLOCK], y1[BLOCK], c0[BLOCK], c1[BLOCK];
    std::vector<float> col;  // [BLOCK][C]
};

struct TileCtx {
    int img, px0, py0;
    float ox, oy;  // pixel origin of the tile
};

TileCtx tile_ctx(const Geometry& g, int tile) {
    const int n_tiles = g.tiles_x * g.tiles_y;
    const int t_img = tile % n_tiles;
    TileCtx t;
    t.img = tile / n_tiles;
    t.px0 = (t_img % g.tiles_x) * g.ts;
    t.py0 = (t_img / g.tiles_x) * g.ts;
    t.ox = static_cast<float>(t.px0);
    t.oy = static_cast<float>(t.py0);
    return t;
}

// Copy intersections [first, first + n) of a tile into the block, with their footprint.
void load_block(const Geometry& g, const TileCtx& tc, int64_t first, int n, const int32_t* ids,
                const float* means2d, const float* conics, const float* opac, const float* colors,
                const Footprints& F, Block& B) {
    const int C = g.channels;
    if (static_cast<int>(B.col.size()) < BLOCK * C) B.col.resize(static_cast<size_t>(BLOCK) * C);
    for (int k = 0; k < n; ++k) {
        const int32_t gid = ids[first + k];
        const float my = means2d[2 * gid + 1];
        B.mx[k] = means2d[2 * gid]; B.my[k] = my;
        B.a[k] = conics[3 * gid]; B.b[k] = conics[3 * gid + 1]; B.c[k] = conics[3 * gid + 2];
        B.o[k] = opac[gid];
        const int64_t cg = g.colors_shared ? (gid % g.n_per_image) : gid;
        for (int ch = 0; ch < C; ++ch) B.col[static_cast<size_t>(k) * C + ch] = colors[cg * C + ch];
        const float ey = F.ey[gid], ex = F.ex[gid];
        if (ey == kNever) {
            B.y0[k] = 0; B.y1[k] = 0; B.c0[k] = 0; B.c1[k] = 0;
        } else if (ey == kWholeTile) {
            B.y0[k] = 0; B.y1[k] = g.ts; B.c0[k] = 0; B.c1[k] = g.nch;
        } else {
            // rows/columns whose pixel centres lie inside the ellipse's bounding box
            B.y0[k] = clamp_int(std::ceil(my - ey - tc.oy - 0.5f), 0, g.ts);
            B.y1[k] = clamp_int(std::floor(my + ey - tc.oy - 0.5f) + 1.0f, 0, g.ts);
            const float mx = B.mx[k];
            const int x0 = clamp_int(std::ceil(mx - ex - tc.ox - 0.5f), 0, g.ts);
            const int x1 = clamp_int(std::floor(mx + ex - tc.ox - 0.5f), -1, g.ts - 1);
            if (x1 < x0) { B.y1[k] = B.y0[k]; B.c0[k] = B.c1[k] = 0; }
            else { B.c0[k] = x0 / VW; B.c1[k] = x1 / VW + 1; }
        }
    }
}

struct FwdScratch {
    AlignedBuf<float> T, alive, acc, pxs;
    AlignedBuf<int32_t> last, chunk_alive;
    Block blk;
};

void forward_tile(const Geometry& g, int tile, const int64_t* offsets, const int32_t* ids, const float* means2d,
                  const float* conics, const float* opac, const float* colors, const Footprints& F,
                  float* out_color, float* out_T, int32_t* out_last, FwdScratch& S) {
    const int ts = g.ts, stride = g.stride, nch = g.nch, C = g.channels;
    const int PS = ts * stride;
    const TileCtx tc = tile_ctx(g, tile);
    float* T = S.T.data();
    float* alive = S.alive.data();
    float* acc = S.acc.data();
    float* pxs = S.pxs.data();
    int32_t* last = S.last.data();
    int32_t* chunk_alive = S.chunk_alive.data();
    for (int i = 0; i < stride; ++i) pxs[i] = tc.ox + static_cast<float>(i) + 0.5f;
    int n_alive = 0;
    for (int iy = 0; iy < ts; ++iy) {
        for (int ci = 0; ci < nch; ++ci) chunk_alive[iy * nch + ci] = 0;
        for (int ix = 0; ix < stride; ++ix) {
            const int p = iy * stride + ix;
            const bool in = ix < ts && (tc.px0 + ix < g.width) && (tc.py0 + iy < g.height);
            T[p] = 1.0f; last[p] = -1;
            alive[p] = in ? 1.0f : 0.0f;
            chunk_alive[iy * nch + ix / VW] += in ? 1 : 0;
            n_alive += in ? 1 : 0;
        }
    }
    std::fill(acc, acc + static_cast<size_t>(C) * PS, 0.0f);

    const int64_t s = offsets[tile], e = offsets[tile + 1];
    const v8f vamin = splat(g.alpha_min), vamax = splat(g.alpha_max), vtmin = splat(g.t_min);
    const v8f zero = splat(0.0f), one = splat(1.0f);
    Block& B = S.blk;
    for (int64_t k0 = s; k0 < e && n_alive > 0; k0 += BLOCK) {
        const int nb = static_cast<int>(std::min<int64_t>(BLOCK, e - k0));
        load_block(g, tc, k0, nb, ids, means2d, conics, opac, colors, F, B);
        for (int k = 0; k < nb && n_alive > 0; ++k) {
            if (B.y0[k] >= B.y1[k]) continue;
            const float mx = B.mx[k], my = B.my[k], a = B.a[k], b = B.b[k], c = B.c[k], o = B.o[k];
            const float* colk = B.col.data() + static_cast<size_t>(k) * C;
            const v8i vj = splat_i(static_cast<int32_t>(k0 + k));
            const int c0 = B.c0[k], c1 = B.c1[k];
            for (int ci = c0; ci < c1; ++ci) {  // columns outside: the long row loop is inside
                const v8f dx = load8(pxs + ci * VW) - mx;
                const v8f adx2 = a * dx * dx;
                for (int iy = B.y0[k]; iy < B.y1[k]; ++iy) {
                    const float dy = (tc.oy + static_cast<float>(iy) + 0.5f) - my;
                    const float cdy = c * dy * dy, bdy = b * dy;
                    int32_t& ca = chunk_alive[iy * nch + ci];
                    if (ca == 0) continue;
                    const int base = iy * stride + ci * VW;
                    const v8f power = power8(dx, adx2, cdy, bdy);
                    const v8f alpha = vmin(vamax, o * exp8(power));
                    const v8f al = load8(alive + base);
                    const v8i ok = (power <= zero) & (alpha >= vamin) & (al > zero);
                    const v8f t = load8(T + base);
                    const v8f nt = t * (one - alpha);
                    const v8i stop = ok & (nt < vtmin);
                    const v8i comp = ok & ~stop;
                    const v8f w = comp ? alpha * t : zero;
                    store8(T + base, comp ? nt : t);
                    store8(alive + base, stop ? zero : al);
                    store8i(last + base, comp ? vj : load8i(last + base));
                    for (int ch = 0; ch < C; ++ch) {
                        float* A = acc + static_cast<size_t>(ch) * PS + base;
                        store8(A, load8(A) + w * colk[ch]);
                    }
                    const int n_stop = count_set(stop);
                    ca -= n_stop;
                    n_alive -= n_stop;
                }
            }
        }
    }

    const size_t HW = static_cast<size_t>(g.height) * g.width;
    for (int iy = 0; iy < ts && tc.py0 + iy < g.height; ++iy)
        for (int ix = 0; ix < ts && tc.px0 + ix < g.width; ++ix) {
            const int p = iy * stride + ix;
            const size_t pix = tc.img * HW + static_cast<size_t>(tc.py0 + iy) * g.width + (tc.px0 + ix);
            for (int ch = 0; ch < C; ++ch) out_color[pix * C + ch] = acc[static_cast<size_t>(ch) * PS + p];
            out_T[pix] = T[p];
            if (out_last) out_last[pix] = last[p];
        }
}

struct BwdScratch {
    AlignedBuf<float> T, R, G, gAT, pxs, lanes;
    AlignedBuf<int32_t> last, chunk_last;
    Block blk;
};

// Gradient record per intersection: d means2d (2), d conic (3), d opacity (1), d colour (C).
void backward_tile(const Geometry& g, int tile, const int64_t* offsets, const int32_t* ids, const float* means2d,
                   const float* conics, const float* opac, const float* colors, const Footprints& F,
                   const float* in_T, const int32_t* in_last, const float* grad_color, const float* grad_T,
                   float* rec, BwdScratch& S) {
    const int ts = g.ts, stride = g.stride, nch = g.nch, C = g.channels, RS = 6 + C;
    const int PS = ts * stride;
    const TileCtx tc = tile_ctx(g, tile);
    const int64_t s = offsets[tile], e = offsets[tile + 1];
    std::fill(rec + s * RS, rec + e * RS, 0.0f);
    if (e == s) return;

    float *T = S.T.data(), *R = S.R.data(), *G = S.G.data(), *gAT = S.gAT.data(), *pxs = S.pxs.data();
    float* lanes = S.lanes.data();  // [C][VW] per-lane partial sums of the colour gradients
    int32_t* last = S.last.data();
    int32_t* chunk_last = S.chunk_last.data();
    for (int i = 0; i < stride; ++i) pxs[i] = tc.ox + static_cast<float>(i) + 0.5f;
    const size_t HW = static_cast<size_t>(g.height) * g.width;
    int32_t jmax = -1;
    for (int iy = 0; iy < ts; ++iy) {
        for (int ci = 0; ci < nch; ++ci) chunk_last[iy * nch + ci] = -1;
        for (int ix = 0; ix < stride; ++ix) {
            const int p = iy * stride + ix;
            const bool in = ix < ts && (tc.px0 + ix < g.width) && (tc.py0 + iy < g.height);
            T[p] = 1.0f; last[p] = -1; gAT[p] = 0.0f;
            for (int ch = 0; ch < C; ++ch) {
                G[static_cast<size_t>(ch) * PS + p] = 0.0f;
                R[static_cast<size_t>(ch) * PS + p] = 0.0f;
            }
            if (!in) continue;
            const size_t pix = tc.img * HW + static_cast<size_t>(tc.py0 + iy) * g.width + (tc.px0 + ix);
            const float tf = in_T[pix];
            T[p] = tf;
            last[p] = in_last[pix];
            gAT[p] = -grad_T[pix] * tf;  // dL/dT_final * T_final; / (1 - alpha_i) gives its dL/dalpha_i term
            for (int ch = 0; ch < C; ++ch) G[static_cast<size_t>(ch) * PS + p] = grad_color[pix * C + ch];
            chunk_last[iy * nch + ix / VW] = std::max(chunk_last[iy * nch + ix / VW], last[p]);
            jmax = std::max(jmax, last[p]);
        }
    }
    if (jmax < s) return;

    const v8f vamin = splat(g.alpha_min), vamax = splat(g.alpha_max);
    const v8f zero = splat(0.0f), one = splat(1.0f);
    Block& B = S.blk;
    int64_t loaded = -1;  // first intersection of the loaded block
    for (int64_t j = jmax; j >= s; --j) {
        const int64_t k0 = s + ((j - s) / BLOCK) * BLOCK;
        if (k0 != loaded) {
            load_block(g, tc, k0, static_cast<int>(std::min<int64_t>(BLOCK, e - k0)), ids, means2d, conics, opac,
                       colors, F, B);
            loaded = k0;
        }
        const int k = static_cast<int>(j - k0);
        if (B.y0[k] >= B.y1[k]) continue;
        const float mx = B.mx[k], my = B.my[k], a = B.a[k], b = B.b[k], c = B.c[k], o = B.o[k];
        const float* colk = B.col.data() + static_cast<size_t>(k) * C;
        const int32_t j32 = static_cast<int32_t>(j);
        const v8i vj = splat_i(j32);
        const int c0 = B.c0[k], c1 = B.c1[k];
        v8f l_mx = zero, l_my = zero, l_a = zero, l_b = zero, l_c = zero, l_o = zero;
        std::fill(lanes, lanes + static_cast<size_t>(C) * VW, 0.0f);
        bool touched = false;
        for (int iy = B.y0[k]; iy < B.y1[k]; ++iy) {
            const float dy = (tc.oy + static_cast<float>(iy) + 0.5f) - my;
            const float cdy = c * dy * dy, bdy = b * dy;
            for (int ci = c0; ci < c1; ++ci) {
                if (j32 > chunk_last[iy * nch + ci]) continue;
                touched = true;
                const int base = iy * stride + ci * VW;
                // 1) was this Gaussian composited here? undo its transmittance factor
                const v8f dx = load8(pxs + ci * VW) - mx;
                const v8f power = power8(dx, a * dx * dx, cdy, bdy);
                const v8f gauss = exp8(power);
                const v8f raw = o * gauss;
                const v8f alpha = vmin(vamax, raw);
                const v8i ok = (power <= zero) & (alpha >= vamin) & (vj <= load8i(last + base));
                const v8f inv = one / (one - alpha);
                const v8f t_old = load8(T + base);
                const v8f t = ok ? t_old * inv : t_old;  // transmittance in front of this Gaussian
                store8(T + base, t);
                const v8f okf = ok ? one : zero;
                v8f dA = ok ? load8(gAT + base) * inv : zero;
                // 2) colour terms: dC/dalpha_i = T_i (c_i - R_i), dC/dc_i = alpha_i T_i
                for (int ch = 0; ch < C; ++ch) {
                    const float cv = colk[ch];
                    float* Rc = R + static_cast<size_t>(ch) * PS + base;
                    const v8f gc = load8(G + static_cast<size_t>(ch) * PS + base);
                    const v8f rc = load8(Rc);
                    dA = dA + okf * gc * (cv - rc) * t;
                    store8(Rc, ok ? alpha * cv + (one - alpha) * rc : rc);
                    float* lc = lanes + static_cast<size_t>(ch) * VW;
                    store8(lc, load8(lc) + okf * alpha * t * gc);
                }
                // 3) alpha = o * exp(power) -> opacity, mean, conic (no gradient if clamped)
                const v8f da = (ok & (raw <= vamax)) ? dA : zero;
                l_o = l_o + da * gauss;
                const v8f dp = da * alpha;
                l_mx = l_mx + dp * (a * dx + bdy);
                l_my = l_my + dp * (b * dx + c * dy);
                l_a = l_a + -0.5f * dp * dx * dx;
                l_b = l_b + -dp * dx * dy;
                l_c = l_c + -0.5f * dp * dy * dy;
            }
        }
        if (!touched) continue;
        float* out = rec + j * RS;
        const v8f geo[6] = {l_mx, l_my, l_a, l_b, l_c, l_o};
        for (int q = 0; q < 6; ++q) {
            float sum = 0.0f;
            for (int l = 0; l < VW; ++l) sum += geo[q][l];
            out[q] = sum;
        }
        for (int ch = 0; ch < C; ++ch) {
            float sum = 0.0f;
            for (int l = 0; l < VW; ++l) sum += lanes[ch * VW + l];
            out[6 + ch] = sum;
        }
    }
}

int clamp_threads(int n) { return n < 1 ? 1 : n; }

}  // namespace

extern "C" {

int gstalk_raster_version() { return 3; }

// Projection for calls that need no gradient (the autograd path is
// gstalk/raster/projection.py; same formulas, float32). Per camera b and Gaussian n:
// Sigma' = J W R S (J W R S)^T + eps2d I with the frustum-clamped Jacobian, conic = Sigma'^-1,
// means2d = (fx x/z + cx, fy y/z + cy), radius = ceil(3 sqrt(lambda_max)) or the opacity-aware
// radius, and the culling rules of project_gaussians().
int gstalk_raster_project(int n_images, int n_per_image, int width, int height, const float* means,
                          const float* quats, const float* scales, const float* opacities, const float* viewmats,
                          const float* Ks, float near_plane, float far_plane, float eps2d, int antialiased,
                          int radius_opacity, float alpha_min, float radius_clip, float* means2d, float* depths,
                          float* conics, float* opac_out, int32_t* radii, int n_threads) {
    const int64_t N = n_per_image;
    const int64_t total = static_cast<int64_t>(n_images) * N;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(n_threads))
    for (int64_t idx = 0; idx < total; ++idx) {
        const int64_t b = idx / N, n = idx % N;
        const float* V = viewmats + 16 * b;
        const float* K = Ks + 9 * b;
        const float* m = means + 3 * n;
        const float x = V[0] * m[0] + V[1] * m[1] + V[2] * m[2] + V[3];
        const float y = V[4] * m[0] + V[5] * m[1] + V[6] * m[2] + V[7];
        const float zr = V[8] * m[0] + V[9] * m[1] + V[10] * m[2] + V[11];
        depths[idx] = zr;
        radii[idx] = 0;
        means2d[2 * idx] = 0.0f; means2d[2 * idx + 1] = 0.0f;
        conics[3 * idx] = 1.0f; conics[3 * idx + 1] = 0.0f; conics[3 * idx + 2] = 1.0f;
        opac_out[idx] = opacities[n];
        if (!(zr >= near_plane && zr <= far_plane)) continue;
        const float fx = K[0], fy = K[4], cx = K[2], cy = K[5];
        const float inv_z = 1.0f / zr;
        const float tan_x = 0.5f * width / fx, tan_y = 0.5f * height / fy;
        const float ux = std::min(std::max(x * inv_z, -(cx / fx + 0.3f * tan_x)), (width - cx) / fx + 0.3f * tan_x);
        const float uy = std::min(std::max(y * inv_z, -(cy / fy + 0.3f * tan_y)), (height - cy) / fy + 0.3f * tan_y);
        // rotation of the normalised quaternion
        const float* q4 = quats + 4 * n;
        const float qn = std::max(std::sqrt(q4[0] * q4[0] + q4[1] * q4[1] + q4[2] * q4[2] + q4[3] * q4[3]), 1e-12f);
        const float w = q4[0] / qn, qx = q4[1] / qn, qy = q4[2] / qn, qz = q4[3] / qn;
        const float R[9] = {1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - w * qz), 2 * (qx * qz + w * qy),
                            2 * (qx * qy + w * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - w * qx),
                            2 * (qx * qz - w * qy), 2 * (qy * qz + w * qx), 1 - 2 * (qx * qx + qy * qy)};
        const float* sc = scales + 3 * n;
        // M = J W R S (2x3)
        float m0[3], m1[3];
        for (int k = 0; k < 3; ++k) {
            const float r0 = (V[0] * R[k] + V[1] * R[3 + k] + V[2] * R[6 + k]) * sc[k];
            const float r1 = (V[4] * R[k] + V[5] * R[3 + k] + V[6] * R[6 + k]) * sc[k];
            const float r2 = (V[8] * R[k] + V[9] * R[3 + k] + V[10] * R[6 + k]) * sc[k];
            m0[k] = fx * inv_z * (r0 - ux * r2);
            m1[k] = fy * inv_z * (r1 - uy * r2);
        }
        float c00 = m0[0] * m0[0] + m0[1] * m0[1] + m0[2] * m0[2];
        const float c01 = m0[0] * m1[0] + m0[1] * m1[1] + m0[2] * m1[2];
        float c11 = m1[0] * m1[0] + m1[1] * m1[1] + m1[2] * m1[2];
        const float det_raw = c00 * c11 - c01 * c01;
        c00 += eps2d;
        c11 += eps2d;
        const float det = c00 * c11 - c01 * c01;
        if (!(det > 0.0f)) continue;
        const float inv_det = 1.0f / det;
        float o = opacities[n];
        if (antialiased) o *= std::sqrt(std::max(det_raw / det, 0.0f));
        const float mx = fx * x * inv_z + cx, my = fy * y * inv_z + cy;
        const float mid = 0.5f * (c00 + c11);
        const float lam = mid + std::sqrt(std::max(mid * mid - det, 0.0f));
        float r;
        if (radius_opacity) r = std::ceil(std::sqrt(2.0f * lam * std::log(std::max(o / alpha_min, 1.0f))));
        else r = std::ceil(3.0f * std::sqrt(lam));
        if (!(r > 0.0f) || !(r > radius_clip)) continue;
        r = std::min(r, 1073741824.0f);
        if (!(mx + r > 0.0f && mx - r < width && my + r > 0.0f && my - r < height)) continue;
        means2d[2 * idx] = mx; means2d[2 * idx + 1] = my;
        conics[3 * idx] = c11 * inv_det; conics[3 * idx + 1] = -c01 * inv_det; conics[3 * idx + 2] = c00 * inv_det;
        opac_out[idx] = o;
        radii[idx] = static_cast<int32_t>(r);
    }
    return 0;
}

// Tile binning, pass 1. For G = n_images * n_per_image Gaussians: tiles_touched[g] and the
// per-tile counts, written as the exclusive prefix sum tile_offsets[0..n_tiles] (int64).
// Tile rectangles: floor((x - r)/ts) <= tx < ceil((x + r)/ts), clamped; r = radii[g] (0 =
// culled). Same float32 arithmetic as gstalk/raster/binning.py:tile_rects.
int gstalk_raster_bin_count(int n_images, int n_per_image, int tile_size, int tiles_x, int tiles_y,
                            const float* means2d, const int32_t* radii, int32_t* tiles_touched,
                            int64_t* tile_offsets) {
    const int64_t G = static_cast<int64_t>(n_images) * n_per_image;
    const int64_t n_tiles = static_cast<int64_t>(tiles_x) * tiles_y;
    std::fill(tile_offsets, tile_offsets + n_images * n_tiles + 1, 0);
    int64_t* counts = tile_offsets + 1;
    const float ts = static_cast<float>(tile_size);
    for (int64_t gi = 0; gi < G; ++gi) {
        tiles_touched[gi] = 0;
        if (radii[gi] <= 0) continue;
        const float r = static_cast<float>(radii[gi]);
        const float mx = means2d[2 * gi], my = means2d[2 * gi + 1];
        const int x0 = clamp_int(std::floor((mx - r) / ts), 0, tiles_x);
        const int x1 = clamp_int(std::ceil((mx + r) / ts), 0, tiles_x);
        const int y0 = clamp_int(std::floor((my - r) / ts), 0, tiles_y);
        const int y1 = clamp_int(std::ceil((my + r) / ts), 0, tiles_y);
        if (x1 <= x0 || y1 <= y0) continue;
        tiles_touched[gi] = (x1 - x0) * (y1 - y0);
        const int64_t base = (gi / n_per_image) * n_tiles;
        for (int ty = y0; ty < y1; ++ty)
            for (int tx = x0; tx < x1; ++tx) counts[base + ty * tiles_x + tx] += 1;
    }
    for (int64_t t = 0; t < n_images * n_tiles; ++t) counts[t] += tile_offsets[t];
    return 0;
}

// Tile binning, pass 2: fill flatten_ids [M] so that each tile's list is sorted front to
// back. The visible Gaussians of each camera are ordered by depth with a stable LSD radix
// sort of the float bit patterns (positive floats sort like their bits; ties keep the
// lower index first), then appended to every tile they touch.
int gstalk_raster_bin_fill(int n_images, int n_per_image, int tile_size, int tiles_x, int tiles_y,
                           const float* means2d, const int32_t* radii, const float* depths,
                           const int64_t* tile_offsets, int32_t* flatten_ids) {
    const int64_t n_tiles = static_cast<int64_t>(tiles_x) * tiles_y;
    std::vector<int64_t> cursor(tile_offsets, tile_offsets + n_images * n_tiles);
    const float ts = static_cast<float>(tile_size);
    std::vector<uint32_t> keys, keys_tmp;
    std::vector<int32_t> order, order_tmp;
    for (int b = 0; b < n_images; ++b) {
        const int64_t first = static_cast<int64_t>(b) * n_per_image;
        keys.clear(); order.clear();
        for (int64_t n = 0; n < n_per_image; ++n) {
            if (radii[first + n] <= 0) continue;
            uint32_t bits;
            const float d = std::max(depths[first + n], 0.0f);
            std::memcpy(&bits, &d, sizeof(bits));
            keys.push_back(bits);
            order.push_back(static_cast<int32_t>(first + n));
        }
        const size_t m = keys.size();
        keys_tmp.resize(m); order_tmp.resize(m);
        for (int shift = 0; shift < 32; shift += 8) {  // stable counting sort per byte
            size_t count[257] = {0};
            for (size_t i = 0; i < m; ++i) ++count[((keys[i] >> shift) & 0xFF) + 1];
            if (count[((keys.empty() ? 0 : keys[0]) >> shift & 0xFF) + 1] == m) continue;  // all equal
            for (int v = 0; v < 256; ++v) count[v + 1] += count[v];
            for (size_t i = 0; i < m; ++i) {
                const size_t dst = count[(keys[i] >> shift) & 0xFF]++;
                keys_tmp[dst] = keys[i];
                order_tmp[dst] = order[i];
            }
            keys.swap(keys_tmp);
            order.swap(order_tmp);
        }
        for (size_t q = 0; q < m; ++q) {
            const int64_t gi = order[q];
            const float r = static_cast<float>(radii[gi]);
            const float mx = means2d[2 * gi], my = means2d[2 * gi + 1];
            const int x0 = clamp_int(std::floor((mx - r) / ts), 0, tiles_x);
            const int x1 = clamp_int(std::ceil((mx + r) / ts), 0, tiles_x);
            const int y0 = clamp_int(std::floor((my - r) / ts), 0, tiles_y);
            const int y1 = clamp_int(std::ceil((my + r) / ts), 0, tiles_y);
            const int64_t base = static_cast<int64_t>(b) * n_tiles;
            for (int ty = y0; ty < y1; ++ty)
                for (int tx = x0; tx < x1; ++tx)
                    flatten_ids[cursor[base + ty * tiles_x + tx]++] = static_cast<int32_t>(gi);
        }
    }
    return 0;
}

// Forward. Outputs: out_color [B,H,W,C] (over black), out_T [B,H,W] final transmittance,
// out_last [B,H,W] int32 index of the last composited intersection (-1: none), may be null.
int gstalk_raster_forward(int n_images, int width, int height, int tile_size, int tiles_x, int tiles_y,
                          int n_per_image, int channels, int colors_shared, const float* means2d,
                          const float* conics, const float* opacities, const float* colors,
                          const int64_t* tile_offsets, const int32_t* flatten_ids, float alpha_min,
                          float alpha_max, float t_min, float* out_color, float* out_T, int32_t* out_last,
                          int n_threads) {
    const Geometry g = make_geometry(n_images, width, height, tile_size, tiles_x, tiles_y, n_per_image, channels,
                                     colors_shared, alpha_min, alpha_max, t_min);
    const int n_tiles = n_images * tiles_x * tiles_y;
    const int PS = g.ts * g.stride;
    const int64_t G = static_cast<int64_t>(n_images) * n_per_image;
    Footprints F;
    F.ex.resize(G); F.ey.resize(G);
#pragma omp parallel num_threads(clamp_threads(n_threads))
    {
        FwdScratch S;
        S.T.resize(PS); S.alive.resize(PS); S.last.resize(PS);
        S.acc.resize(static_cast<size_t>(PS) * channels);
        S.pxs.resize(g.stride);
        S.chunk_alive.resize(static_cast<size_t>(g.ts) * g.nch);
        compute_footprints(g, G, conics, opacities, F);  // omp for (implicit barrier)
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < n_tiles; ++t)
            forward_tile(g, t, tile_offsets, flatten_ids, means2d, conics, opacities, colors, F, out_color, out_T,
                         out_last, S);
    }
    return 0;
}

// Backward. grad_* outputs must be zero-initialised by the caller: grad_means2d [G,2],
// grad_conics [G,3], grad_opacities [G], grad_colors [N or G, C]; records is scratch
// [M, 6 + C].
int gstalk_raster_backward(int n_images, int width, int height, int tile_size, int tiles_x, int tiles_y,
                           int n_per_image, int channels, int colors_shared, const float* means2d,
                           const float* conics, const float* opacities, const float* colors,
                           const int64_t* tile_offsets, const int32_t* flatten_ids, float alpha_min,
                           float alpha_max, float t_min, const float* in_T, const int32_t* in_last,
                           const float* grad_color, const float* grad_T, float* records, float* grad_means2d,
                           float* grad_conics, float* grad_opacities, float* grad_colors, int n_threads) {
    const Geometry g = make_geometry(n_images, width, height, tile_size, tiles_x, tiles_y, n_per_image, channels,
                                     colors_shared, alpha_min, alpha_max, t_min);
    const int n_tiles = n_images * tiles_x * tiles_y;
    const int PS = g.ts * g.stride;
    const int C = channels, RS = 6 + C;
    const int64_t G = static_cast<int64_t>(n_images) * n_per_image;
    Footprints F;
    F.ex.resize(G); F.ey.resize(G);
#pragma omp parallel num_threads(clamp_threads(n_threads))
    {
        BwdScratch S;
        S.T.resize(PS); S.gAT.resize(PS); S.last.resize(PS);
        S.R.resize(static_cast<size_t>(PS) * C);
        S.G.resize(static_cast<size_t>(PS) * C);
        S.pxs.resize(g.stride);
        S.lanes.resize(static_cast<size_t>(C) * VW);
        S.chunk_last.resize(static_cast<size_t>(g.ts) * g.nch);
        compute_footprints(g, G, conics, opacities, F);  // omp for (implicit barrier)
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < n_tiles; ++t)
            backward_tile(g, t, tile_offsets, flatten_ids, means2d, conics, opacities, colors, F, in_T, in_last,
                          grad_color, grad_T, records, S);
    }
    // Serial, fixed-order reduction: deterministic whatever the number of threads.
    const int64_t M = tile_offsets[n_tiles];
    for (int64_t j = 0; j < M; ++j) {
        const int32_t gid = flatten_ids[j];
        const float* r = records + j * RS;
        grad_means2d[2 * gid] += r[0];
        grad_means2d[2 * gid + 1] += r[1];
        grad_conics[3 * gid] += r[2];
        grad_conics[3 * gid + 1] += r[3];
        grad_conics[3 * gid + 2] += r[4];
        grad_opacities[gid] += r[5];
        const int64_t cg = colors_shared ? (gid % n_per_image) : gid;
        for (int ch = 0; ch < C; ++ch) grad_colors[cg * C + ch] += r[6 + ch];
    }
    return 0;
}

}  // extern "C"
