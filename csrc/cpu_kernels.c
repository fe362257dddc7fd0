/* Multi-threaded float32 CPU kernels for the layers where Paddle's own CPU
 * kernels are single-threaded or slow: depthwise convolution, the patch
 * embeddings' im2col, softmax, LayerNorm, SiLU with its bias, bias additions
 * and bias gradients (sums over rows or channels).
 *
 * Plain C with OpenMP, compiled at first use by cpu_kernels.py once per
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
 * square kernel K, the same stride and zero padding on both axes. */

/* Copy plane (H, W) into the middle of a zeroed (H + 2 pad, W + 2 pad) scratch plane,
 * so that the loops below run without bounds checks. */
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

/* One output plane from a padded input plane. Inlined with K and stride constant
 * (3 and 1 or 2 in CvT), the taps unroll and the loop over ow vectorises. */
static inline __attribute__((always_inline)) void
dw_plane_forward(const float *padded, int64_t PW, const float *wp, float start, float *yp,
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

void cvt_dwconv2d_forward(const float *x, const float *weight, const float *bias, float *y,
                          int64_t B, int64_t C, int64_t H, int64_t W, int64_t K,
                          int64_t stride, int64_t pad, int64_t OH, int64_t OW) {
    const int64_t PW = W + 2 * pad, PH = H + 2 * pad;
    #pragma omp parallel num_threads(threads_for(B * C * OH * OW * K))
    {
        float *padded = malloc(sizeof(float) * PH * PW);
        #pragma omp for schedule(static)
        for (int64_t plane = 0; plane < B * C; ++plane) {
            const int64_t c = plane % C;
            pad_plane(x + plane * H * W, padded, H, W, pad);
            const float start = bias ? bias[c] : 0.0f;
            float *yp = y + plane * OH * OW;
            const float *wp = weight + c * K * K;
            if (K == 3 && stride == 1)
                dw_plane_forward(padded, PW, wp, start, yp, OH, OW, 3, 1);
            else if (K == 3 && stride == 2)
                dw_plane_forward(padded, PW, wp, start, yp, OH, OW, 3, 2);
            else
                dw_plane_forward(padded, PW, wp, start, yp, OH, OW, K, stride);
        }
        free(padded);
    }
}

/* The weight gradient's contributions of one plane, per tap and output column:
 * acc[tap * OW + ow] += dy[oh, ow] * x[oh * stride + kh, ow * stride + kw] over oh.
 * Summing into vectors (not one scalar per row) keeps the loop free of horizontal
 * reductions; the caller adds the columns up once per channel. */
static inline __attribute__((always_inline)) void
dw_plane_weight_grad(const float *restrict dyp, const float *restrict padded, int64_t PW,
                     float *restrict acc, int64_t OH, int64_t OW, int64_t K, int64_t stride) {
    for (int64_t oh = 0; oh < OH; ++oh) {
        const float *restrict dyr = dyp + oh * OW;
        for (int64_t kh = 0; kh < K; ++kh) {
            const float *restrict xr = padded + (oh * stride + kh) * PW;
            for (int64_t kw = 0; kw < K; ++kw) {
                float *restrict at = acc + (kh * K + kw) * OW;
                #pragma omp simd
                for (int64_t ow = 0; ow < OW; ++ow) at[ow] += dyr[ow] * xr[ow * stride + kw];
            }
        }
    }
}

/* The input gradient of one plane for stride > 1: each dy entry scattered through
 * the K x K taps into a zeroed padded plane stored as `stride` column phases
 * (column p of a padded row is phases[p % stride][p / stride]), so that every
 * tap adds a contiguous run: tap kw of output column ow lands in phase
 * kw % stride at ow + kw / stride. */
static inline __attribute__((always_inline)) void
dw_plane_input_grad_phased(const float *restrict dyp, float *restrict phases, int64_t PH, int64_t PWS,
                           const float *restrict wp, int64_t OH, int64_t OW, int64_t K, int64_t stride) {
    for (int64_t oh = 0; oh < OH; ++oh) {
        const float *restrict dyr = dyp + oh * OW;
        for (int64_t kh = 0; kh < K; ++kh) {
            const int64_t row = oh * stride + kh;
            for (int64_t kw = 0; kw < K; ++kw) {
                float *restrict out = phases + ((kw % stride) * PH + row) * PWS + kw / stride;
                const float wv = wp[kh * K + kw];
                #pragma omp simd
                for (int64_t ow = 0; ow < OW; ++ow) out[ow] += wv * dyr[ow];
            }
        }
    }
}

/* Gradients of the depthwise convolution: dx (may be NULL) and dweight (C, K*K,
 * may be NULL). One thread owns a channel across the batch, so neither needs
 * atomics. With stride 1 the input gradient is itself a convolution (of dy,
 * padded by K - 1 - pad, with the kernel flipped) and runs as the forward does. */
void cvt_dwconv2d_backward(const float *dy, const float *x, const float *weight,
                           float *dx, float *dweight,
                           int64_t B, int64_t C, int64_t H, int64_t W, int64_t K,
                           int64_t stride, int64_t pad, int64_t OH, int64_t OW) {
    const int64_t PW = W + 2 * pad, PH = H + 2 * pad;
    const int gather = stride == 1 && pad <= K - 1;
    const int64_t dpad = K - 1 - pad;  /* dy's padding for the gathered dx */
    const int64_t DPW = OW + 2 * dpad, DPH = OH + 2 * dpad;
    #pragma omp parallel num_threads(threads_for(B * C * OH * OW * K))
    {
        float *padded = dweight ? malloc(sizeof(float) * PH * PW) : NULL;
        const int64_t PWS = (PW + stride - 1) / stride;  /* width of one column phase */
        float *dpadded = dx ? malloc(sizeof(float) * (gather ? DPH * DPW : stride * PH * PWS)) : NULL;
        float *acc = dweight ? malloc(sizeof(float) * K * K * OW) : NULL;
        #pragma omp for schedule(static, 1)
        for (int64_t c = 0; c < C; ++c) {
            const float *wp = weight + c * K * K;
            float flipped[64];  /* K * K <= 64, checked by the caller */
            for (int64_t i = 0; i < K * K; ++i) flipped[i] = wp[K * K - 1 - i];
            if (acc) memset(acc, 0, sizeof(float) * K * K * OW);
            for (int64_t b = 0; b < B; ++b) {
                const int64_t plane = b * C + c;
                const float *dyp = dy + plane * OH * OW;
                if (acc) {
                    pad_plane(x + plane * H * W, padded, H, W, pad);
                    if (K == 3 && stride == 1)
                        dw_plane_weight_grad(dyp, padded, PW, acc, OH, OW, 3, 1);
                    else if (K == 3 && stride == 2)
                        dw_plane_weight_grad(dyp, padded, PW, acc, OH, OW, 3, 2);
                    else
                        dw_plane_weight_grad(dyp, padded, PW, acc, OH, OW, K, stride);
                }
                if (!dpadded) continue;
                float *dxp = dx + plane * H * W;
                if (gather) {
                    pad_plane(dyp, dpadded, OH, OW, dpad);
                    if (K == 3)
                        dw_plane_forward(dpadded, DPW, flipped, 0.0f, dxp, H, W, 3, 1);
                    else
                        dw_plane_forward(dpadded, DPW, flipped, 0.0f, dxp, H, W, K, 1);
                    continue;
                }
                memset(dpadded, 0, sizeof(float) * stride * PH * PWS);
                if (K == 3 && stride == 2)
                    dw_plane_input_grad_phased(dyp, dpadded, PH, PWS, wp, OH, OW, 3, 2);
                else
                    dw_plane_input_grad_phased(dyp, dpadded, PH, PWS, wp, OH, OW, K, stride);
                /* padded column p = j * stride + phase is input column p - pad */
                for (int64_t h = 0; h < H; ++h)
                    for (int64_t phase = 0; phase < stride; ++phase) {
                        const float *from = dpadded + (phase * PH + h + pad) * PWS;
                        for (int64_t j = (pad - phase + stride - 1) / stride; j * stride + phase - pad < W; ++j)
                            dxp[h * W + j * stride + phase - pad] = from[j];
                    }
            }
            if (acc)
                for (int64_t i = 0; i < K * K; ++i) {
                    double total = 0.0;
                    for (int64_t ow = 0; ow < OW; ++ow) total += acc[i * OW + ow];
                    dweight[c * K * K + i] = (float)total;
                }
        }
        free(padded);
        free(dpadded);
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

/* ---- SiLU ---------------------------------------------------------------------- */

/* SiLU of x plus a bias over rows, y = silu(x[r, c] + bias[c]): a Linear layer's
 * bias and its activation in one pass. y may be x (in place). */
void cvt_bias_silu_forward(const float *x, const float *restrict bias, float *y,
                           int64_t rows, int64_t cols) {
    #pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols))
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float *yr = y + r * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            const float z = xr[c] + bias[c];
            yr[c] = z / (1.0f + exp_approx(-z));
        }
    }
}

/* dz = dy * silu'(x + bias), the gradient of both x and (summed over rows) the bias */
void cvt_bias_silu_backward(const float *restrict x, const float *restrict bias,
                            const float *restrict dy, float *restrict dz, int64_t rows, int64_t cols) {
    #pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols))
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * cols;
        const float *restrict dyr = dy + r * cols;
        float *restrict dzr = dz + r * cols;
        #pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            const float z = xr[c] + bias[c];
            const float s = 1.0f / (1.0f + exp_approx(-z));
            dzr[c] = dyr[c] * s * (1.0f + z * (1.0f - s));
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
