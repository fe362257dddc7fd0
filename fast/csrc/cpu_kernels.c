/* Multi-threaded float32 CPU kernels for the layers where Paddle's own CPU
 * kernels are single-threaded or slow: depthwise convolution, the patch
 * embeddings' im2col, softmax, LayerNorm, BatchNorm in training, SiLU with its
 * bias, bias additions, residual additions, token/map transposes and bias
 * gradients (sums over rows or channels).
 *
 * Plain C with OpenMP, compiled at first use by fast/build.py once per
 * instruction set (gcc -O3 -march=x86-64-v4 or -march=x86-64-v3), called
 * through ctypes on the tensors' own memory. Every array is contiguous,
 * row-major float32; the Python side checks that. NaN and infinity propagate as
 * in the reference ops (no fast-math).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

static int g_threads = 1;

void cvt_set_threads(int threads) { g_threads = threads > 0 ? threads : 1; }

int cvt_get_threads(void) { return g_threads; }

/* Below this many floats of work a kernel runs on the calling thread: waking
 * the team costs more than it saves. */
#define PARALLEL_MIN_WORK 32768

static inline int threads_for(int64_t work) {
    return work < PARALLEL_MIN_WORK ? 1 : g_threads;
}

/* exp(x) to about 1 ulp, written so that gcc vectorises loops calling it
 * (glibc's expf is a scalar call). NaN stays NaN: the clamps compare, and a
 * comparison with NaN is false. */
static inline float exp_approx(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.72283f ? 88.72283f : x;
    const float n = rintf(x * 1.44269504088896341f);
    /* r = x - n ln2, with ln2 split in two for accuracy */
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    /* exp(r) on |r| <= ln2 / 2: Taylor series to degree 7 (error < 1e-8) */
    float p = 1.9841270e-04f;
    p = p * r + 1.3888889e-03f;
    p = p * r + 8.3333333e-03f;
    p = p * r + 4.1666667e-02f;
    p = p * r + 1.6666667e-01f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    /* 2^n by building the exponent bits; n + 127 stays in [1, 254] after the clamps,
     * except 2^128 at the top, which the split into two factors avoids */
    const int32_t ni = (int32_t)n;
    const int32_t half = ni >> 1;
    union { int32_t i; float f; } a, b;
    a.i = (half + 127) << 23;
    b.i = (ni - half + 127) << 23;
    return p * a.f * b.f;
}

/* ---- depthwise convolution --------------------------------------------------
 * x (B, C, H, W), weight (C, K*K), y (B, C, OH, OW); one filter per channel,
 * square kernel K, the same stride and zero padding on both axes.
 *
 * Two loop orders. Rows: the plane is zero-padded and each output row is a
 * vector loop over its columns; fastest where rows are wide. Grid, for narrow
 * maps (CvT's stage 3 is 14 or 7 wide) and for the gradients: the plane is
 * copied into a "phase" layout, the zero-padded plane (PH x PW) split into
 * stride x stride phases, phase (a, b) holding padded entries
 * (a + stride i, b + stride j) in rows of width PWS. Tap (kh, kw) of output
 * (oh, ow) then reads phase (kh % stride, kw % stride) at
 * (oh + kh / stride) * PWS + ow + kw / stride, a fixed offset from
 * oh * PWS + ow, so every tap is one contiguous loop over a "grid" of OH rows
 * of PWS columns, the first OW of which are outputs (the rest are computed and
 * dropped). */

/* Copy plane (H, W) into the middle of a zeroed (H + 2 pad, W + 2 pad) scratch plane,
 * so that the row loops run without bounds checks. */
static void pad_plane(const float *plane, float *padded, int64_t H, int64_t W, int64_t pad) {
    const int64_t PW = W + 2 * pad;
    memset(padded, 0, sizeof(float) * pad * PW);
    for (int64_t h = 0; h < H; ++h) {
        float *row = padded + (h + pad) * PW;
        for (int64_t i = 0; i < pad; ++i) row[i] = row[pad + W + i] = 0.0f;
        memcpy(row + pad, plane + h * W, sizeof(float) * W);
    }
    memset(padded + (H + pad) * PW, 0, sizeof(float) * pad * PW);
}

/* One output plane from a padded input plane, row by row. Inlined with K and stride
 * constant (3 and 1 or 2 in CvT), the taps unroll and the loop over ow vectorises. */
static inline __attribute__((always_inline)) void
dw_rows_forward(const float *padded, int64_t PW, const float *wp, float start, float *yp,
                int64_t OH, int64_t OW, int64_t K, int64_t stride) {
    for (int64_t oh = 0; oh < OH; ++oh) {
        const float *base = padded + oh * stride * PW;
        float *yr = yp + oh * OW;
        #pragma omp simd
        for (int64_t ow = 0; ow < OW; ++ow) {
            float acc = start;
            for (int64_t kh = 0; kh < K; ++kh)
                for (int64_t kw = 0; kw < K; ++kw)
                    acc += wp[kh * K + kw] * base[kh * PW + ow * stride + kw];
            yr[ow] = acc;
        }
    }
}

