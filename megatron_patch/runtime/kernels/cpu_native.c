#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* One 16x16 tile: dst[j * ds + i] = src[i * ss + j]; 32-bit, then 64-bit unpacks, then two 128-bit lane
   shuffles. */
static inline void tile16(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ss);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ds, r[i]);
}

/* dst [cols, rows] (row stride ds) = transpose of src [rows, cols] (row stride ss, unit column stride). */
void mp_transpose_f32(const float *src, int64_t rows, int64_t cols, int64_t ss, float *dst, int64_t ds) {
    int64_t r16 = rows & ~(int64_t)15, c16 = cols & ~(int64_t)15;
    for (int64_t i = 0; i < r16; i += 16)
        for (int64_t j = 0; j < c16; j += 16)
            tile16(src + i * ss + j, ss, dst + j * ds + i, ds);
    for (int64_t i = 0; i < rows; i++)  /* the edges: columns past c16 of tiled rows, all of the rest */
        for (int64_t j = (i < r16 ? c16 : 0); j < cols; j++)
            dst[j * ds + i] = src[i * ss + j];
}

/* e^x for x <= 0 or moderate x (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, then
   2^n by vscalefps, which flushes very negative x to 0 and overflows large x to inf as expf does; within ~1 ulp
   of the exact value). -inf and NaN are not handled: callers pass neither. */
static inline __m512 exp16(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

/* In place, each of `rows` rows of x (row stride ss): softmax over its first min(i + 1 + offset, cols) entries
   (row i sees keys 0..i+offset: the causal mask, top-left aligned at offset 0), zeros after them. */
void mp_causal_softmax_f32(float *x, int64_t rows, int64_t cols, int64_t ss, int64_t offset) {
    for (int64_t i = 0; i < rows; i++) {
        float *row = x + i * ss;
        int64_t n = i + 1 + offset < cols ? i + 1 + offset : cols;
        __m512 m = _mm512_set1_ps(-3.4028235e38f);
        for (int64_t j = 0; j < n; j += 16)
            m = _mm512_mask_max_ps(m, first(n - j), m, _mm512_maskz_loadu_ps(first(n - j), row + j));
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m)), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 k = first(n - j);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + j), top));
            sum = _mm512_mask_add_ps(sum, k, sum, e);
            _mm512_mask_storeu_ps(row + j, k, e);
        }
        __m512 scale = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < n; j += 16)
            _mm512_mask_storeu_ps(row + j, first(n - j), _mm512_mul_ps(_mm512_maskz_loadu_ps(first(n - j), row + j), scale));
        for (int64_t j = n; j < cols; j++) row[j] = 0.0f;
    }
}

/* silu(g) = g / (1 + e^-g) as torch computes it, and its slope s * (1 + g * (1 - s)), s = 1 / (1 + e^-g) (torch's
   silu_backward). */
static inline __m512 silu16(__m512 g, __m512 *slope) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 denominator = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 s = _mm512_div_ps(one, denominator);
    if (slope) *slope = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
    return _mm512_div_ps(g, denominator);
}

/* SwiGLU on rows of x = [gate | up] (row stride xs), times each row's router probability p[i] where p is given
   (the experts'; megatron's order: (silu(gate) * up) * p): out [rows, half] contiguous. Without p the product by
   1 is exact: plain SwiGLU. */
void mp_swiglu_f32(const float *x, int64_t rows, int64_t half, int64_t xs, const float *p, float *out) {
    for (int64_t i = 0; i < rows; i++) {
        const float *gate = x + i * xs, *up = gate + half;
        const __m512 prob = _mm512_set1_ps(p ? p[i] : 1.0f);
        float *o = out + i * half;
        for (int64_t j = 0; j < half; j += 16) {
            __mmask16 k = first(half - j);
            __m512 y = _mm512_mul_ps(silu16(_mm512_maskz_loadu_ps(k, gate + j), 0), _mm512_maskz_loadu_ps(k, up + j));
            _mm512_mask_storeu_ps(o + j, k, _mm512_mul_ps(y, prob));
        }
    }
}

/* Its backward: dx = [dgate | dup] [rows, 2 * half] contiguous from grad [rows, half] (row stride gs), with
   d = grad * p: dup = d * silu(gate), dgate = (d * up) * slope; where p is given, dp[i] = sum_j grad * silu * up. */
