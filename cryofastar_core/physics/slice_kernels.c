/* Central slices of a 3D Fourier grid, compiled: sampling (projection, the gather) and insertion
 * (back-projection, the scatter), both trilinear. Each is the compiled form of a torch path with the
 * same grid and the same float32 arithmetic per sample (physics/projection.sample_ft's grid_sample,
 * reconstruct/backproject._splat_trilinear); results differ only in the order of sums
 * (tests/test_physics_projection.py, tests/test_reconstruct_backproject.py).
 *
 * Why compiled: torch's index_add_ costs ~25 ns per sample and corner on one thread whatever the access
 * pattern, and an insertion is 16 such scatters per Fourier sample; grid_sample builds a coordinate grid
 * per candidate and checks bounds per corner and channel. These loops compute each position from the
 * rotation, touch each neighbour once, and the insertion prefetches the rows of the sample AHEAD
 * positions on, since at box 256 its accumulators (0.8 GB a half) leave every sample a cache miss
 * (bench/results/2026-12-06-scale.md, session 15). Built by setup.py as an optional extension and called
 * through ctypes (no Python headers needed; ctypes releases the GIL, so threads can share the work);
 * physics/compiled.py loads it, and without it the torch paths run.
 *
 * Positions: image sample (qx, qy) under rotation R (row-major 3 x 3) sits at R[:, 0] qx + R[:, 1] qy
 * (x, y, z), in units of the (padded) grid, relative to its centre.
 */
#include <math.h>
#include <stdint.h>

#define AHEAD 24

static inline void slice_position(float qx, float qy, const float *R, float *x, float *y, float *z)
{
    *x = qx * R[0] + qy * R[1];
    *y = qx * R[3] + qy * R[4];
    *z = qx * R[6] + qy * R[7];
}

/* Samples B slices of M positions each from a centred complex grid (n, n, n), indexed [z][y][x] with the
 * origin at n / 2 (a VolumeFT's ft), by trilinear interpolation; neighbours outside the grid count as 0
 * (grid_sample's zero padding).
 *   rot      (B, 3, 3) row-major rotations
 *   qx, qy   (M,) sample positions in the image, in units of the grid
 *   vol      n^3 complex as (re, im) pairs
 *   out      (B, M) complex as (re, im) pairs
 */
void cfa_sample_slices(int64_t B, int64_t M, const float *restrict rot, const float *restrict qx,
                       const float *restrict qy, const float *restrict vol, int64_t n, float *restrict out)
{
    const float c = (float)(n / 2);
    for (int64_t b = 0; b < B; ++b) {
        const float *R = rot + 9 * b;
        float *o = out + 2 * M * b;
        for (int64_t m = 0; m < M; ++m) {
            float x, y, z;
            slice_position(qx[m], qy[m], R, &x, &y, &z);
            x += c; y += c; z += c;
            const float x0 = floorf(x), y0 = floorf(y), z0 = floorf(z);
            const float fx = x - x0, fy = y - y0, fz = z - z0;
            const int64_t ix = (int64_t)x0, iy = (int64_t)y0, iz = (int64_t)z0;
            const float wzs[2] = {1 - fz, fz}, wys[2] = {1 - fy, fy}, wxs[2] = {1 - fx, fx};
            float re = 0, im = 0;
            if (ix >= 0 && iy >= 0 && iz >= 0 && ix + 1 < n && iy + 1 < n && iz + 1 < n) {
                for (int dz = 0; dz < 2; ++dz) {
                    for (int dy = 0; dy < 2; ++dy) {
                        const float *row = vol + 2 * (((iz + dz) * n + iy + dy) * n + ix);
                        const float wzy = wzs[dz] * wys[dy];
                        re += wzy * (wxs[0] * row[0] + wxs[1] * row[2]);
                        im += wzy * (wxs[0] * row[1] + wxs[1] * row[3]);
                    }
                }
            } else {
                for (int dz = 0; dz < 2; ++dz) {
                    for (int dy = 0; dy < 2; ++dy) {
                        for (int dx = 0; dx < 2; ++dx) {
                            const int64_t jx = ix + dx, jy = iy + dy, jz = iz + dz;
                            if (jx < 0 || jy < 0 || jz < 0 || jx >= n || jy >= n || jz >= n)
                                continue;
                            const float w = wzs[dz] * wys[dy] * wxs[dx];
                            const float *v = vol + 2 * ((jz * n + jy) * n + jx);
                            re += w * v[0];
                            im += w * v[1];
                        }
                    }
                }
            }
            o[2 * m] = re;
            o[2 * m + 1] = im;
        }
    }
}

/* Inserts B slices of M samples each into half-spectrum accumulators of shape (nz, ny, nx) (as in the
 * Backprojector docstring: kz and ky centred at nz / 2 and ny / 2, kx from index 0; numerator complex,
 * weight real), with trilinear weights. A position with x < 0 is stored at -k, its value conjugated.
 * Every sample keeps its 8 neighbours inside the grid (the insertion radius guarantees it): no bounds
 * checks.
 *   rot      (B, 3, 3) row-major rotations
 *   qx, qy   (M,) sample positions in the image, in units of the oversampled grid
 *   values   (B, M) complex as (re, im) pairs
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
                const float sgn = x < 0 ? -1.0f : 1.0f;
                const int64_t ahead = ((int64_t)(sgn * z + cz) * ny + (int64_t)(sgn * y + cy)) * nx + (int64_t)(sgn * x);
                for (int d = 0; d < 4; ++d) {
                    const int64_t row = ahead + (d >> 1) * sz + (d & 1) * sy;
                    __builtin_prefetch(num + 2 * row, 1, 0);
                    __builtin_prefetch(wt + row, 1, 0);
                }
            }
            slice_position(qx[m], qy[m], R, &x, &y, &z);
            const int mirrored = x < 0;
            if (mirrored) {
                x = -x; y = -y; z = -z;
            }
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
