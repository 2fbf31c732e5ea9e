"""A compiled CPU kernel: the charge sums and maps of ChargeLayout, and the tracker's per-neuron step.

Torch's CPU ops evaluate one product ``X ⊙ Y`` per op: each product reads both factors and
writes and reads back a temporary, so the five products of a tracked step read every parameter,
gradient and momentum buffer several times. This kernel evaluates all the products asked of one
tensor in one pass over it: each factor is read from memory once, the products are formed in
registers and summed in float64 (the product of two float32 numbers is exact in float64, so a
float32 tensor's sums carry only float64 rounding). It is plain C, compiled on first use with the
system's C compiler (``$CC``, else ``cc``) into a per-user cache, and called through ``ctypes``,
which releases the GIL during the call; where no compiler is found or the build fails,
``ChargeLayout`` uses torch ops instead, with the same results to float32 rounding.

Set ``NLD_CALLBACKS_KERNEL=0`` to never use it, ``NLD_CALLBACKS_CACHE`` to choose its cache folder
(default ``~/.cache/nld_callbacks``).

One call of ``nld_run(n_jobs, ptrs, jobs, res)`` runs a table of jobs (int64 entries). A job is
``A, J, C, K, dtype, per, per0``, then ``K`` indices into ``ptrs`` (the addresses of its tensors
``t_0 … t_{K-1}``, 1 ≤ K ≤ 4, all float32 (``dtype`` 0) or all float64 (1), contiguous, viewed as
``(A, J, C)``), then two lists of ``K(K+1)/2 + K`` output offsets into ``res`` (−1: not wanted),
one per sum in the order ``t_0 t_0, t_0 t_1, …, t_0 t_{K-1}, t_1 t_1, …, t_{K-1} t_{K-1}, t_0, …,
t_{K-1}``: the first list for the sums over ``i`` and ``c`` (one per ``j``), the second for the
sums over ``j`` and ``c`` (one per ``i``; the rows and columns of one matrix in one read):

    res[out + j // per]   = Σ_{j' : j' // per = j // per}   Σ_{i, c} t_a[i, j', c] · t_b[i, j', c]
    res[out0 + i // per0] = Σ_{i' : i' // per0 = i // per0} Σ_{j, c} t_a[i', j, c] · t_b[i', j, c]

(a linear sum without the second factor). ``dtype`` 2 or 3 (float32 or float64) marks a job whose
last tensor is derived, Adam's update direction (1 to 3 tensors): its address is an ``adam_u``
record (the addresses of m, v and of the float64 bias corrections, and ε), and the kernel forms
u = (m / bc1) / (sqrt(v) / bc2s + ε) of each entry as it reads m and v, in the tensors' dtype with
IEEE square roots and divisions; u is never stored. Every tensor of a job is read once, whatever
the number of sums. The float64 arithmetic is the costly part: the linear sums, the second
reduction and the last tensor's square are skipped where no output wants them (the layout puts a
tensor whose square is not asked for last). Each product is added with one fused multiply-add (the
product exact, one rounding per addition), and each sum runs in a fixed order (8 lanes along ``c``
for rows of 8 or more entries, 4 on CPUs without AVX-512, then ``i`` in order; a column sum takes
the rows in groups of four a quarter of the tensor apart, which read faster than neighbouring
rows): the same inputs give the same bits, in every job that asks for the sum.

Two more calls map float64 rows for the layout (each row read where it is, nothing stacked):
``nld_map`` adds each member's run of per-reduction values, times its sign, onto its run of group
neurons (members in order, onto zeros), and ``nld_runs`` sums, or takes the maximum or minimum of,
each group's run of neurons (the sum with four running sums, added pairwise; a NaN gives NaN).

Four calls take the per-neuron work of :class:`~nld_callbacks.tracker.NoetherTracker` off torch ops
(the hundred-odd small ops of a step cost more in dispatch than in arithmetic). ``nld_terms``
evaluates a step's exact identities (SGD, heavy ball, Nesterov, SGDW, and Adam's where its update
is formed in the read) and adds them onto the group neurons as ``nld_map`` does, the per-reduction
values never stored. ``nld_step`` is the rest of a tracked step: the residuals, the continuous
law's step and the equilibrium averages of every group neuron, the step's validity, and on a valid
step the held rows and the accumulators. ``nld_derive`` and ``nld_last`` make the last-value rows
of a logging step from the held state (the arcsine of the angular update is left to torch). They
run the torch ops' operations in their order, without contraction, so they give the torch ops'
bits; the one exception is the square root, which here is the IEEE one, where torch's float64
square root on the CPU (SLEEF's, within 0.5001 ulp) is one ulp off on about 1% of the entries.
``nld_terms`` and ``nld_step`` copy their rows to the stack in blocks of 64 first: read in place,
their dozens of rows (often a multiple of 4 KiB apart) would evict each other's cache lines.

``nld_run_parts(n_parts, n_jobs, tables, ptrs, res)`` runs ``n_parts`` such tables at once, one per
OpenMP thread. The kernel is built with OpenMP where torch itself runs on GNU ``libgomp`` (its
Linux wheels) and the compiler links that runtime: the threads are then torch's own. Elsewhere it
is built without, and the tables run one after the other. :class:`~nld_callbacks.charges.ChargeLayout`
shares a large call's jobs out over ``torch.get_num_threads()`` threads, each job whole (no two
write one sum): the sums do not depend on the number of threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["load"]

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

/* W lanes of doubles per vector, one vector per register: 8 of 32 registers with AVX-512, else 4
   of 16 (AVX2; wider vectors there would spill the sums to memory) */
#ifdef __AVX512F__
#define W 8
#define VREGS 32
#else
#define W 4
#define VREGS 16
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef double vd __attribute__((vector_size(8 * W)));

#define INLINE static inline __attribute__((always_inline))
#define QMAX 14 /* sums of one job at most: 10 products and 4 linear sums of 4 tensors */
#define JB 1024 /* outputs of a column reduction accumulated per sweep */
/* rows of the tensor added to them per visit: four, two or one, as many as keep the visit's sums
   (QU of them per row and the columns', QU = the job's products and linear sums) and the K entries
   in the vector registers */
#define QU(K, L, S) ((K) * ((K) + 1) / 2 - (S) + (L) * (K))
#define NBROWS(K, L, R, S) (!(R) || 5 * QU(K, L, S) + (K) <= VREGS ? 4 : 3 * QU(K, L, S) + (K) <= VREGS ? 2 : 1)

INLINE vd ldv(const void *t, int64_t e, int dbl) {
    if (dbl) { vd d; memcpy(&d, (const double *)t + e, sizeof d); return d; }
#ifdef __AVX512F__ /* one 8-lane convert: GCC splits __builtin_convertvector into two */
    return (vd)_mm512_cvtps_pd(_mm256_loadu_ps((const float *)t + e));
#else
    vf f; memcpy(&f, (const float *)t + e, sizeof f); return __builtin_convertvector(f, vd);
#endif
}
INLINE double ld1(const void *t, int64_t e, int dbl) { return dbl ? ((const double *)t)[e] : ((const float *)t)[e]; }

/* a derived tensor, Adam's update direction u = m̂ / (sqrt(v̂) + ε): per entry
   u = (m / bc1) / (sqrt(v) / bc2s + ε), in the tensors' dtype and in torch's order of operations
   (the float64 constants rounded to float32 first for float32 tensors); bc1 and bc2s are read
   where the caller made them (float64 numbers: the bias corrections of the tensor's step) */
typedef struct { const void *m, *v; const double *bc1, *bc2s; double eps; } adam_u;
/* the numbers of one job's derived tensor, read once per job (and rounded once for float32) */
typedef struct { const void *m, *v; double bc1, bc2s, eps; float bc1f, bc2sf, epsf; } adam_job;
INLINE adam_job adam_of(const adam_u *a) {
    const double bc1 = *a->bc1, bc2s = *a->bc2s;
    return (adam_job){a->m, a->v, bc1, bc2s, a->eps, (float)bc1, (float)bc2s, (float)a->eps};
}
INLINE vf vsqrtf(vf x) {
#if defined(__AVX512F__)
    return (vf)_mm256_sqrt_ps((__m256)x);
#elif defined(__AVX__)
    return (vf)_mm_sqrt_ps((__m128)x);
#else
    for (int l = 0; l < W; l++) x[l] = __builtin_sqrtf(x[l]);
    return x;
#endif
}
INLINE vd vsqrtd(vd x) {
#if defined(__AVX512F__)
    return (vd)_mm512_sqrt_pd((__m512d)x);
#elif defined(__AVX__)
    return (vd)_mm256_sqrt_pd((__m256d)x);
#else
    for (int l = 0; l < W; l++) x[l] = __builtin_sqrt(x[l]);
    return x;
#endif
}
INLINE vd ldu(const void *p, int64_t e, int dbl) {
    const adam_job *a = (const adam_job *)p;
    if (dbl) {
        const vd m = ldv(a->m, e, 1), v = ldv(a->v, e, 1);
        return (m / a->bc1) / (vsqrtd(v) / a->bc2s + a->eps);
    }
    vf m, v;
    memcpy(&m, (const float *)a->m + e, sizeof m);
    memcpy(&v, (const float *)a->v + e, sizeof v);
    const vf u = (m / a->bc1f) / (vsqrtf(v) / a->bc2sf + a->epsf);
#ifdef __AVX512F__
    return (vd)_mm512_cvtps_pd((__m256)u);
#else
    return __builtin_convertvector(u, vd);
#endif
}
INLINE double ld1u(const void *p, int64_t e, int dbl) {
    const adam_job *a = (const adam_job *)p;
    if (dbl) {
        const double m = ((const double *)a->m)[e], v = ((const double *)a->v)[e];
        return (m / a->bc1) / (__builtin_sqrt(v) / a->bc2s + a->eps);
    }
    const float m = ((const float *)a->m)[e], v = ((const float *)a->v)[e];
    return (m / a->bc1f) / (__builtin_sqrtf(v) / a->bc2sf + a->epsf);
}
/* tensor k of K: bit 0 of `dbl` the dtype (float64), bit 1 a derived last tensor */
INLINE vd ldk(const void *const *t, int k, int K, int64_t e, int dbl) {
    return (dbl & 2) && k == K - 1 ? ldu(t[k], e, dbl & 1) : ldv(t[k], e, dbl & 1);
}
INLINE double ld1k(const void *const *t, int k, int K, int64_t e, int dbl) {
    return (dbl & 2) && k == K - 1 ? ld1u(t[k], e, dbl & 1) : ld1(t[k], e, dbl & 1);
}
INLINE vd ldd(const double *p) { vd d; memcpy(&d, p, sizeof d); return d; }
INLINE void stv(double *p, vd d) { memcpy(p, &d, sizeof d); }
/* c + a·b with one rounding, written out: the same bits in every specialised copy (the build
   turns implicit contraction off) */
INLINE vd fmav(vd a, vd b, vd c) {
#if defined(__AVX512F__)
    return (vd)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(__FMA__)
    return (vd)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
    vd r;
    for (int l = 0; l < W; l++) r[l] = __builtin_fma(a[l], b[l], c[l]);
    return r;
#endif
}
INLINE double fma1(double a, double b, double c) { return __builtin_fma(a, b, c); }
#define MADD(A, B, C) _Generic((C), vd: fmav, default: fma1)(A, B, C)
INLINE double hsum(vd a) { double s = 0; for (int l = 0; l < W; l++) s += a[l]; return s; }

/* the job's sums of one entry (or W lanes of entries): products a <= b (if S, not the last
   tensor's square), then (if L) the entries */
#define SUMS(ACC, F)                                                                        \
    do {                                                                                    \
        int q_ = 0;                                                                         \
        for (int a = 0; a < K; a++)                                                         \
            for (int b = a; b < K; b++, q_++)                                               \
                if (!(S && a == K - 1 && b == K - 1)) ACC[q_] = MADD(F[a], F[b], ACC[q_]);  \
        for (int a = 0; a < L * K; a++) ACC[q_++] += F[a];                                  \
    } while (0)

/* NB rows ri[0], …, ri[NB − 1] of a column job, columns j0 … j0 + n − 1: their sums onto tmp[q][j − j0]
   (W lanes along j where C == 1, nw of them; the rows in turn) and, if R, onto out0[q] + i / per0 */
INLINE void cols(const void *const *t, double (*tmp)[JB], double *res, const int64_t *out0, const int64_t *ri,
                 const int64_t J, const int64_t j0, const int64_t n, const int64_t nw, const int64_t C,
                 const int64_t per0, const int NB, const int K, const int L, const int R, const int S,
                 const int dbl) {
    const int Q = K * (K + 1) / 2 + L * K;
    vd racc[NB][QMAX];
    double rtail[NB][QMAX];
    for (int r = 0; r < NB; r++) for (int q = 0; q < Q; q++) { racc[r][q] = (vd){0}; rtail[r][q] = 0; }
    for (int64_t jj = 0; jj < nw; jj += W) {
        vd acc[QMAX];
        for (int q = 0; q < Q; q++) acc[q] = ldd(tmp[q] + jj);
        for (int r = 0; r < NB; r++) {
            vd f[4];
            for (int k = 0; k < K; k++) f[k] = ldk(t, k, K, ri[r] * J + j0 + jj, dbl);
            SUMS(acc, f);
            if (R) SUMS(racc[r], f);
        }
        for (int q = 0; q < Q; q++) stv(tmp[q] + jj, acc[q]);
    }
    for (int64_t jj = nw; jj < n; jj++)
        for (int r = 0; r < NB; r++)
            for (int64_t c = 0; c < C; c++) {
                double f[4], p[QMAX];
                for (int k = 0; k < K; k++) f[k] = ld1k(t, k, K, (ri[r] * J + j0 + jj) * C + c, dbl);
                for (int q = 0; q < Q; q++) p[q] = 0;
                SUMS(p, f);
                for (int q = 0; q < Q; q++) { tmp[q][jj] += p[q]; rtail[r][q] += p[q]; }
            }
    if (R)
        for (int r = 0; r < NB; r++)
            for (int q = 0; q < Q; q++)
                if (out0[q] >= 0) res[out0[q] + ri[r] / per0] += hsum(racc[r][q]) + rtail[r][q];
}

/* a single row of a column job left over by its visits: one copy for every kind of job (it is a
   small part of the work, and a specialised copy per kind would double the build time) */
static __attribute__((noinline)) void col1(const void *const *t, double (*tmp)[JB], double *res,
                                           const int64_t *out0, const int64_t i, const int64_t J,
                                           const int64_t j0, const int64_t n, const int64_t nw, const int64_t C,
                                           const int64_t per0, const int K, const int L, const int R, const int S,
                                           const int dbl) {
    cols(t, tmp, res, out0, &i, J, j0, n, nw, C, per0, 1, K, L, R, S, dbl);
}

/* One job: K tensors (float32, or float64 if dbl) viewed as (A, J, C); their products t_a t_b
   (a <= b; if S, not t_{K-1} t_{K-1}) and, if L, the tensors themselves, summed onto
   out[q] + j / per (every i, c) and, if R, onto out0[q] + i / per0 (every j, c). */
INLINE void job(const int64_t *ptrs, const int64_t *jb, double *res, const int K, const int L, const int R,
                const int S, const int dbl) {
    const int Q = K * (K + 1) / 2 + L * K, QT = K * (K + 1) / 2 + K;
    const int64_t A = jb[0], J = jb[1], C = jb[2], per = jb[5], per0 = jb[6];
    const int64_t *out = jb + 7 + K, *out0 = out + QT;
    const int NB = NBROWS(K, L, R, S);
    const void *t[4];
    for (int k = 0; k < K; k++) t[k] = (const void *)ptrs[jb[7 + k]];
    adam_job derived;
    if (dbl & 2) { /* the derived tensor's numbers, once for the job */
        derived = adam_of((const adam_u *)t[K - 1]);
        t[K - 1] = &derived;
    }
    for (int q = 0; q < Q; q++) {
        if (out[q] >= 0) memset(res + out[q], 0, sizeof(double) * (J / per));
        if (R && out0[q] >= 0) memset(res + out0[q], 0, sizeof(double) * (A / per0));
    }
    if (C >= 8) {
        /* rows of C entries: each (i, j) row read once, every sum in W lanes */
        const int64_t CW = C & ~(int64_t)(W - 1);
        for (int64_t i = 0; i < A; i++)
            for (int64_t j = 0; j < J; j++) {
                const int64_t base = (i * J + j) * C;
                vd acc[QMAX];
                double tail[QMAX];
                for (int q = 0; q < Q; q++) { acc[q] = (vd){0}; tail[q] = 0; }
                for (int64_t c = 0; c < CW; c += W) {
                    vd f[4];
                    for (int k = 0; k < K; k++) f[k] = ldk(t, k, K, base + c, dbl);
                    SUMS(acc, f);
                }
                for (int64_t c = CW; c < C; c++) {
                    double f[4];
                    for (int k = 0; k < K; k++) f[k] = ld1k(t, k, K, base + c, dbl);
                    SUMS(tail, f);
                }
                for (int q = 0; q < Q; q++) {
                    const double v = hsum(acc[q]) + tail[q];
                    if (out[q] >= 0) res[out[q] + j / per] += v;
                    if (R && out0[q] >= 0) res[out0[q] + i / per0] += v;
                }
            }
        return;
    }
    /* columns (C < 8): JB outputs j at a time, NB rows i per visit; with R the rows' sums on the way
       (W lanes along j, then the JB-blocks in order). A whole visit of NB rows is one call with NB
       constant: the sums stay in registers (a partial visit would spill them). The rows go in one
       order, whatever NB: groups of four rows a quarter of the tensor apart, k, k + h, k + 2h,
       k + 3h (h = ⌈A/4⌉, rows past A left out) for k = 0 … h − 1. Rows that far apart are read
       faster than neighbouring ones: measured on 1024 × 1024 float32 matrices (θ, v, g; rows and
       columns), 0.62-0.70 ns an entry against 0.96-1.04 for two neighbouring rows a visit. Where
       rows share an output (per0 > 1) they go in order, so that output's sum has one order too. */
    double tmp[QMAX][JB]; /* 112 KiB of stack (a failed malloc here would have left the sums 0) */
    for (int64_t j0 = 0; j0 < J; j0 += JB) {
        const int64_t n = j0 + JB < J ? JB : J - j0;
        const int64_t nw = C == 1 ? n & ~(int64_t)(W - 1) : 0;
        for (int q = 0; q < Q; q++) memset(tmp[q], 0, sizeof(double) * n);
        const int apart = per0 == 1; /* else the rows in order, four a group */
        const int64_t h = (A + 3) / 4, step = apart ? h : 1;
        for (int64_t grp = 0; grp < h; grp++) {
            const int64_t k = apart ? grp : 4 * grp;
            int64_t ri[4];
            int m = 0;
            for (int g = 0; g < 4; g++)
                if (k + g * step < A) ri[m++] = k + g * step;
            int v = 0;
            for (; v + NB <= m; v += NB) cols(t, tmp, res, out0, ri + v, J, j0, n, nw, C, per0, NB, K, L, R, S, dbl);
            for (; v < m; v++) col1(t, tmp, res, out0, ri[v], J, j0, n, nw, C, per0, K, L, R, S, dbl);
        }
        /* each column onto its output, in order (the output's place counted, not divided out: a
           division per column cost more than the block's sums on a short job) */
        for (int q = 0; q < Q; q++) {
            if (out[q] < 0) continue;
            double *o = res + out[q] + j0 / per;
            for (int64_t jj = 0, k = j0 % per; jj < n; jj++) {
                *o += tmp[q][jj];
                if (++k == per) { k = 0; o++; }
            }
        }
    }
}

/* one specialised copy per (dtype, R, L, S, K): the sums' loops unrolled, their accumulators in
   registers (S only where K is 2 or 3, the products of θ, g and v: elsewhere the square is formed
   and not written) */
typedef void (*job_fn)(const int64_t *, const int64_t *, double *);
#define FN(D, R, L, S, K) \
    static void job_##D##R##L##S##K(const int64_t *p, const int64_t *j, double *r) { job(p, j, r, K, L, R, S, D); }
#define FNS_K(D, R, L, S) FN(D, R, L, S, 1) FN(D, R, L, S, 2) FN(D, R, L, S, 3) FN(D, R, L, S, 4)
#define FNS_S(D, R, L) FNS_K(D, R, L, 0) FN(D, R, L, 1, 2) FN(D, R, L, 1, 3)
#define FNS(D) FNS_S(D, 0, 0) FNS_S(D, 0, 1) FNS_S(D, 1, 0) FNS_S(D, 1, 1)
FNS(0)
FNS(1)
/* jobs whose last tensor is derived (D = 2, 3: float32, float64): 1 to 3 tensors, every square formed */
#define FNS_U(D, R, L) FN(D, R, L, 0, 1) FN(D, R, L, 0, 2) FN(D, R, L, 0, 3)
FNS_U(2, 0, 0) FNS_U(2, 0, 1) FNS_U(2, 1, 0) FNS_U(2, 1, 1)
FNS_U(3, 0, 0) FNS_U(3, 0, 1) FNS_U(3, 1, 0) FNS_U(3, 1, 1)
#define ROW(D, R, L, S) {job_##D##R##L##0##1, job_##D##R##L##S##2, job_##D##R##L##S##3, job_##D##R##L##0##4}
#define ROWS(D, R, L) {ROW(D, R, L, 0), ROW(D, R, L, 1)}
#define ROW_U(D, R, L) {{job_##D##R##L##0##1, job_##D##R##L##0##2, job_##D##R##L##0##3, 0}, {0, 0, 0, 0}}
static const job_fn JOBS[4][2][2][2][4] = {
    {{ROWS(0, 0, 0), ROWS(0, 0, 1)}, {ROWS(0, 1, 0), ROWS(0, 1, 1)}},
    {{ROWS(1, 0, 0), ROWS(1, 0, 1)}, {ROWS(1, 1, 0), ROWS(1, 1, 1)}},
    {{ROW_U(2, 0, 0), ROW_U(2, 0, 1)}, {ROW_U(2, 1, 0), ROW_U(2, 1, 1)}},
    {{ROW_U(3, 0, 0), ROW_U(3, 0, 1)}, {ROW_U(3, 1, 0), ROW_U(3, 1, 1)}}};

/* every job of a table; returns the number of table entries read */
int64_t nld_run(int64_t n_jobs, const int64_t *ptrs, const int64_t *jobs, double *res) {
    const int64_t *jb = jobs;
    for (int64_t n = 0; n < n_jobs; n++) {
        const int64_t K = jb[3], QT = K * (K + 1) / 2 + K;
        const int64_t *out = jb + 7 + K, *out0 = out + QT;
        /* the linear sums, the second reduction and the last tensor's square only where wanted */
        const int64_t last = K * (K + 1) / 2 - 1;
        int linear = 0, rows = 0, square = out[last] >= 0 || out0[last] >= 0;
        for (int64_t q = 0; q < QT; q++) {
            linear |= q > last && (out[q] >= 0 || out0[q] >= 0);
            rows |= out0[q] >= 0;
        }
        /* (a derived tensor's square is formed whether or not it is written) */
        JOBS[jb[4]][rows][linear][jb[4] < 2 && !square][K - 1](ptrs, jb, res);
        jb += 7 + K + 2 * QT;
    }
    return jb - jobs;
}

/* the layout's map of float64 rows from reductions to group neurons: out[r] = 0, then for each run
   (d, a, n) in turn out[r][d + i] += s · x_r[a + i] for i < n, s its sign (a member's reductions land
   on a run of its group's neurons), for the n_rows input rows at the addresses rows[r] */
void nld_map(int64_t n_rows, const int64_t *rows, int64_t n_out, int64_t n_runs, const int64_t *runs,
             const double *sign, double *out) {
    for (int64_t r = 0; r < n_rows; r++) {
        const double *x = (const double *)rows[r];
        double *restrict o = out + r * n_out;
        memset(o, 0, n_out * sizeof(double));
        for (int64_t q = 0; q < n_runs; q++) {
            const double *restrict xs = x + runs[3 * q + 1];
            double *restrict os = o + runs[3 * q];
            const double s = sign[q];
            for (int64_t i = 0; i < runs[3 * q + 2]; i++) os[i] += s * xs[i];
        }
    }
}

/* the sum of x[i] for i in [i, e): four running sums over i mod 4, added pairwise, then the rest in
   order */
INLINE double run_sum(const double *x, int64_t i, int64_t e) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (; i + 4 <= e; i += 4) {
        s0 += x[i];
        s1 += x[i + 1];
        s2 += x[i + 2];
        s3 += x[i + 3];
    }
    double v = (s0 + s1) + (s2 + s3);
    for (; i < e; i++) v += x[i];
    return v;
}
/* the maximum (op 1) or minimum (op 2) of x[i] for i in [i, e): a larger (smaller) entry or a NaN
   replaces the running value, nothing replaces a NaN; −inf (+inf) where the run is empty */
INLINE double run_extreme(int64_t op, const double *x, int64_t i, int64_t e) {
    double v = op == 1 ? -__builtin_inf() : __builtin_inf();
    for (; i < e; i++)
        if (v == v && (op == 1 ? !(x[i] <= v) : !(x[i] >= v))) v = x[i];
    return v;
}

/* per run [bounds[g], bounds[g + 1]) of each float64 row: its sum (op 0, run_sum), maximum (1) or
   minimum (2, run_extreme); a NaN gives NaN, an empty run 0, −inf or +inf */
void nld_runs(int64_t op, int64_t n_rows, const int64_t *rows, int64_t n_runs, const int64_t *bounds,
              double *out) {
    for (int64_t r = 0; r < n_rows; r++) {
        const double *x = (const double *)rows[r];
        for (int64_t g = 0; g < n_runs; g++)
            out[r * n_runs + g] = op == 0 ? run_sum(x, bounds[g], bounds[g + 1])
                                          : run_extreme(op, x, bounds[g], bounds[g + 1]);
    }
}

/* One tracked step's per-neuron work, as NoetherTracker._accumulate does it with torch ops and in
   the same order of operations (the same bits, square roots the IEEE ones): the step's residuals,
   the continuous law's step and the equilibrium averages of each group neuron, whether the step is
   valid (every observed change and unexplained residual finite), and on a valid step the held rows
   and the accumulators written.

   in[k]: the address of input row k (enum below; 0: absent), stride[k]: 0 where one number serves
   every neuron, else 1; the four boolean rows are bytes. flags: has_linear, parts (1 or 2: per part
   7 rows, the quadratic charges' then the linear ones'), has_quad, has_UU, has_metric, has_abs1,
   fresh. out: the addresses of N_OUT rows of n (enum below). On a valid step each commit triple
   (dst, src, stride) copies a row into the held state, and the accumulators (n_groups per row)
   take the step: rows acc_rows[0..2] the maxima of |e|, |b|, |e| (fmax), acc_rows[3..5] the sums of
   the observed, symmetric and breaking changes (run_sum), acc_rows[6..11] the constants' means and
   counts (from cmeans, 6 rows); on an invalid one acc_rows[12] (the invalid steps) counts it.
   Returns the step's validity. */
enum { I_Q0, I_Q1, I_T0, I_T1, I_PART0, I_PART1 = I_PART0 + 7, I_DRIVE = I_PART1 + 7, I_EQ_DRIVE, I_UU, I_M0, I_M1,
       I_ROUND, I_ROUND_LIN, I_COUNT, I_NUMEL_SQ, I_ALPHA, I_PROP, I_ON = I_PROP + 6, I_NLD, I_NLD_RATE, I_EMA_X,
       I_EMA_W, I_LINEAR, I_SCALE, I_ADAPTIVE, I_EQ_NUMEL, N_IN };
/* a part's rows: observed, symmetric, breaking, force, coefficient, terms' scale, |Δθ|² */
#define SB 64 /* neurons per block */
/* entries off .. off + m − 1 of an input row into a block's row: copied (stride 1), the one number
   repeated (stride 0), or `absent` where the row is absent (src 0) */
INLINE void block_row(double *dst, const double *src, int64_t stride, int64_t off, int64_t m, double absent) {
    if (src && stride) memcpy(dst, src + off, m * sizeof(double));
    else for (int64_t j = 0; j < m; j++) dst[j] = src ? src[0] : absent;
}
enum { P_OBS, P_SYM, P_BRK, P_FORCE, P_COEFF, P_TERMS, P_STEP_SQ };
enum { O_Q0, O_Q1, O_PRED, O_TOL, O_STEP_SQ, O_NLD, O_NLD_RATE, O_EMA_X, O_EMA_W, O_RADIAL, O_METRIC_CHARGE,
       O_METRIC_PRED, O_BRK, O_R, O_B, O_E, O_OBS, O_SYM, N_OUT };
int64_t nld_step(int64_t n, const int64_t *flags, const int64_t *in, const int64_t *stride, const int64_t *out,
                 int64_t n_commit, const int64_t *commit, double *acc, int64_t n_groups, const int64_t *bounds,
                 const int64_t *acc_rows, const double *cmeans) {
    const int has_linear = flags[0], parts = flags[1], has_quad = flags[2], has_uu = flags[3],
              has_metric = flags[4], has_abs1 = flags[5], fresh = flags[6];
    const double nan = __builtin_nan("");
    int ok = 1;
    /* in blocks of SB neurons copied to the stack first (see the module's docstring) */
    for (int64_t i0 = 0; i0 < n; i0 += SB) {
        const int64_t m = n - i0 < SB ? n - i0 : SB;
        double x[I_LINEAR][SB], o[N_OUT][SB];
        unsigned char f[N_IN - I_LINEAR][SB];
        for (int k = 0; k < I_LINEAR; k++) block_row(x[k], (const double *)in[k], stride[k], i0, m, 0.0);
        for (int k = I_LINEAR; k < N_IN; k++) {
            const unsigned char *src = (const unsigned char *)in[k];
            if (!src) memset(f[k - I_LINEAR], 0, m);
            else if (stride[k]) memcpy(f[k - I_LINEAR], src + i0, m);
            else memset(f[k - I_LINEAR], src[0], m);
        }
        /* (branch-free, so that it vectorises: both sides of each choice are formed) */
        for (int64_t i = 0; i < m; i++) {
#define X(k) x[k][i]
#define B(k) (f[(k) - I_LINEAR][i] != 0)
            const int lin = B(I_LINEAR), lin_q = has_linear & lin, lin_part = (parts == 2) & lin;
            const double q0 = lin_q ? X(I_T0) : X(I_Q0), q1 = lin_q ? X(I_T1) : X(I_Q1);
#define PART(r) (lin_part ? X(I_PART1 + (r)) : X(I_PART0 + (r)))
            const double obs = PART(P_OBS), force = PART(P_FORCE), coeff = PART(P_COEFF), terms = PART(P_TERMS);
            const double rounding = has_abs1 & lin ? X(I_ROUND_LIN) : X(I_ROUND);
            double u = q0 * X(I_UU);
            u = u < 0 ? 0.0 : u; /* clamp_min(0): a NaN stays */
            const double radial_any = (has_quad ? X(I_PART0 + P_FORCE) : nan) / __builtin_sqrt(u);
            const double radial = has_uu & B(I_ADAPTIVE) & B(I_SCALE) ? radial_any : nan;
            const double metric_charge = has_metric & !lin ? X(I_M0) : nan;
            const double metric_pred = has_metric & !lin ? X(I_M1) : nan;
            const double drive = lin ? 0.0 : X(I_DRIVE);
            const double eq_x = B(I_EQ_NUMEL) ? X(I_NUMEL_SQ) : q0 * X(I_EQ_DRIVE);
            /* mixed coefficients in a group: only Σ s_i R_i = 0 is a symmetry, the rest a real drift */
            const double brk = -(coeff / X(I_COUNT)) * force;
            const double sym = PART(P_SYM) + (PART(P_BRK) - brk);
            const double tol = terms + 4.0 * rounding, D = tol > 0 ? tol : 1.0;
            const double r = (obs - sym) / D, b = brk / D, e = r - b;
            const int on = X(I_ON) > 0;
            const double Q = on ? X(I_NLD) : q0, dQ = on ? X(I_NLD_RATE) : 0.0;
            const double Qn = X(I_PROP) * Q + X(I_PROP + 1) * dQ + X(I_PROP + 2) * drive;
            const double dQn = X(I_PROP + 3) * Q + X(I_PROP + 4) * dQ + X(I_PROP + 5) * drive;
            const double alpha = X(I_ALPHA), ema_x = X(I_EMA_X), ema_w = X(I_EMA_W);
            o[O_Q0][i] = q0, o[O_Q1][i] = q1, o[O_PRED][i] = q0 + sym, o[O_TOL][i] = tol;
            o[O_STEP_SQ][i] = PART(P_STEP_SQ);
            const int observed = !fresh & !on; /* started mid-run: Q'(t0) the observed step */
            o[O_NLD][i] = observed ? q1 : Qn, o[O_NLD_RATE][i] = observed ? q1 - q0 : dQn;
            o[O_EMA_X][i] = ema_x + alpha * (eq_x - ema_x), o[O_EMA_W][i] = ema_w + alpha * (1.0 - ema_w);
            o[O_RADIAL][i] = radial, o[O_METRIC_CHARGE][i] = metric_charge, o[O_METRIC_PRED][i] = metric_pred;
            o[O_BRK][i] = brk, o[O_R][i] = r, o[O_B][i] = b, o[O_E][i] = e, o[O_OBS][i] = obs, o[O_SYM][i] = sym;
            ok &= (obs - obs == 0) & (e - e == 0); /* x − x is 0 for every finite x */
#undef PART
#undef X
#undef B
        }
        for (int k = 0; k < N_OUT; k++) memcpy((double *)out[k] + i0, o[k], m * sizeof(double));
    }
    if (!ok) {
        for (int64_t g = 0; g < n_groups; g++) acc[acc_rows[12] * n_groups + g] += 1.0;
        return 0;
    }
    for (int64_t c = 0; c < n_commit; c++) {
        double *dst = (double *)commit[3 * c];
        const double *src = (const double *)commit[3 * c + 1];
        const int64_t st = commit[3 * c + 2];
        for (int64_t i = 0; i < n; i++) dst[i] = src[i * st];
    }
    const double *e = (const double *)out[O_E], *b = (const double *)out[O_B];
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t i0 = bounds[g], i1 = bounds[g + 1];
        double me = -__builtin_inf(), mb = -__builtin_inf();
        for (int64_t i = i0; i < i1; i++) {
            const double ae = __builtin_fabs(e[i]), ab = __builtin_fabs(b[i]);
            if (me == me && !(ae <= me)) me = ae;
            if (mb == mb && !(ab <= mb)) mb = ab;
        }
        const double ext[3] = {me, mb, me};
        for (int k = 0; k < 3; k++) {
            double *a = acc + acc_rows[k] * n_groups + g;
            *a = __builtin_fmax(*a, ext[k]);
        }
        const int sums[3] = {O_OBS, O_SYM, O_BRK};
        for (int k = 0; k < 3; k++)
            acc[acc_rows[3 + k] * n_groups + g] += run_sum((const double *)out[sums[k]], i0, i1);
        for (int k = 0; k < 6; k++) acc[acc_rows[6 + k] * n_groups + g] = cmeans[k * n_groups + g];
    }
    return 1;
}

/* One step's exact identities per reduction (theory.sgd_step, heavy_ball_step, nesterov_step,
   sgdw_step, adaptive_step and their linear forms, as NoetherTracker._terms and _to_neurons
   assemble them), mapped onto the group neurons as nld_map maps them: the same operations in the
   same order as the torch ops and the map, the same bits; the per-reduction rows are never stored.
   in[k] (enum below; 0: absent, read as 0, the sign as 1) with stride[k] (0: one number for every
   reduction). flags: has_quad, has_linear, the one family's code (SGD 0, heavy ball 1, Nesterov 2,
   SGDW 3, an adaptive rule 4: B(θ, u), B(u, u) and ⟨c, u⟩ in place of the gradient's products;
   −1: per reduction, the row FAM), has_uu (B(u, u) mapped after the drives). runs, sign, usign: the
   layout's map (nld_map) with its signed and unsigned signs. signed_out: Q_t, Q_{t+1} [, T_t,
   T_{t+1}], per part (quadratic, then linear) the observed, symmetric and breaking changes and the
   force, then the drive and the equilibrium drive [, B(u, u)]; unsigned_out: per part the
   coefficient, the terms' scale and |Δθ|², then the rounding floors u·Q_t [and u·Σ|θ_k|]; rows of
   n_out neurons. */
enum { T_Q0, T_Q1, T_P0, T_X, T_G, T_Y, T_K, T_Z, T_T0, T_T1, T_S0, T_SG, T_L1, T_A1, T_UNIT, T_LR, T_WD, T_MOM, T_C,
       T_SIGN, T_FAM, T_U, T_UU, T_DECAY, T_N_IN };
/* the identities of m reductions of one block (x: the inputs, o: the outputs), specialised on the
   kind of step: with single >= 0 every branch is known and the loop vectorises */
INLINE void terms_block(int64_t m, double (*x)[SB], double (*o)[SB], const int single, const int has_quad,
                        const int has_linear) {
    const int parts = has_quad + has_linear;
    for (int64_t i = 0; i < m; i++) {
#define X(k) x[k][i]
        const int code = single >= 0 ? single : (int)X(T_FAM);
        const double eta = X(T_LR), lam = X(T_WD), beta = X(T_MOM), c = X(T_C), sign = X(T_SIGN);
        if (has_quad) {
            const double Q0 = X(T_Q0), Q1 = X(T_Q1), P0 = X(T_P0), G = X(T_G), K = X(T_K), Z = X(T_Z);
            const double Xs = sign * X(T_X), Y = sign * X(T_Y);
            double p0, p1, p2 = 0.0, R, coeff, step_sq;
            const int three = code >= 1 && code <= 3;
            if (code == 0) { /* SGD */
                const double a = 1.0 - eta * lam;
                R = (Xs + eta * G) / a;
                p0 = (a * a - 1.0) * Q0, p1 = eta * eta * G;
                coeff = 2.0 * eta * a;
                step_sq = eta * eta * (G + 2.0 * lam * R + lam * lam * Q0);
            } else if (code == 1) { /* heavy ball */
                R = Xs + eta * Y;
                p0 = -2.0 * eta * beta * P0, p1 = -2.0 * eta * c * lam * Q0, p2 = eta * eta * K;
                coeff = 2.0 * eta * c;
                step_sq = p2;
            } else if (code == 2) { /* Nesterov */
                const double a = 1.0 - eta * lam;
                R = (Xs + eta * G + eta * beta * Y) / a;
                const double uu = (G + beta * beta * K + lam * lam * Q1 + 2.0 * beta * Y + 2.0 * lam * Xs
                                   + 2.0 * beta * lam * Z) / (a * a);
                p0 = -2.0 * eta * beta * beta * P0, p1 = -2.0 * eta * (1.0 + beta * c) * lam * Q0;
                p2 = eta * eta * uu;
                coeff = 2.0 * eta * (1.0 + beta * c);
                step_sq = p2;
            } else if (code == 4) { /* Adam, AdamW, RMSprop: the update direction u */
                const double lam_d = X(T_DECAY), UU = X(T_UU);
                const double a = 1.0 - eta * lam_d;
                R = (X(T_U) + eta * UU) / a;
                p0 = (a * a - 1.0) * Q0, p1 = eta * eta * UU;
                coeff = 2.0 * eta * a;
                const double shrink = 1.0 - a;
                step_sq = shrink * shrink * Q0 + 2.0 * shrink * eta * R + p1;
            } else { /* SGDW */
                const double a = 1.0 - eta * lam;
                R = (Xs + eta * Y) / a;
                p0 = (a * a - 1.0) * Q0, p1 = -2.0 * eta * a * beta * P0, p2 = eta * eta * K;
                coeff = 2.0 * eta * a;
                const double shrink = 1.0 - a;
                step_sq = shrink * shrink * Q0 + 2.0 * shrink * eta * (beta * P0 + R) + p2;
            }
            o[0][i] = Q1 - Q0;
            o[1][i] = three ? p0 + p1 + p2 : p0 + p1;
            o[2][i] = -coeff * R, o[3][i] = R, o[4][i] = coeff;
            o[5][i] = three ? __builtin_fabs(p0) + __builtin_fabs(p1) + __builtin_fabs(p2)
                            : __builtin_fabs(p0) + __builtin_fabs(p1);
            o[6][i] = step_sq;
        }
        if (has_linear) {
            /* (an adaptive rule's force ⟨c, u⟩: u carries its own sign) */
            const double T0 = X(T_T0), T1 = X(T_T1), S0 = X(T_S0), Sg = code == 4 ? X(T_SG) : sign * X(T_SG);
            double sym, coeff;
            if (code == 0) sym = -eta * lam * T0, coeff = eta;
            else if (code == 1) sym = -eta * (beta * S0 + c * lam * T0), coeff = eta * c;
            else if (code == 2)
                sym = -eta * (lam * T0 + beta * (beta * S0 + c * lam * T0)), coeff = eta * (1.0 + beta * c);
            else if (code == 4) sym = -eta * X(T_DECAY) * T0, coeff = eta;
            else sym = -eta * lam * T0 - eta * beta * S0, coeff = eta;
            double(*const l)[SB] = o + 7 * has_quad;
            l[0][i] = T1 - T0, l[1][i] = sym, l[2][i] = -coeff * Sg, l[3][i] = Sg, l[4][i] = coeff;
            l[5][i] = eta * X(T_L1), l[6][i] = 0.0;
        }
        /* §2.2 drives: η²B(g, g) for SGD, 2η²B(v, v) for heavy ball; the equilibrium's B(g, g), B(v, v) */
        const double G = X(T_G), K = X(T_K);
        o[7 * parts][i] = code == 0 ? eta * eta * G : code == 1 ? 2.0 * eta * eta * K : 0.0;
        o[7 * parts + 1][i] = code == 0 ? G : code == 1 ? K : 0.0;
        o[7 * parts + 2][i] = X(T_UNIT) * X(T_Q0), o[7 * parts + 3][i] = X(T_UNIT) * X(T_A1);
#undef X
    }
}
#define TERMS_BLOCK(F, Q, L) \
    static void terms_##F##Q##L(int64_t m, double (*x)[SB], double (*o)[SB]) { terms_block(m, x, o, F, Q, L); }
#define TERMS_FAMILY(F) TERMS_BLOCK(F, 1, 0) TERMS_BLOCK(F, 0, 1) TERMS_BLOCK(F, 1, 1)
TERMS_FAMILY(0) TERMS_FAMILY(1) TERMS_FAMILY(2) TERMS_FAMILY(3) TERMS_FAMILY(4)
static void terms_any(int64_t m, double (*x)[SB], double (*o)[SB], int has_quad, int has_linear) {
    terms_block(m, x, o, -1, has_quad, has_linear);
}
typedef void (*terms_fn)(int64_t, double (*)[SB], double (*)[SB]);
#define TERMS_ROW(F) {terms_##F##10, terms_##F##01, terms_##F##11}
static const terms_fn TERMS[5][3] = {TERMS_ROW(0), TERMS_ROW(1), TERMS_ROW(2), TERMS_ROW(3), TERMS_ROW(4)};

void nld_terms(int64_t n_out, const int64_t *flags, const int64_t *in, const int64_t *stride, int64_t n_runs,
               const int64_t *runs, const double *sign, const double *usign, double *signed_out,
               double *unsigned_out) {
    const int has_quad = flags[0], has_linear = flags[1], single = flags[2], has_uu = flags[3];
    const int parts = has_quad + has_linear;
    const int n_signed = 2 + 2 * has_linear + 4 * parts + 2 + has_uu, n_unsigned = 3 * parts + 1 + has_linear;
    memset(signed_out, 0, n_signed * n_out * sizeof(double));
    memset(unsigned_out, 0, n_unsigned * n_out * sizeof(double));
    for (int64_t q = 0; q < n_runs; q++) {
        const int64_t d = runs[3 * q], a = runs[3 * q + 1], len = runs[3 * q + 2];
        const double s = sign[q], us = usign[q];
        for (int64_t i0 = 0; i0 < len; i0 += SB) {
            const int64_t m = len - i0 < SB ? len - i0 : SB;
            double x[T_N_IN][SB], o[7 * 2 + 4][SB];
            for (int k = 0; k < T_N_IN; k++)
                block_row(x[k], (const double *)in[k], stride[k], a + i0, m, k == T_SIGN ? 1.0 : 0.0);
            if (single >= 0) TERMS[single][has_quad + 2 * has_linear - 1](m, x, o);
            else terms_any(m, x, o, has_quad, has_linear);
            /* onto the group neurons, as nld_map adds them: out[d + i] += s · value */
            const double *sv[2 + 2 + 4 * 2 + 2 + 1], *uv[3 * 2 + 2];
            int ns = 0, nu = 0;
            sv[ns++] = x[T_Q0], sv[ns++] = x[T_Q1];
            if (has_linear) sv[ns++] = x[T_T0], sv[ns++] = x[T_T1];
            for (int k = 0; k < parts; k++) {
                for (int j = 0; j < 4; j++) sv[ns++] = o[7 * k + j];
                for (int j = 4; j < 7; j++) uv[nu++] = o[7 * k + j];
            }
            sv[ns++] = o[7 * parts], sv[ns++] = o[7 * parts + 1];
            if (has_uu) sv[ns++] = x[T_UU];
            uv[nu++] = o[7 * parts + 2];
            if (has_linear) uv[nu++] = o[7 * parts + 3];
            for (int r = 0; r < ns; r++) {
                double *restrict os = signed_out + r * n_out + d + i0;
                for (int64_t i = 0; i < m; i++) os[i] += s * sv[r][i];
            }
            for (int r = 0; r < nu; r++) {
                double *restrict os = unsigned_out + r * n_out + d + i0;
                for (int64_t i = 0; i < m; i++) os[i] += us * uv[r][i];
            }
        }
    }
}

/* The held state's derived rows (NoetherTracker._derived, torch's order of operations): per neuron
   out[0] the effective learning rate, out[1] the argument x of the angular update 2·asin(x) (NaN where
   it has none: the caller takes the arcsine, as torch does it), out[2] the equilibrium charge,
   out[3] the RMSProp accumulator. in: q0, q1, |Δθ|², adaptive, eff_factor, eq_coef, ema_x, ema_w,
   rmsprop (float64 rows) and scale (bytes); adaptive read only where has_radial. */
void nld_derive(int64_t n, const int64_t *in, int64_t has_radial, double *out) {
    const double *q0 = (const double *)in[0], *q1 = (const double *)in[1], *step_sq = (const double *)in[2],
                 *adaptive = (const double *)in[3], *eff_factor = (const double *)in[4],
                 *eq_coef = (const double *)in[5], *ema_x = (const double *)in[6], *ema_w = (const double *)in[7],
                 *rmsprop = (const double *)in[8];
    const unsigned char *scale = (const unsigned char *)in[9];
    const double nan = __builtin_nan(""), tiny = 2.2250738585072014e-308; /* float64's smallest normal */
    double *eff = out, *x = out + n, *qstar = out + 2 * n, *rms_acc = out + 3 * n;
    for (int64_t i = 0; i < n; i++) {
        const double a = q0[i], b = q1[i];
        const double n0 = __builtin_sqrt(a < 0 ? 0.0 : a), n1 = __builtin_sqrt(b < 0 ? 0.0 : b);
        const double norm = has_radial && adaptive[i] > 0 ? n0 : a;
        eff[i] = a > 0 ? eff_factor[i] / norm : nan;
        /* |ŵ_{t+1} − ŵ_t|² = (|Δθ|² − (|w_{t+1}| − |w_t|)²) / (|w_t||w_{t+1}|) (theory.angular_update) */
        const double sum = n0 + n1, prod = n0 * n1;
        const double dn = (b - a) / (sum < tiny ? tiny : sum);
        double chord_sq = step_sq[i] - dn * dn;
        chord_sq = (chord_sq < 0 ? 0.0 : chord_sq) / (prod < tiny ? tiny : prod);
        double half = __builtin_sqrt(chord_sq) / 2.0;
        half = half > 1.0 ? 1.0 : half;
        x[i] = (a > 0) & (b > 0) ? half : nan;
        qstar[i] = scale[i] ? __builtin_sqrt(eq_coef[i] * ema_x[i] / ema_w[i]) : nan;
        rms_acc[i] = rmsprop[i] > 0 ? b * b : nan;
    }
}

/* The last-value rows of the accumulators from the held state (NoetherTracker._write_last): per group,
   the sums of the 7 rows at sum_rows[k] (0: a row of NaN), the means of the finite entries of the 4
   rows at mean_rows[k] (0: NaN) and their counts, written into acc rows acc_rows[0..14] of each group
   with a valid step (the sum of the row `on` > 0). scratch: 9 rows of n. */
void nld_last(int64_t n, const int64_t *sum_rows, const int64_t *mean_rows, const double *on, double *scratch,
              double *acc, int64_t n_groups, const int64_t *bounds, const int64_t *acc_rows) {
    const double nan = __builtin_nan("");
    double *nans = scratch + 8 * n;
    for (int64_t i = 0; i < n; i++) nans[i] = nan;
    for (int k = 0; k < 4; k++) {
        const double *v = mean_rows[k] ? (const double *)mean_rows[k] : nans;
        double *kept = scratch + k * n, *finite = scratch + (4 + k) * n;
        for (int64_t i = 0; i < n; i++) {
            const int f = v[i] - v[i] == 0; /* x − x is 0 for every finite x */
            kept[i] = f ? v[i] : 0.0;
            finite[i] = f;
        }
    }
    for (int64_t g = 0; g < n_groups; g++) {
        const int64_t i0 = bounds[g], i1 = bounds[g + 1];
        if (!(run_sum(on, i0, i1) > 0)) continue;
        double *a = acc + g;
        for (int k = 0; k < 7; k++)
            a[acc_rows[k] * n_groups] = run_sum(sum_rows[k] ? (const double *)sum_rows[k] : nans, i0, i1);
        for (int k = 0; k < 4; k++) {
            const double total = run_sum(scratch + k * n, i0, i1), count = run_sum(scratch + (4 + k) * n, i0, i1);
            a[acc_rows[7 + k] * n_groups] = total / count;
            a[acc_rows[11 + k] * n_groups] = count;
        }
    }
}

/* n_parts job tables at once, one per thread of the OpenMP team (torch's own threads where torch
   uses the same runtime; one after the other where the build has no OpenMP). No two jobs may write
   one output: each sum is then what nld_run gives it, whatever the split. */
void nld_run_parts(int64_t n_parts, const int64_t *n_jobs, const int64_t *const *tables, const int64_t *ptrs,
                   double *res) {
#pragma omp parallel for num_threads(n_parts) schedule(static, 1)
    for (int64_t p = 0; p < n_parts; p++) nld_run(n_jobs[p], ptrs, tables[p], res);
}
"""