void mp_swiglu_backward_f32(const float *grad, int64_t gs, const float *x, const float *p, int64_t rows,
                            int64_t half, int64_t xs, float *dx, float *dp) {
    for (int64_t i = 0; i < rows; i++) {
        const float *gate = x + i * xs, *up = gate + half, *dy = grad + i * gs;
        const __m512 prob = _mm512_set1_ps(p ? p[i] : 1.0f);
        float *dgate = dx + i * 2 * half, *dup = dgate + half;
        __m512 dot = _mm512_setzero_ps();
        for (int64_t j = 0; j < half; j += 16) {
            __mmask16 k = first(half - j);
            __m512 slope, u = _mm512_maskz_loadu_ps(k, up + j), raw = _mm512_maskz_loadu_ps(k, dy + j);
            __m512 act = silu16(_mm512_maskz_loadu_ps(k, gate + j), &slope), d = _mm512_mul_ps(raw, prob);
            dot = _mm512_fmadd_ps(raw, _mm512_mul_ps(act, u), dot);
            _mm512_mask_storeu_ps(dup + j, k, _mm512_mul_ps(d, act));
            _mm512_mask_storeu_ps(dgate + j, k, _mm512_mul_ps(_mm512_mul_ps(d, u), slope));
        }
        if (dp) dp[i] = _mm512_reduce_add_ps(dot);
    }
}

/* fp32 GEMM, one thread, BLIS's loop order: the right operand packed in blocks of GEMM_KC rows x all columns,
   cut into GEMM_NR-wide panels ([k][NR]: one L1-sized panel per micro-kernel call); the left operand read in place
   by a 12 x 32 micro-kernel that broadcasts one of its entries at a time and keeps the C block in 24 AVX-512
   registers (only a last panel of fewer than 12 rows, or a left operand with neither unit stride, is packed:
   zero-padded [k][12]). Transposed views need no copy; stores past the edges are masked. Each entry of C is one
   fused multiply-add chain over k per GEMM_KC block (its order does not depend on m or n). */
#define GEMM_MR 12
#define GEMM_NR 32
#define GEMM_KC 256
#define GEMM_MC 96
#define GEMM_NC 512  /* a packed right block of KC x NC floats: 512 KiB, within L2 */

static void pack_left(const float *a, int64_t rs, int64_t cs, int64_t m, int64_t k, float *pa) {
    for (int64_t p = 0; p < k; p++)
        for (int64_t i = 0; i < GEMM_MR; i++) pa[p * GEMM_MR + i] = i < m ? a[i * rs + p * cs] : 0.f;
}

static void pack_right(const float *b, int64_t rs, int64_t cs, int64_t k, int64_t n, float *pb) {
    for (int64_t j0 = 0; j0 < n; j0 += GEMM_NR, pb += GEMM_NR * k) {
        int64_t nr = n - j0 < GEMM_NR ? n - j0 : GEMM_NR;
        if (cs == 1) {  /* rows of b: two (masked) vector copies per k */
            __mmask16 m0 = first(nr), m1 = nr > 16 ? first(nr - 16) : 0;
            for (int64_t p = 0; p < k; p++) {
                const float *src = b + p * rs + j0;
                _mm512_storeu_ps(pb + p * GEMM_NR, _mm512_maskz_loadu_ps(m0, src));
                _mm512_storeu_ps(pb + p * GEMM_NR + 16, _mm512_maskz_loadu_ps(m1, src + 16));
            }
        } else if (rs == 1 && nr == GEMM_NR) {  /* b = w^T with w's rows contiguous (x @ w^T): 16x16 transposes */
            int64_t k16 = k & ~(int64_t)15;
            for (int64_t p = 0; p < k16; p += 16) {
                tile16(b + j0 * cs + p, cs, pb + p * GEMM_NR, GEMM_NR);
                tile16(b + (j0 + 16) * cs + p, cs, pb + p * GEMM_NR + 16, GEMM_NR);
            }
            for (int64_t p = k16; p < k; p++)
                for (int64_t j = 0; j < GEMM_NR; j++) pb[p * GEMM_NR + j] = b[(j0 + j) * cs + p];
        } else {
            for (int64_t p = 0; p < k; p++)
                for (int64_t j = 0; j < GEMM_NR; j++) pb[p * GEMM_NR + j] = j < nr ? b[p * rs + (j0 + j) * cs] : 0.f;
        }
    }
}

#define FMA_ROW(i, x) { __m512 a_ = _mm512_set1_ps(x); \
    acc[i][0] = _mm512_fmadd_ps(a_, b0, acc[i][0]); acc[i][1] = _mm512_fmadd_ps(a_, b1, acc[i][1]); }

/* c [mr <= 12, nr <= 32] (row stride ldc) = (add ? c : 0) + a [12, k] . pb [k][32]; a's 12 rows all readable,
   either with contiguous rows (acs == 1: row stride ars) or contiguous columns (ars == 1: column stride acs). */
