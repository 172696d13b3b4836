#include <immintrin.h>
#include <stdint.h>

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