# nld_step's input rows (N_IN), nld_terms' (T_N_IN)
STEP_INPUTS = 43
TERMS_INPUTS = 24

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_key() -> str:
    """What the build depends on besides the source: the machine and (on Linux) its CPU flags."""
    parts = [platform.machine(), platform.processor(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            parts += [line for line in f if line.startswith(("flags", "Features"))][:1]
    except OSError:
        pass
    return "|".join(parts)


def _openmp() -> bool:
    """Whether the kernel is built with OpenMP: only where torch runs on GNU ``libgomp``.

    That is torch's Linux wheels: the kernel then shares the loaded copy and its threads. A second
    OpenMP runtime beside torch's (LLVM's or Intel's) would start threads of its own, and some
    pairs abort at load.
    """
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


def _build(cc: str, target: Path, openmp: bool) -> None:
    """Compile the kernel into ``target`` (atomically: a concurrent build never sees a partial file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "nld_kernel.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        # no implicit contraction: each product is added with one explicit fused multiply-add, so
        # a sum has the same bits in every specialised copy of the job
        base = [cc, "-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-o", str(out), str(src), "-lm"]
        errors = []
        # the host's vector width and OpenMP, where the compiler has them
        tries = [["-march=native"], []]
        if openmp:
            tries = [["-march=native", "-fopenmp"], *tries[:1], ["-fopenmp"], *tries[1:]]
        for flags in tries:
            run = subprocess.run(base[:1] + flags + base[1:], capture_output=True, text=True, timeout=120)
            if run.returncode == 0 and "-fopenmp" in flags and b"libgomp" not in out.read_bytes():
                errors.append("built with an OpenMP runtime other than libgomp")  # e.g. clang's libomp
                continue
            if run.returncode == 0:
                os.replace(out, target)
                return
            errors.append(run.stderr.strip())
        raise RuntimeError("\n".join(errors))


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; ``None`` where it is switched off or cannot be built.

    Example:
        >>> from nld_callbacks import kernel
        >>> lib = kernel.load()
        >>> lib is None or callable(lib.nld_run)
        True
    """
    global _lib, _tried
    if os.environ.get("NLD_CALLBACKS_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            log.info("nld_callbacks: no C compiler found; the charge sums use torch ops")
            return None
        openmp = _openmp()
        digest = hashlib.sha256("\0".join([SOURCE, cc, _cpu_key(), str(openmp)]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("NLD_CALLBACKS_CACHE") or Path.home() / ".cache" / "nld_callbacks")
        target = cache / f"nld_kernel-{digest}.so"
        try:
            if not target.exists():
                _build(cc, target, openmp)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.info("nld_callbacks: the charge kernel could not be built (%s); the charge sums use torch ops", e)
            return None
        lib.nld_run.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.nld_run.restype = ctypes.c_int64
        lib.nld_run_parts.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p]
        lib.nld_run_parts.restype = None
        lib.nld_map.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_void_p]
        lib.nld_map.restype = None
        lib.nld_runs.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_void_p]
        lib.nld_runs.restype = None
        lib.nld_step.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p]
        lib.nld_step.restype = ctypes.c_int64
        lib.nld_terms.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.nld_terms.restype = None
        lib.nld_derive.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.nld_derive.restype = None
        lib.nld_last.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        lib.nld_last.restype = None
        _lib = lib
        return lib


def reset() -> None:
    """Forget the loaded kernel (the next :func:`load` looks again; for tests)."""
    global _lib, _tried
    with _lock:
        _lib, _tried = None, False