#define DW_VEC 16   /* the grid's length is a multiple of this */
#define DW_MAX_TAPS 64

typedef struct {
    int64_t H, W, K, stride, pad, OH, OW;
    int64_t PWS;         /* width of a phase row */
    int64_t grid;        /* OH * PWS rounded up to DW_VEC */
    int64_t phase_size;  /* floats per phase: rows enough for every tap's reads over the grid */
    int64_t taps;        /* K * K */
    int64_t offset[DW_MAX_TAPS];  /* where tap t reads, from the start of the phases */
} dw_layout;

static dw_layout dw_make_layout(int64_t H, int64_t W, int64_t K, int64_t stride, int64_t pad,
                                int64_t OH, int64_t OW) {
    dw_layout L = {H, W, K, stride, pad, OH, OW};
    const int64_t PH = H + 2 * pad, PW = W + 2 * pad;
    L.PWS = (PW + stride - 1) / stride;
    L.grid = (OH * L.PWS + DW_VEC - 1) / DW_VEC * DW_VEC;
    const int64_t reach = (K - 1) / stride;  /* the furthest tap offset, in phase rows and columns */
    const int64_t data_rows = (PH + stride - 1) / stride;
    const int64_t read_rows = (L.grid + reach * (L.PWS + 1) + L.PWS - 1) / L.PWS;
    L.phase_size = (data_rows > read_rows ? data_rows : read_rows) * L.PWS;
    L.taps = K * K;
    for (int64_t kh = 0; kh < K; ++kh)
        for (int64_t kw = 0; kw < K; ++kw)
            L.offset[kh * K + kw] = ((kh % stride) * stride + kw % stride) * L.phase_size
                                    + (kh / stride) * L.PWS + kw / stride;
    return L;
}

static inline int64_t dw_phases_size(const dw_layout *L) { return L->stride * L->stride * L->phase_size; }

/* Columns first, first + stride, ... of an input row to and from a phase row:
 * inlined with the stride constant (2 in CvT) these loops vectorise. */
static inline __attribute__((always_inline)) void
dw_gather_columns(const float *restrict in, float *restrict out, int64_t first, int64_t count, int64_t stride) {
    #pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[j] = in[first + j * stride];
}

static inline __attribute__((always_inline)) void
dw_scatter_columns(const float *restrict in, float *restrict out, int64_t first, int64_t count, int64_t stride) {
    #pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[first + j * stride] = in[j];
}

/* Plane (H, W) into the phases of a buffer whose padding is already zero (it is
 * zeroed once; every plane overwrites the same entries). With `to_plane` the
 * other way: padded entry (h + pad, w + pad) of the phases into plane[h, w]. */
static void dw_phases_copy(const dw_layout *L, float *plane, float *phases, int to_plane) {
    const int64_t s = L->stride, pad = L->pad, W = L->W;
    for (int64_t h = 0; h < L->H; ++h) {
        const int64_t r = h + pad;
        float *image_row = plane + h * W;
        float *row = phases + (r % s) * s * L->phase_size + (r / s) * L->PWS;
        if (s == 1) {
            if (to_plane) memcpy(image_row, row + pad, sizeof(float) * W);
            else memcpy(row + pad, image_row, sizeof(float) * W);
            continue;
        }
        for (int64_t b = 0; b < s; ++b) {
            /* padded column j * s + b is input column j * s + b - pad */
            const int64_t j0 = (pad - b + s - 1) / s;
            const int64_t first = j0 * s + b - pad;
            if (first >= W) continue;
            const int64_t count = (W - 1 - first) / s + 1;
            float *phase_row = row + b * L->phase_size + j0;
            if (to_plane) {
                if (s == 2) dw_scatter_columns(phase_row, image_row, first, count, 2);
                else dw_scatter_columns(phase_row, image_row, first, count, s);
            } else {
                if (s == 2) dw_gather_columns(image_row, phase_row, first, count, 2);
                else dw_gather_columns(image_row, phase_row, first, count, s);
            }
        }
    }
}

static void dw_to_phases(const dw_layout *L, const float *plane, float *phases) {
    dw_phases_copy(L, (float *)plane, phases, 0);
}

static void dw_from_phases(const dw_layout *L, const float *phases, float *plane) {
    dw_phases_copy(L, plane, (float *)phases, 1);
}

/* grid[i] = start + sum over taps of weight[t] * phases[offset[t] + i]. Inlined with
 * the tap count constant (9 in CvT), the taps unroll inside the vector loop. */
static inline __attribute__((always_inline)) void
dw_grid_forward(const dw_layout *L, const float *restrict phases, const float *restrict wp, float start,
                float *restrict grid, int64_t taps) {
    const int64_t *offset = L->offset;
    #pragma omp simd
    for (int64_t i = 0; i < L->grid; ++i) {
        float acc = start;
        for (int64_t t = 0; t < taps; ++t) acc += wp[t] * phases[offset[t] + i];
        grid[i] = acc;
    }
}

