/* Trilinear insertion of central slices into half-spectrum accumulators: the compiled form of
 * backproject._splat_trilinear (same grid, same float32 arithmetic per sample; the sums differ only in
 * their order, tests/test_reconstruct_backproject.py).
 *
 * Why compiled: torch's index_add_ costs ~25 ns per sample and corner on one thread whatever the access
 * pattern, and an insertion is 16 such scatters per Fourier sample; this loop visits each sample's
 * neighbours once and prefetches the rows of a sample AHEAD positions on, since at box 256 the
 * accumulators (0.8 GB a half) leave every sample a cache miss (bench/results/2026-12-06-scale.md,
 * session 15). Built by setup.py as an optional extension and called through ctypes (no Python headers
 * needed); without it the torch path runs.
 *
 * Grid (as in the Backprojector docstring): accumulators of shape (nz, ny, nx), kz and ky centred at
 * nz / 2 and ny / 2, kx from index 0; numerator complex (interleaved re, im), weight real. Every sample
 * keeps its 8 neighbours inside the grid (the insertion radius guarantees it): no bounds checks.
 */
#include <math.h>
#include <stdint.h>

#define AHEAD 24

/* The 3D position of image sample (qx, qy) under rotation R (row-major 3 x 3): R[:, 0] qx + R[:, 1] qy,
 * mirrored to -k when x < 0 (the stored half is x >= 0). Returns whether it was mirrored. */
static inline int slice_position(float qx, float qy, const float *R, float *x, float *y, float *z)
{
    *x = qx * R[0] + qy * R[1];
    *y = qx * R[3] + qy * R[4];
    *z = qx * R[6] + qy * R[7];
    if (*x < 0) {
        *x = -*x; *y = -*y; *z = -*z;
        return 1;
    }
    return 0;
}

/* Inserts B images of M samples each.
 *   rot      (B, 3, 3) row-major rotations
 *   qx, qy   (M,) sample positions in the image, in units of the oversampled grid
 *   values   (B, M) complex as (re, im) pairs; conjugated where the position is mirrored
 *   weights  sample weight of image b, sample m at weights[b * w_stride_b + m * w_stride_m]
 *   num, wt  flat accumulators, (nz * ny * nx) complex and real
 */
void cfa_insert_slices(int64_t B, int64_t M, const float *restrict rot, const float *restrict qx,
                       const float *restrict qy, const float *restrict values, const float *restrict weights,
                       int64_t w_stride_b, int64_t w_stride_m, float *restrict num, float *restrict wt,
                       int64_t nz, int64_t ny, int64_t nx)
{
    const float cy = (float)(ny / 2), cz = (float)(nz / 2);
    const int64_t sz = ny * nx, sy = nx;
    for (int64_t b = 0; b < B; ++b) {
        const float *R = rot + 9 * b;
        const float *v = values + 2 * M * b;
        const float *w = weights + w_stride_b * b;
        for (int64_t m = 0; m < M; ++m) {
            float x, y, z;
            if (m + AHEAD < M) {
                slice_position(qx[m + AHEAD], qy[m + AHEAD], R, &x, &y, &z);
                const int64_t ahead = ((int64_t)(z + cz) * ny + (int64_t)(y + cy)) * nx + (int64_t)x;
                for (int d = 0; d < 4; ++d) {
                    const int64_t row = ahead + (d >> 1) * sz + (d & 1) * sy;
                    __builtin_prefetch(num + 2 * row, 1, 0);
                    __builtin_prefetch(wt + row, 1, 0);
                }
            }
            const int mirrored = slice_position(qx[m], qy[m], R, &x, &y, &z);
            const float re = v[2 * m], im = mirrored ? -v[2 * m + 1] : v[2 * m + 1];
            const float ws = w[w_stride_m * m];
            y += cy;
            z += cz;
            const float x0 = floorf(x), y0 = floorf(y), z0 = floorf(z);
            const float fx = x - x0, fy = y - y0, fz = z - z0;
            const int64_t base = ((int64_t)z0 * ny + (int64_t)y0) * nx + (int64_t)x0;
            const float wzs[2] = {1 - fz, fz}, wys[2] = {1 - fy, fy}, wxs[2] = {1 - fx, fx};
            for (int dz = 0; dz < 2; ++dz) {
                for (int dy = 0; dy < 2; ++dy) {
                    const float wzy = wzs[dz] * wys[dy];
                    const int64_t row = base + dz * sz + dy * sy;
                    for (int dx = 0; dx < 2; ++dx) {
                        const float c = wzy * wxs[dx];
                        num[2 * (row + dx)] += re * c;
                        num[2 * (row + dx) + 1] += im * c;
                        wt[row + dx] += ws * c;
                    }
                }
            }
        }
    }
}