static void micro_kernel(int64_t k, const float *a, int64_t ars, int64_t acs, const float *pb, float *c, int64_t ldc,
                         int64_t mr, int64_t nr, int add) {
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    if (acs == 1) {  /* four row pointers, three rows each: few registers for the addresses */
        const float *r0 = a, *r3 = a + 3 * ars, *r6 = a + 6 * ars, *r9 = a + 9 * ars;
#pragma GCC unroll 2
        for (int64_t p = 0; p < k; p++, pb += GEMM_NR) {
            __m512 b0 = _mm512_loadu_ps(pb), b1 = _mm512_loadu_ps(pb + 16);
            FMA_ROW(0, r0[p]) FMA_ROW(1, r0[ars + p]) FMA_ROW(2, r0[2 * ars + p])
            FMA_ROW(3, r3[p]) FMA_ROW(4, r3[ars + p]) FMA_ROW(5, r3[2 * ars + p])
            FMA_ROW(6, r6[p]) FMA_ROW(7, r6[ars + p]) FMA_ROW(8, r6[2 * ars + p])
            FMA_ROW(9, r9[p]) FMA_ROW(10, r9[ars + p]) FMA_ROW(11, r9[2 * ars + p])
        }
    } else {
#pragma GCC unroll 4
        for (int64_t p = 0; p < k; p++, a += acs, pb += GEMM_NR) {
            __m512 b0 = _mm512_loadu_ps(pb), b1 = _mm512_loadu_ps(pb + 16);
#pragma GCC unroll 12
            for (int i = 0; i < GEMM_MR; i++) FMA_ROW(i, a[i])
        }
    }
    __mmask16 m0 = first(nr), m1 = nr > 16 ? first(nr - 16) : 0;
#pragma GCC unroll 12
    for (int i = 0; i < GEMM_MR; i++) {  /* constant indices keep acc in registers */
        if (i >= mr) break;
        float *row = c + i * ldc;
        __m512 v0 = acc[i][0], v1 = acc[i][1];
        if (add) {
            v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), v0);
            v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), v1);
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row + 16, m1, v1);
    }
}

static _Thread_local float *gemm_buffer;
static _Thread_local size_t gemm_buffer_floats;

/* c [m, n] (row stride ldc, contiguous rows) = (accumulate ? c : 0) + a [m, k] @ b [k, n], a and b any strides
   (element (i, p) of a at a[i * ars + p * acs]). Returns 0, or -1 when the packing buffer cannot be had. */
int mp_gemm_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t ars, int64_t acs, const float *b,
                int64_t brs, int64_t bcs, float *c, int64_t ldc, int accumulate) {
    if (k == 0 && !accumulate)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) c[i * ldc + j] = 0.f;
    int in_place = acs == 1 || ars == 1;  /* else every left panel is packed */
    size_t need = GEMM_KC * (size_t)GEMM_NC + GEMM_KC * (size_t)GEMM_MC;
    if (need > gemm_buffer_floats) {  /* kept for the thread's next call: no allocation per product */
        free(gemm_buffer);
        gemm_buffer = aligned_alloc(64, sizeof(float) * need);
        gemm_buffer_floats = gemm_buffer ? need : 0;
        if (!gemm_buffer) return -1;
    }
    float *pb = gemm_buffer, *pa = gemm_buffer + GEMM_KC * GEMM_NC;
    for (int64_t p0 = 0; p0 < k; p0 += GEMM_KC) {
        int64_t kc = k - p0 < GEMM_KC ? k - p0 : GEMM_KC;
        for (int64_t n0 = 0; n0 < n; n0 += GEMM_NC) {
            int64_t nc = n - n0 < GEMM_NC ? n - n0 : GEMM_NC;
            pack_right(b + p0 * brs + n0 * bcs, brs, bcs, kc, nc, pb);
            for (int64_t i0 = 0; i0 < m; i0 += GEMM_MC) {
                int64_t mc = m - i0 < GEMM_MC ? m - i0 : GEMM_MC;
                const float *a_block = a + i0 * ars + p0 * acs;
                for (int64_t i = 0; i < mc; i += GEMM_MR)  /* packed: the panels not read in place */
                    if (!in_place || mc - i < GEMM_MR)
                        pack_left(a_block + i * ars, ars, acs, mc - i, kc, pa + i * kc);
                for (int64_t j0 = 0; j0 < nc; j0 += GEMM_NR)
                    for (int64_t i = 0; i < mc; i += GEMM_MR) {
                        int64_t mr = mc - i < GEMM_MR ? mc - i : GEMM_MR;
                        int packed = !in_place || mr < GEMM_MR;
                        micro_kernel(kc, packed ? pa + i * kc : a_block + i * ars, packed ? 1 : ars,
                                     packed ? GEMM_MR : acs, pb + j0 * kc, c + (i0 + i) * ldc + n0 + j0, ldc, mr,
                                     nc - j0 < GEMM_NR ? nc - j0 : GEMM_NR, accumulate || p0 > 0);
                    }
            }
        }
    }
    return 0;
}