/* acc[t * DW_VEC + j] += dy_grid[i] * phases[offset[t] + i] for i = j mod DW_VEC: the
 * weight gradient's sums, kept as vectors until the channel is done. */
static inline __attribute__((always_inline)) void
dw_grid_weight_grad(const dw_layout *L, const float *restrict dy_grid, const float *restrict phases,
                    float *restrict acc, int64_t taps) {
    const int64_t *offset = L->offset;
    for (int64_t i = 0; i < L->grid; i += DW_VEC)
        for (int64_t t = 0; t < taps; ++t) {
            const float *restrict in = phases + offset[t] + i;
            #pragma omp simd
            for (int64_t j = 0; j < DW_VEC; ++j) acc[t * DW_VEC + j] += dy_grid[i + j] * in[j];
        }
}

/* phases[offset[t] + i] += weight[t] * dy_grid[i]: the input gradient scattered
 * tap by tap (the grid's dropped columns hold zeros). */
static inline __attribute__((always_inline)) void
dw_grid_input_grad(const dw_layout *L, const float *restrict dy_grid, const float *restrict wp,
                   float *restrict phases, int64_t taps) {
    for (int64_t t = 0; t < taps; ++t) {
        float *restrict out = phases + L->offset[t];
        const float wv = wp[t];
        #pragma omp simd
        for (int64_t i = 0; i < L->grid; ++i) out[i] += wv * dy_grid[i];
    }
}

/* dy plane (OH, OW) into a grid whose dropped columns are already zero. */
static void dw_to_grid(const dw_layout *L, const float *restrict plane, float *restrict grid) {
    for (int64_t oh = 0; oh < L->OH; ++oh)
        memcpy(grid + oh * L->PWS, plane + oh * L->OW, sizeof(float) * L->OW);
}

static void dw_from_grid(const dw_layout *L, const float *restrict grid, float *restrict plane) {
    for (int64_t oh = 0; oh < L->OH; ++oh)
        memcpy(plane + oh * L->OW, grid + oh * L->PWS, sizeof(float) * L->OW);
}

/* Below this output width (stride 1) the forward runs on the grid: row loops
 * that short are mostly loop overhead. Measured on CvT's maps (56, 28, 14 wide). */
#define DW_GRID_MAX_WIDTH 32

/* `lead` (B, C) may be NULL. Given, each output plane is stored flattened after
 * its lead entry: y is (B, C, 1 + OH * OW), a cls token's column before the
 * map's (the attention's q, k and v in inference). */
void cvt_dwconv2d_forward(const float *x, const float *weight, const float *bias, const float *lead,
                          float *y, int64_t B, int64_t C, int64_t H, int64_t W, int64_t K,
                          int64_t stride, int64_t pad, int64_t OH, int64_t OW) {
    const int64_t y_plane = OH * OW + (lead ? 1 : 0);
    const dw_layout L = dw_make_layout(H, W, K, stride, pad, OH, OW);
    const int on_grid = stride == 1 && OW < DW_GRID_MAX_WIDTH;
    const int64_t PW = W + 2 * pad, PH = H + 2 * pad;
    #pragma omp parallel num_threads(threads_for(B * C * OH * OW * K))
    {
        float *scratch = on_grid ? calloc(dw_phases_size(&L), sizeof(float)) : malloc(sizeof(float) * PH * PW);
        float *grid = on_grid ? malloc(sizeof(float) * L.grid) : NULL;
        #pragma omp for schedule(static)
        for (int64_t plane = 0; plane < B * C; ++plane) {
            const int64_t c = plane % C;
            const float start = bias ? bias[c] : 0.0f;
            const float *wp = weight + c * K * K;
            float *yp = y + plane * y_plane;
            if (lead) *yp++ = lead[plane];
            if (on_grid) {
                dw_to_phases(&L, x + plane * H * W, scratch);
                if (K == 3)
                    dw_grid_forward(&L, scratch, wp, start, grid, 9);
                else
                    dw_grid_forward(&L, scratch, wp, start, grid, L.taps);
                dw_from_grid(&L, grid, yp);
                continue;
            }
            pad_plane(x + plane * H * W, scratch, H, W, pad);
            if (K == 3 && stride == 1)
                dw_rows_forward(scratch, PW, wp, start, yp, OH, OW, 3, 1);
            else if (K == 3 && stride == 2)
                dw_rows_forward(scratch, PW, wp, start, yp, OH, OW, 3, 2);
            else
                dw_rows_forward(scratch, PW, wp, start, yp, OH, OW, K, stride);
        }
        free(scratch);
        free(grid);
    }
}

/* Gradients of the depthwise convolution: dx (may be NULL) and dweight (C, K*K,
 * may be NULL). One thread owns a channel across the batch, so neither needs
 * atomics. The weight gradient also multiplies the grid's dropped columns (by
 * a zero gradient): a NaN or infinity in x can reach a tap the reference op
 * would not pass it to, never the other way round. */
void cvt_dwconv2d_backward(const float *dy, const float *x, const float *weight,
                           float *dx, float *dweight,
                           int64_t B, int64_t C, int64_t H, int64_t W, int64_t K,
                           int64_t stride, int64_t pad, int64_t OH, int64_t OW) {
    const dw_layout L = dw_make_layout(H, W, K, stride, pad, OH, OW);
    const int64_t taps = L.taps;
    #pragma omp parallel num_threads(threads_for(B * C * OH * OW * K))
    {
        float *phases = dweight ? calloc(dw_phases_size(&L), sizeof(float)) : NULL;
        float *dphases = dx ? malloc(sizeof(float) * dw_phases_size(&L)) : NULL;
        float *dy_grid = calloc(L.grid, sizeof(float));
        float *acc = dweight ? malloc(sizeof(float) * taps * DW_VEC) : NULL;
        /* a block of neighbouring channels per thread: handed out one at a time, neighbouring
         * threads wrote neighbouring dx planes at once, sharing a cache line wherever a plane
         * is not a multiple of 64 bytes (stage 3's 14x14 and 7x7) */
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < C; ++c) {
            const float *wp = weight + c * taps;
            if (acc) memset(acc, 0, sizeof(float) * taps * DW_VEC);
            for (int64_t b = 0; b < B; ++b) {
                const int64_t plane = b * C + c;
                dw_to_grid(&L, dy + plane * OH * OW, dy_grid);
                if (acc) {
                    dw_to_phases(&L, x + plane * H * W, phases);
                    if (taps == 9)
                        dw_grid_weight_grad(&L, dy_grid, phases, acc, 9);
                    else
                        dw_grid_weight_grad(&L, dy_grid, phases, acc, taps);
                }
                if (dphases) {
                    memset(dphases, 0, sizeof(float) * dw_phases_size(&L));
                    if (taps == 9)
                        dw_grid_input_grad(&L, dy_grid, wp, dphases, 9);
                    else
                        dw_grid_input_grad(&L, dy_grid, wp, dphases, taps);
                    dw_from_phases(&L, dphases, dx + plane * H * W);
                }
            }
            if (acc)
                for (int64_t t = 0; t < taps; ++t) {
                    double total = 0.0;
                    for (int64_t j = 0; j < DW_VEC; ++j) total += acc[t * DW_VEC + j];
                    dweight[c * taps + t] = (float)total;
                }
        }
        free(phases);
        free(dphases);
        free(dy_grid);
        free(acc);
    }
}

/* ---- patch embedding: convolution as im2col + GEMM ------------------------------
 * cols (B*OH*OW, C*K*K): row (b, oh, ow) holds the K x K patch of every input
 * channel under output position (oh, ow), in the order of a (O, C, K, K) weight,
 * so that the convolution is one GEMM, cols x weight^T, giving tokens directly.
 * Zero padding `pad`, the same stride on both axes. */
void cvt_im2col(const float *restrict x, float *restrict cols,
                int64_t B, int64_t C, int64_t H, int64_t W, int64_t K,
                int64_t stride, int64_t pad, int64_t OH, int64_t OW) {
    const int64_t width = C * K * K;
    #pragma omp parallel for schedule(static) num_threads(threads_for(B * OH * OW * width))
    for (int64_t line = 0; line < B * OH; ++line) {
        const int64_t b = line / OH, oh = line % OH;
        for (int64_t ow = 0; ow < OW; ++ow) {
            float *restrict row = cols + (line * OW + ow) * width;
            for (int64_t c = 0; c < C; ++c) {
                const float *plane = x + (b * C + c) * H * W;
                for (int64_t kh = 0; kh < K; ++kh) {
                    const int64_t ih = oh * stride - pad + kh;
                    float *restrict out = row + (c * K + kh) * K;
                    if (ih < 0 || ih >= H) {
                        for (int64_t kw = 0; kw < K; ++kw) out[kw] = 0.0f;
                        continue;
                    }
                    const float *in = plane + ih * W;
                    for (int64_t kw = 0; kw < K; ++kw) {
                        const int64_t iw = ow * stride - pad + kw;
                        out[kw] = (iw >= 0 && iw < W) ? in[iw] : 0.0f;
                    }
                }
            }
        }
    }
}

/* The gradient of cvt_im2col: dx (B, C, H, W) gathers every column entry that
 * copied it. One thread per image, so the additions need no atomics. */
void cvt_col2im(const float *restrict dcols, float *restrict dx,
                int64_t B, int64_t C, int64_t H, int64_t W, int64_t K,
                int64_t stride, int64_t pad, int64_t OH, int64_t OW) {
    const int64_t width = C * K * K;
    #pragma omp parallel for schedule(static) num_threads(threads_for(B * OH * OW * width))
    for (int64_t b = 0; b < B; ++b) {
        float *restrict image = dx + b * C * H * W;
        memset(image, 0, sizeof(float) * C * H * W);
        for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) {
                const float *restrict row = dcols + ((b * OH + oh) * OW + ow) * width;
                for (int64_t c = 0; c < C; ++c)
                    for (int64_t kh = 0; kh < K; ++kh) {
                        const int64_t ih = oh * stride - pad + kh;
                        if (ih < 0 || ih >= H) continue;
                        float *restrict out = image + (c * H + ih) * W;
                        const float *restrict in = row + (c * K + kh) * K;
                        for (int64_t kw = 0; kw < K; ++kw) {
                            const int64_t iw = ow * stride - pad + kw;
                            if (iw >= 0 && iw < W) out[iw] += in[kw];
                        }
                    }
            }
    }
}

/* ---- softmax over the last axis ---------------------------------------------- */

void cvt_softmax_forward(const float *x, float *y, int64_t rows, int64_t cols) {
    #pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols))
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        float top = xr[0];
        #pragma omp simd reduction(max:top)
        for (int64_t i = 1; i < cols; ++i) top = xr[i] > top ? xr[i] : top;
        float total = 0.0f;
        #pragma omp simd reduction(+:total)
        for (int64_t i = 0; i < cols; ++i) {
            const float e = exp_approx(xr[i] - top);
            yr[i] = e;
            total += e;
        }
        const float inv = 1.0f / total;
        for (int64_t i = 0; i < cols; ++i) yr[i] *= inv;
    }
}

/* dx = y * (dy - sum(dy * y)) per row */
void cvt_softmax_backward(const float *y, const float *dy, float *dx, int64_t rows, int64_t cols) {
    #pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols))
    for (int64_t r = 0; r < rows; ++r) {
        const float *yr = y + r * cols;
        const float *dyr = dy + r * cols;
        float *dxr = dx + r * cols;
        float dot = 0.0f;
        #pragma omp simd reduction(+:dot)
        for (int64_t i = 0; i < cols; ++i) dot += dyr[i] * yr[i];
        for (int64_t i = 0; i < cols; ++i) dxr[i] = yr[i] * (dyr[i] - dot);
    }
}

/* ---- LayerNorm over the last axis -------------------------------------------- */

void cvt_layer_norm_forward(const float *restrict x, const float *restrict gamma,
                            const float *restrict beta, float *restrict y,
                            float *restrict mean, float *restrict rstd,
                            int64_t rows, int64_t cols, float eps) {
    #pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols))
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * cols;
        float *restrict yr = y + r * cols;
        float total = 0.0f;
        #pragma omp simd reduction(+:total)
        for (int64_t i = 0; i < cols; ++i) total += xr[i];
        const float mu = total / (float)cols;
        float squares = 0.0f;
        #pragma omp simd reduction(+:squares)
        for (int64_t i = 0; i < cols; ++i) {
            const float d = xr[i] - mu;
            squares += d * d;
        }
        const float inv = 1.0f / sqrtf(squares / (float)cols + eps);
        #pragma omp simd
        for (int64_t i = 0; i < cols; ++i) yr[i] = (xr[i] - mu) * inv * gamma[i] + beta[i];
        if (mean) mean[r] = mu;
        if (rstd) rstd[r] = inv;
    }
}

/* dx, and dgamma / dbeta summed over rows: per-thread partial sums, then added up. */
void cvt_layer_norm_backward(const float *dy, const float *x, const float *gamma,
                             const float *mean, const float *rstd,
                             float *dx, float *dgamma, float *dbeta, int64_t rows, int64_t cols) {
    const int threads = threads_for(rows * cols);
    float *partial = calloc((size_t)threads * 2 * cols, sizeof(float));
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        float *pg = partial + (int64_t)t * 2 * cols;
        float *pb = pg + cols;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float *dyr = dy + r * cols;
            const float *xr = x + r * cols;
            float *dxr = dx + r * cols;
            const float mu = mean[r], inv = rstd[r];
            float sum_g = 0.0f, sum_gx = 0.0f;
            #pragma omp simd reduction(+:sum_g, sum_gx)
            for (int64_t i = 0; i < cols; ++i) {
                const float xhat = (xr[i] - mu) * inv;
                const float g = dyr[i] * gamma[i];
                sum_g += g;
                sum_gx += g * xhat;
                pg[i] += dyr[i] * xhat;
                pb[i] += dyr[i];
            }
            const float mean_g = sum_g / (float)cols, mean_gx = sum_gx / (float)cols;
            for (int64_t i = 0; i < cols; ++i) {
                const float xhat = (xr[i] - mu) * inv;
                dxr[i] = inv * (dyr[i] * gamma[i] - mean_g - xhat * mean_gx);
            }
        }
    }
    for (int64_t i = 0; i < cols; ++i) {
        float g = 0.0f, b = 0.0f;
        for (int t = 0; t < threads; ++t) {
            g += partial[(int64_t)t * 2 * cols + i];
            b += partial[(int64_t)t * 2 * cols + cols + i];
        }
        dgamma[i] = g;
        dbeta[i] = b;
    }
    free(partial);
}

/* ---- BatchNorm folded into a convolution (inference) --------------------------------
 * With f[c] = gamma[c] / sqrt(variance[c] + epsilon): folded_weight[c, :] =
 * weight[c, :] * f[c] over the `taps` weights of output channel c, folded_bias[c] =
 * beta[c] - mean[c] * f[c]. One call instead of six small tensor ops per projection. */
void cvt_fold_batch_norm(const float *weight, const float *gamma, const float *beta, const float *mean,
                         const float *variance, float epsilon, float *folded_weight, float *folded_bias,
                         int64_t C, int64_t taps) {
    for (int64_t c = 0; c < C; ++c) {
        const float factor = gamma[c] / sqrtf(variance[c] + epsilon);
        for (int64_t t = 0; t < taps; ++t) folded_weight[c * taps + t] = weight[c * taps + t] * factor;
        folded_bias[c] = beta[c] - mean[c] * factor;
    }
}

/* ---- BatchNorm in training ------------------------------------------------------
 * x (B, C, L): normalised per channel with the batch's mean and (biased)
 * variance, scaled and shifted; the running statistics move by `momentum` as
 * Paddle's BatchNorm moves them (running = momentum * running + (1 - momentum)
 * * batch). `lead` (B, C) may be NULL; given, y is (B, C, 1 + L) with the lead
 * entry before each plane, as in cvt_dwconv2d_forward. One thread owns a
 * channel; its B planes stay in cache across the passes. */
void cvt_batch_norm_forward(const float *x, const float *gamma, const float *beta, const float *lead,
                            float *y, float *mean_out, float *rstd_out, float *running_mean,
                            float *running_var, int64_t B, int64_t C, int64_t L, float momentum,
                            float eps) {
    const int64_t y_plane = L + (lead ? 1 : 0);
    #pragma omp parallel for schedule(static) num_threads(threads_for(B * C * L))
    for (int64_t c = 0; c < C; ++c) {
        /* one pass for both moments, about a shift (the channel's first value) so that
         * a mean far from zero costs no precision: var = E[(x - s)^2] - (E[x - s])^2 */
        const float shift_value = x[c * L];
        double sum = 0.0, squares = 0.0;
        for (int64_t b = 0; b < B; ++b) {
            const float *xp = x + (b * C + c) * L;
            float part = 0.0f, part_squares = 0.0f;
            #pragma omp simd reduction(+:part, part_squares)
            for (int64_t l = 0; l < L; ++l) {
                const float d = xp[l] - shift_value;
                part += d;
                part_squares += d * d;
            }
            sum += part;
            squares += part_squares;
        }
        const double n = (double)(B * L), shifted_mean = sum / n;
        const float mean = (float)(shift_value + shifted_mean);
        const double var_d = squares / n - shifted_mean * shifted_mean;
        const float var = (float)(var_d > 0.0 ? var_d : 0.0);
        const float rstd = 1.0f / sqrtf(var + eps);
        const float scale = gamma[c] * rstd, shift = beta[c] - mean * scale;
        for (int64_t b = 0; b < B; ++b) {
            const float *xp = x + (b * C + c) * L;
            float *yp = y + (b * C + c) * y_plane;
            if (lead) *yp++ = lead[b * C + c];
            #pragma omp simd
            for (int64_t l = 0; l < L; ++l) yp[l] = xp[l] * scale + shift;
        }
        mean_out[c] = mean;
        rstd_out[c] = rstd;
        running_mean[c] = momentum * running_mean[c] + (1.0f - momentum) * mean;
        running_var[c] = momentum * running_var[c] + (1.0f - momentum) * var;
    }
}

/* Its gradients: dx (B, C, L), dgamma and dbeta (C); dy is (B, C, L), or
 * (B, C, 1 + L) when dlead (B, C) is given, which receives the lead entries'. */
void cvt_batch_norm_backward(const float *dy, const float *x, const float *gamma, const float *mean,
                             const float *rstd, float *dx, float *dgamma, float *dbeta, float *dlead,
                             int64_t B, int64_t C, int64_t L) {
    const int64_t dy_plane = L + (dlead ? 1 : 0);
    const int64_t skip = dlead ? 1 : 0;
    #pragma omp parallel for schedule(static) num_threads(threads_for(B * C * L))
    for (int64_t c = 0; c < C; ++c) {
        const float mu = mean[c], inv = rstd[c];
        double sum_dy = 0.0, sum_dy_xhat = 0.0;
        for (int64_t b = 0; b < B; ++b) {
            const float *dyp = dy + (b * C + c) * dy_plane + skip;
            const float *xp = x + (b * C + c) * L;
            float part_dy = 0.0f, part_dy_xhat = 0.0f;
            #pragma omp simd reduction(+:part_dy, part_dy_xhat)
            for (int64_t l = 0; l < L; ++l) {
                part_dy += dyp[l];
                part_dy_xhat += dyp[l] * (xp[l] - mu) * inv;
            }
            sum_dy += part_dy;
            sum_dy_xhat += part_dy_xhat;
            if (dlead) dlead[b * C + c] = dyp[-1];
        }
        if (dgamma) dgamma[c] = (float)sum_dy_xhat;
        if (dbeta) dbeta[c] = (float)sum_dy;
        if (!dx) continue;
        const float n = (float)(B * L);
        const float mean_dy = (float)sum_dy / n, mean_dy_xhat = (float)sum_dy_xhat / n;
        const float factor = gamma[c] * inv;
        for (int64_t b = 0; b < B; ++b) {
            const float *dyp = dy + (b * C + c) * dy_plane + skip;
            const float *xp = x + (b * C + c) * L;
            float *dxp = dx + (b * C + c) * L;
            #pragma omp simd
            for (int64_t l = 0; l < L; ++l)
                dxp[l] = factor * (dyp[l] - mean_dy - (xp[l] - mu) * inv * mean_dy_xhat);
        }
    }
}

/* ---- SiLU ---------------------------------------------------------------------- */

/* SiLU of x plus a bias over rows, y = silu(x[r, c] + bias[c]): a Linear layer's
 * bias and its activation in one pass. y may be x (in place). */
void cvt_bias_silu_forward(const float *x, const float *restrict bias, float *y,
                           int64_t rows, int64_t cols, float slope) {
    #pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols))
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            const float z = xr[c] + bias[c];
            yr[c] = z / (1.0f + exp_approx(-slope * z));
        }
    }
}

/* dz = dy * d/dz [z sigmoid(slope z)] at z = x + bias, the gradient of both x and
 * (summed over rows) the bias */
void cvt_bias_silu_backward(const float *restrict x, const float *restrict bias,
                            const float *restrict dy, float *restrict dz, int64_t rows, int64_t cols,
                            float slope) {
    #pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols))
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * cols;
        const float *restrict dyr = dy + r * cols;
        float *restrict dzr = dz + r * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            const float z = xr[c] + bias[c];
            const float s = 1.0f / (1.0f + exp_approx(-slope * z));
            dzr[c] = dyr[c] * s * (1.0f + slope * z * (1.0f - s));
        }
    }
}

/* ---- bias addition ---------------------------------------------------------------
 * y[a, c, l] = x[a, c, l] + bias[c], x of shape (A, C, L): a bias added over rows
 * (L = 1) or over channels-first maps. Paddle's CPU add broadcasts on one thread.
 * y may be x (in place): each element is read before it is written. */
void cvt_add_bias(const float *x, const float *restrict bias, float *y,
                  int64_t A, int64_t C, int64_t L) {
    if (L == 1) {
        #pragma omp parallel for schedule(static) num_threads(threads_for(A * C))
        for (int64_t a = 0; a < A; ++a) {
            const float *xr = x + a * C;
            float *yr = y + a * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] + bias[c];
        }
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(threads_for(A * C * L))
    for (int64_t plane = 0; plane < A * C; ++plane) {
        const float value = bias[plane % C];
        const float *xr = x + plane * L;
        float *yr = y + plane * L;
        #pragma omp simd
        for (int64_t l = 0; l < L; ++l) yr[l] = xr[l] + value;
    }
}

/* ---- token <-> map transposes -----------------------------------------------------
 * dst[b, j, i] = src[b, i, j] for i < R, j < N: the (R, N) matrix of each of B
 * batches, src rows N apart, dst rows R apart, batches src_stride and dst_stride
 * apart. Tokens (B, L, C) -> channels-first maps (B, C, L - lead) reads src from
 * the first token after the lead (cls) tokens with src_stride L * C; the
 * gradient goes back the same way. Paddle's transpose copy is single-threaded.
 * Tiles of TRANSPOSE_TILE^2 keep both sides in L1; inside a tile, 8x8 blocks go
 * through registers (eight row loads, shuffles, eight row stores). */
#define TRANSPOSE_TILE 32

#if defined(__AVX__)
#include <immintrin.h>
static inline void transpose_8x8(const float *s, int64_t s_row, float *d, int64_t d_row) {
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + s_row), r2 = _mm256_loadu_ps(s + 2 * s_row),
           r3 = _mm256_loadu_ps(s + 3 * s_row), r4 = _mm256_loadu_ps(s + 4 * s_row),
           r5 = _mm256_loadu_ps(s + 5 * s_row), r6 = _mm256_loadu_ps(s + 6 * s_row),
           r7 = _mm256_loadu_ps(s + 7 * s_row);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
           u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
           u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
           u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + d_row, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * d_row, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * d_row, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * d_row, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * d_row, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * d_row, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * d_row, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

void cvt_transpose_batched(const float *restrict src, float *restrict dst, int64_t B, int64_t R, int64_t N,
                           int64_t src_stride, int64_t dst_stride) {
    const int64_t row_tiles = (R + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE;
    const int64_t col_tiles = (N + TRANSPOSE_TILE - 1) / TRANSPOSE_TILE;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(B * R * N))
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t tile = 0; tile < row_tiles * col_tiles; ++tile) {
            const int64_t i0 = tile / col_tiles * TRANSPOSE_TILE, j0 = tile % col_tiles * TRANSPOSE_TILE;
            const int64_t i1 = i0 + TRANSPOSE_TILE < R ? i0 + TRANSPOSE_TILE : R;
            const int64_t j1 = j0 + TRANSPOSE_TILE < N ? j0 + TRANSPOSE_TILE : N;
            const float *s = src + b * src_stride;
            float *d = dst + b * dst_stride;
            int64_t i8 = i0, j8 = j0;  /* the blocks cover [i0, i8) x [j0, j8) */
#if defined(__AVX__)
            i8 = i0 + (i1 - i0) / 8 * 8;
            j8 = j0 + (j1 - j0) / 8 * 8;
            for (int64_t i = i0; i < i8; i += 8)
                for (int64_t j = j0; j < j8; j += 8) transpose_8x8(s + i * N + j, N, d + j * R + i, R);
#endif
            /* the edges: columns past the blocks, then rows past them */
            for (int64_t j = j8; j < j1; ++j)
                for (int64_t i = i0; i < i1; ++i) d[j * R + i] = s[i * N + j];
            for (int64_t j = j0; j < j8; ++j)
                for (int64_t i = i8; i < i1; ++i) d[j * R + i] = s[i * N + j];
        }
    }
}

/* ---- residual additions ----------------------------------------------------------
 * out = x + branch * scale[b] over B samples of `per_sample` floats each: a
 * residual addition with DropPath's per-sample factor (scale NULL: 1) in one
 * pass. x NULL: out = branch * scale[b] (the branch's gradient). out may be x or
 * branch (in place). Threads split the whole array, not the samples, so that
 * a batch of one uses them too. */
#define RESIDUAL_BLOCK 16384

void cvt_residual_add(const float *x, const float *branch, const float *scale, float *out,
                      int64_t B, int64_t per_sample) {
    const int64_t total = B * per_sample;
    const int64_t blocks = (total + RESIDUAL_BLOCK - 1) / RESIDUAL_BLOCK;
    #pragma omp parallel for schedule(static) num_threads(threads_for(total))
    for (int64_t block = 0; block < blocks; ++block) {
        const int64_t end = (block + 1) * RESIDUAL_BLOCK < total ? (block + 1) * RESIDUAL_BLOCK : total;
        for (int64_t i = block * RESIDUAL_BLOCK; i < end;) {
            const int64_t sample = i / per_sample;
            const int64_t stop = (sample + 1) * per_sample < end ? (sample + 1) * per_sample : end;
            const float factor = scale ? scale[sample] : 1.0f;
            if (x) {
                #pragma omp simd
                for (int64_t j = i; j < stop; ++j) out[j] = x[j] + branch[j] * factor;
            } else {
                #pragma omp simd
                for (int64_t j = i; j < stop; ++j) out[j] = branch[j] * factor;
            }
            i = stop;
        }
    }
}

/* ---- sums for bias gradients ----------------------------------------------------
 * out[c] = sum over a and l of x[a, c, l], x of shape (A, C, L): the gradient of
 * a bias added over rows (L = 1) or over channels-first maps. */
void cvt_channel_sum(const float *x, float *out, int64_t A, int64_t C, int64_t L) {
    const int threads = threads_for(A * C * L);
    if (L == 1) {
        /* column sums: rows split among threads, each with its own partial row */
        float *partial = calloc((size_t)threads * C, sizeof(float));
        #pragma omp parallel num_threads(threads)
        {
            float *mine = partial + (int64_t)omp_get_thread_num() * C;
            #pragma omp for schedule(static)
            for (int64_t a = 0; a < A; ++a) {
                const float *xr = x + a * C;
                for (int64_t c = 0; c < C; ++c) mine[c] += xr[c];
            }
        }
        for (int64_t c = 0; c < C; ++c) {
            float total = 0.0f;
            for (int t = 0; t < threads; ++t) total += partial[(int64_t)t * C + c];
            out[c] = total;
        }
        free(partial);
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < C; ++c) {
        double total = 0.0;
        for (int64_t a = 0; a < A; ++a) {
            const float *xr = x + (a * C + c) * L;
            float row = 0.0f;
            #pragma omp simd reduction(+:row)
            for (int64_t l = 0; l < L; ++l) row += xr[l];
            total += row;
        }
        out[c] = (float)total;
    }
}
