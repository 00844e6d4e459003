//! Segmentation metrics as the references compute them (EVAL.md).
//!
//! - Dice and IoU as the authors' test script: sums over the whole image,
//!   eps 1e-7, so both empty gives 1 and exactly one empty about 0.
//! - Surface distances as DeepMind's `surface_distance` (the reference to
//!   quote): the masks' 2 x 2 neighbourhood codes on the grid of pixel
//!   corners (the union's bounding box, one row and column of zeros around
//!   it), surface elements where a code is neither empty nor full, each with
//!   its contour length from the marching-squares table and the spacing; the
//!   exact Euclidean distance of every element of one surface to the nearest
//!   element of the other (anisotropic spacing); NSD at a tolerance and the
//!   robust Hausdorff distance at a percentile from those.

/// Per-mask overlap figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overlap {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    /// (2 TP + eps) / (|P| + |G| + eps), eps 1e-7
    pub dice: f64,
    /// (TP + eps) / (|P| + |G| - TP + eps)
    pub iou: f64,
}

/// The authors' epsilon.
pub const EPS: f64 = 1e-7;

/// Dice and IoU of a prediction against a reference (any non-zero value is
/// foreground), equal lengths.
pub fn overlap(pred: &[u8], gt: &[u8]) -> Overlap {
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for (&p, &g) in pred.iter().zip(gt) {
        match (p != 0, g != 0) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            _ => {}
        }
    }
    let (t, p, g) = (tp as f64, (tp + fp) as f64, (tp + fn_) as f64);
    Overlap {
        tp,
        fp,
        fn_,
        dice: (2.0 * t + EPS) / (p + g + EPS),
        iou: (t + EPS) / (p + g - t + EPS),
    }
}

/// Every surface element of the two masks with its measure and its
/// distance to the other mask's surface (DeepMind's
/// `compute_surface_distances`).
#[derive(Clone, Debug, Default)]
pub struct SurfaceDistances {
    /// (distance to the prediction's surface, contour length) per element
    /// of the reference's surface, sorted by distance
    pub gt_to_pred: Vec<(f64, f64)>,
    /// the same from the prediction to the reference
    pub pred_to_gt: Vec<(f64, f64)>,
}

/// Contour length of each 2 x 2 neighbourhood code (bit 3: the upper left
/// pixel, 2: upper right, 1: lower left, 0: lower right), marching squares
/// with `spacing` (rows, columns).
fn contour_lengths(spacing: (f64, f64)) -> [f64; 16] {
    let (vert, horiz) = spacing;
    let diag = 0.5 * (vert * vert + horiz * horiz).sqrt();
    [
        0.0,        // 0000
        diag,       // 0001
        diag,       // 0010
        horiz,      // 0011
        diag,       // 0100
        vert,       // 0101
        2.0 * diag, // 0110
        diag,       // 0111
        diag,       // 1000
        2.0 * diag, // 1001
        vert,       // 1010
        diag,       // 1011
        horiz,      // 1100
        diag,       // 1101
        diag,       // 1110
        0.0,        // 1111
    ]
}

/// Surface distances of two 2-D masks [h, w] (row-major, non-zero is
/// foreground) with pixel spacing (rows, columns) in mm (or pixels).
pub fn surface_distances_2d(
    pred: &[u8],
    gt: &[u8],
    h: usize,
    w: usize,
    spacing: (f64, f64),
) -> SurfaceDistances {
    // The union's bounding box.
    let (mut r0, mut r1, mut c0, mut c1) = (usize::MAX, 0, usize::MAX, 0);
    for r in 0..h {
        for c in 0..w {
            if pred[r * w + c] != 0 || gt[r * w + c] != 0 {
                r0 = r0.min(r);
                r1 = r1.max(r);
                c0 = c0.min(c);
                c1 = c1.max(c);
            }
        }
    }
    if r0 == usize::MAX {
        return SurfaceDistances::default();
    }
    // Codes on the corner grid: code[i][j] covers pixels (i-1..=i, j-1..=j)
    // of the crop, i in 0..=rows, j in 0..=cols (outside the crop is 0).
    let (rows, cols) = (r1 - r0 + 1, c1 - c0 + 1);
    let (gh, gw) = (rows + 1, cols + 1);
    let code = |m: &[u8]| -> Vec<u8> {
        let at = |i: isize, j: isize| -> u8 {
            if i < 0 || j < 0 || i >= rows as isize || j >= cols as isize {
                0
            } else {
                (m[(r0 + i as usize) * w + c0 + j as usize] != 0) as u8
            }
        };
        let mut out = vec![0u8; gh * gw];
        for i in 0..gh as isize {
            for j in 0..gw as isize {
                out[i as usize * gw + j as usize] =
                    8 * at(i - 1, j - 1) + 4 * at(i - 1, j) + 2 * at(i, j - 1) + at(i, j);
            }
        }
        out
    };
    let (cp, cg) = (code(pred), code(gt));
    let border = |c: &[u8]| -> Vec<bool> { c.iter().map(|&v| v != 0 && v != 15).collect() };
    let (bp, bg) = (border(&cp), border(&cg));
    let (dp, dg) = (edt_2d(&bp, gh, gw, spacing), edt_2d(&bg, gh, gw, spacing));
    let len = contour_lengths(spacing);
    let collect = |b: &[bool], c: &[u8], other: &[f64]| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = (0..b.len())
            .filter(|&i| b[i])
            .map(|i| (other[i], len[c[i] as usize]))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    SurfaceDistances {
        gt_to_pred: collect(&bg, &cg, &dp),
        pred_to_gt: collect(&bp, &cp, &dg),
    }
}

/// Exact Euclidean distance from every grid point to the nearest `true`
/// one, with anisotropic spacing (Felzenszwalb and Huttenlocher's lower
/// envelope of parabolas, rows then columns); infinity everywhere when
/// there is none.
fn edt_2d(feature: &[bool], h: usize, w: usize, spacing: (f64, f64)) -> Vec<f64> {
    if !feature.iter().any(|&f| f) {
        return vec![f64::INFINITY; h * w];
    }
    // Squared distances, first along each column (rows axis), then rows.
    let mut d: Vec<f64> = feature
        .iter()
        .map(|&f| if f { 0.0 } else { f64::INFINITY })
        .collect();
    let mut buf = vec![0.0; h.max(w)];
    for c in 0..w {
        for r in 0..h {
            buf[r] = d[r * w + c];
        }
        let out = envelope(&buf[..h], spacing.0);
        for r in 0..h {
            d[r * w + c] = out[r];
        }
    }
    for r in 0..h {
        let out = envelope(&d[r * w..(r + 1) * w], spacing.1);
        d[r * w..(r + 1) * w].copy_from_slice(&out);
    }
    d.iter().map(|v| v.sqrt()).collect()
}

/// One dimension of the squared distance transform: out[q] = min_p f[p] +
/// ((q - p) s)^2.
fn envelope(f: &[f64], s: f64) -> Vec<f64> {
    let n = f.len();
    let s2 = s * s;
    let mut out = vec![f64::INFINITY; n];
    // Parabola vertices and the boundaries between them.
    let mut v: Vec<usize> = Vec::with_capacity(n);
    let mut z: Vec<f64> = Vec::with_capacity(n + 1);
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        loop {
            let Some(&p) = v.last() else {
                v.push(q);
                z.push(f64::NEG_INFINITY);
                break;
            };
            // Where the parabolas of p and q meet.
            let x = ((f[q] + s2 * (q * q) as f64) - (f[p] + s2 * (p * p) as f64))
                / (2.0 * s2 * (q as f64 - p as f64));
            if x <= *z.last().expect("one per vertex") {
                v.pop();
                z.pop();
                continue;
            }
            v.push(q);
            z.push(x);
            break;
        }
    }
    if v.is_empty() {
        return out;
    }
    let mut k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while k + 1 < v.len() && z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let d = (q as f64 - p as f64) * s;
        *o = f[p] + d * d;
    }
    out
}

/// Surface area of each 2 x 2 x 2 neighbourhood code (bit 7 - (4 a + 2 b +
/// c) for the voxel at offset (a, b, c) along axes 0, 1, 2, as DeepMind's
/// kernel [[[128, 64], [32, 16]], [[8, 4], [2, 1]]]), with `spacing` per
/// axis: marching cubes with vertices at the cut edges' midpoints. On each
/// face of the cube the cut edges pair up (a face whose inside corners are
/// diagonal cuts each off, as the 2-D table does), the pairs link into
/// closed loops, each loop is a fan of triangles from its first vertex, and
/// the code's area is the sum of the triangles' areas. Planar loops (the
/// faces, edges and corners of boxes) have one area whatever the
/// triangulation; for curved ones this fan is our choice.
fn surfel_areas(spacing: (f64, f64, f64)) -> [f64; 256] {
    let corner = |i: usize| [(i >> 2) & 1, (i >> 1) & 1, i & 1];
    // The 12 edges (corner pairs differing in one axis).
    let mut edges: Vec<(usize, usize)> = vec![];
    for a in 0..8 {
        for axis in 0..3 {
            let b = a | (4 >> axis);
            if b != a {
                edges.push((a, b));
            }
        }
    }
    let edge_of = |a: usize, b: usize| {
        edges
            .iter()
            .position(|&(x, y)| (x, y) == (a.min(b), a.max(b)))
            .expect("neighbouring corners")
    };
    let mid = |e: usize| -> [f64; 3] {
        let (a, b) = edges[e];
        let (ca, cb) = (corner(a), corner(b));
        let sp = [spacing.0, spacing.1, spacing.2];
        std::array::from_fn(|k| 0.5 * (ca[k] + cb[k]) as f64 * sp[k])
    };
    // The 6 faces, corners in cyclic order.
    let mut faces: Vec<[usize; 4]> = vec![];
    for axis in 0..3 {
        let (u, v) = ((axis + 1) % 3, (axis + 2) % 3);
        for side in 0..2 {
            let at = |cu: usize, cv: usize| {
                let mut c = [0usize; 3];
                c[axis] = side;
                c[u] = cu;
                c[v] = cv;
                4 * c[0] + 2 * c[1] + c[2]
            };
            faces.push([at(0, 0), at(1, 0), at(1, 1), at(0, 1)]);
        }
    }
    let mut table = [0.0f64; 256];
    for (code, area) in table.iter_mut().enumerate() {
        let inside = |i: usize| code >> (7 - i) & 1 == 1;
        // Segments between cut edges, face by face.
        let mut links: Vec<Vec<usize>> = vec![vec![]; 12];
        for f in &faces {
            let ring: Vec<(usize, usize)> = (0..4).map(|k| (f[k], f[(k + 1) % 4])).collect();
            let cut: Vec<usize> = ring
                .iter()
                .filter(|(a, b)| inside(*a) != inside(*b))
                .map(|&(a, b)| edge_of(a, b))
                .collect();
            let mut pair = |x: usize, y: usize| {
                links[x].push(y);
                links[y].push(x);
            };
            match cut.len() {
                2 => pair(cut[0], cut[1]),
                4 => {
                    // Diagonal inside corners: cut each one off.
                    for k in 0..4 {
                        if inside(f[k]) {
                            let prev = edge_of(f[(k + 3) % 4], f[k]);
                            let next = edge_of(f[k], f[(k + 1) % 4]);
                            pair(prev, next);
                        }
                    }
                }
                _ => {}
            }
        }
        // Loops: every cut edge has two neighbours.
        let mut seen = [false; 12];
        for start in 0..12 {
            if seen[start] || links[start].is_empty() {
                continue;
            }
            let mut lp = vec![start];
            seen[start] = true;
            let (mut prev, mut cur) = (start, links[start][0]);
            while cur != start {
                lp.push(cur);
                seen[cur] = true;
                let next = if links[cur][0] != prev {
                    links[cur][0]
                } else {
                    links[cur][1]
                };
                prev = cur;
                cur = next;
            }
            let p0 = mid(lp[0]);
            for w in lp[1..].windows(2) {
                let (a, b) = (mid(w[0]), mid(w[1]));
                let (u, v) = (
                    [a[0] - p0[0], a[1] - p0[1], a[2] - p0[2]],
                    [b[0] - p0[0], b[1] - p0[1], b[2] - p0[2]],
                );
                let c = [
                    u[1] * v[2] - u[2] * v[1],
                    u[2] * v[0] - u[0] * v[2],
                    u[0] * v[1] - u[1] * v[0],
                ];
                *area += 0.5 * (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
            }
        }
    }
    table
}

/// Surface distances of two 3-D masks [n0][n1][n2] (row-major, axis 0
/// slowest; non-zero is foreground) with voxel spacing per axis in mm: as
/// `surface_distances_2d`, on the grid of voxel corners with the areas of
/// `surfel_areas`. For a `Volume` ([z][y][x]) the axes are (z, y, x).
pub fn surface_distances_3d(
    pred: &[u8],
    gt: &[u8],
    dims: [usize; 3],
    spacing: (f64, f64, f64),
) -> SurfaceDistances {
    let [n0, n1, n2] = dims;
    let idx = |a: usize, b: usize, c: usize| (a * n1 + b) * n2 + c;
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for a in 0..n0 {
        for b in 0..n1 {
            for c in 0..n2 {
                let i = idx(a, b, c);
                if pred[i] != 0 || gt[i] != 0 {
                    for (k, v) in [a, b, c].into_iter().enumerate() {
                        lo[k] = lo[k].min(v);
                        hi[k] = hi[k].max(v);
                    }
                }
            }
        }
    }
    if lo[0] == usize::MAX {
        return SurfaceDistances::default();
    }
    let ext: [usize; 3] = std::array::from_fn(|k| hi[k] - lo[k] + 1);
    let g = [ext[0] + 1, ext[1] + 1, ext[2] + 1];
    let code = |m: &[u8]| -> Vec<u8> {
        let at = |a: isize, b: isize, c: isize| -> u8 {
            let p = [a, b, c];
            if (0..3).any(|k| p[k] < 0 || p[k] >= ext[k] as isize) {
                return 0;
            }
            (m[idx(lo[0] + a as usize, lo[1] + b as usize, lo[2] + c as usize)] != 0) as u8
        };
        let mut out = vec![0u8; g[0] * g[1] * g[2]];
        for i in 0..g[0] as isize {
            for j in 0..g[1] as isize {
                for k in 0..g[2] as isize {
                    let mut v = 0u8;
                    for (bit, (da, db, dc)) in [
                        (0, 0, 0),
                        (0, 0, 1),
                        (0, 1, 0),
                        (0, 1, 1),
                        (1, 0, 0),
                        (1, 0, 1),
                        (1, 1, 0),
                        (1, 1, 1),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        v |= at(i - 1 + da, j - 1 + db, k - 1 + dc) << (7 - bit);
                    }
                    out[((i as usize) * g[1] + j as usize) * g[2] + k as usize] = v;
                }
            }
        }
        out
    };
    let (cp, cg) = (code(pred), code(gt));
    let border = |c: &[u8]| -> Vec<bool> { c.iter().map(|&v| v != 0 && v != 255).collect() };
    let (bp, bg) = (border(&cp), border(&cg));
    let sp = [spacing.0, spacing.1, spacing.2];
    let (dp, dg) = (edt_nd(&bp, g, sp), edt_nd(&bg, g, sp));
    let area = surfel_areas(spacing);
    let collect = |b: &[bool], c: &[u8], other: &[f64]| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = (0..b.len())
            .filter(|&i| b[i])
            .map(|i| (other[i], area[c[i] as usize]))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    SurfaceDistances {
        gt_to_pred: collect(&bg, &cg, &dp),
        pred_to_gt: collect(&bp, &cp, &dg),
    }
}

/// `edt_2d` in three dimensions: the squared transform along each axis in
/// turn.
fn edt_nd(feature: &[bool], g: [usize; 3], sp: [f64; 3]) -> Vec<f64> {
    if !feature.iter().any(|&f| f) {
        return vec![f64::INFINITY; feature.len()];
    }
    let mut d: Vec<f64> = feature
        .iter()
        .map(|&f| if f { 0.0 } else { f64::INFINITY })
        .collect();
    let strides = [g[1] * g[2], g[2], 1];
    for axis in 0..3 {
        let n = g[axis];
        let mut line = vec![0.0; n];
        // Every line along `axis`: its start is any point with coordinate 0 there.
        for start in 0..d.len() {
            if !(start / strides[axis]).is_multiple_of(n) {
                continue;
            }
            for (q, l) in line.iter_mut().enumerate() {
                *l = d[start + q * strides[axis]];
            }
            let out = envelope(&line, sp[axis]);
            for (q, o) in out.into_iter().enumerate() {
                d[start + q * strides[axis]] = o;
            }
        }
    }
    d.iter().map(|v| v.sqrt()).collect()
}

impl SurfaceDistances {
    /// Normalised surface Dice at `tolerance`: the share of both surfaces'
    /// measure within the tolerance of the other; 0 when one surface is
    /// empty, NaN when both are.
    pub fn nsd(&self, tolerance: f64) -> f64 {
        let total = |v: &[(f64, f64)]| v.iter().map(|e| e.1).sum::<f64>();
        let within = |v: &[(f64, f64)]| {
            v.iter()
                .filter(|e| e.0 <= tolerance)
                .map(|e| e.1)
                .sum::<f64>()
        };
        let all = total(&self.gt_to_pred) + total(&self.pred_to_gt);
        if all == 0.0 {
            return f64::NAN;
        }
        (within(&self.gt_to_pred) + within(&self.pred_to_gt)) / all
    }

    /// Robust Hausdorff distance at `percent`: in each direction the first
    /// sorted distance whose cumulative measure share reaches percent / 100
    /// (no interpolation), the larger of the two; infinity when a surface is
    /// empty.
    pub fn hausdorff(&self, percent: f64) -> f64 {
        let one = |v: &[(f64, f64)]| -> f64 {
            if v.is_empty() {
                return f64::INFINITY;
            }
            let total: f64 = v.iter().map(|e| e.1).sum();
            let mut cum = 0.0;
            for e in v {
                cum += e.1;
                if cum / total >= percent / 100.0 {
                    return e.0;
                }
            }
            v[v.len() - 1].0
        };
        one(&self.gt_to_pred).max(one(&self.pred_to_gt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(
        h: usize,
        w: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> Vec<u8> {
        let mut m = vec![0u8; h * w];
        for r in rows {
            for c in cols.clone() {
                m[r * w + c] = 1;
            }
        }
        m
    }

    fn disc(n: usize, r: f64, cy: f64, cx: f64) -> Vec<u8> {
        let mut m = vec![0u8; n * n];
        for y in 0..n {
            for x in 0..n {
                let (dy, dx) = (y as f64 - cy, x as f64 - cx);
                m[y * n + x] = (dy * dy + dx * dx <= r * r) as u8;
            }
        }
        m
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }

    /// EVAL.md's 2-D test vectors (DeepMind's code).
    #[test]
    fn eval_md_2d_vectors() {
        let g = rect(32, 32, 10..20, 10..20);
        let p = rect(32, 32, 12..22, 10..20);
        let o = overlap(&p, &g);
        close(o.dice, 0.8);
        let s = surface_distances_2d(&p, &g, 32, 32, (1.0, 1.0));
        close(s.nsd(1.0), 0.5515086535);
        close(s.hausdorff(95.0), 2.0);
        close(s.nsd(2.0), 1.0);
        let s = surface_distances_2d(&p, &g, 32, 32, (0.5, 1.0));
        close(s.nsd(1.0), 1.0);
        close(s.hausdorff(95.0), 1.0);
        let g = disc(64, 12.0, 32.0, 32.0);
        let p = disc(64, 14.0, 32.0, 33.0);
        close(overlap(&p, &g).dice, 0.8368121442);
        let s = surface_distances_2d(&p, &g, 64, 64, (1.0, 1.0));
        assert!((s.nsd(1.0) - 0.285914).abs() < 1e-6, "{}", s.nsd(1.0));
        assert!((s.nsd(2.0) - 0.634123).abs() < 1e-6, "{}", s.nsd(2.0));
        close(s.hausdorff(95.0), 3.0);
    }

    /// EVAL.md's 3-D test vector (DeepMind's code): boxes on a 20 x 24 x
    /// 24 grid with spacing (2.5, 0.8, 0.8).
    #[test]
    fn eval_md_3d_vector() {
        let cube = |r: [std::ops::Range<usize>; 3]| {
            let mut m = vec![0u8; 20 * 24 * 24];
            for a in r[0].clone() {
                for b in r[1].clone() {
                    for c in r[2].clone() {
                        m[(a * 24 + b) * 24 + c] = 1;
                    }
                }
            }
            m
        };
        let g = cube([5..12, 6..16, 6..16]);
        let p = cube([6..13, 6..16, 7..17]);
        close(overlap(&p, &g).dice, 0.7714285714);
        let s = surface_distances_3d(&p, &g, [20, 24, 24], (2.5, 0.8, 0.8));
        close(s.nsd(2.0), 0.8347703463);
        close(s.hausdorff(95.0), 2.5);
    }

    /// The 3-D table's areas: a corner cut, a face (with anisotropic
    /// spacing), and no surface for the empty and full cubes.
    #[test]
    fn surfel_areas_are_marching_cubes() {
        let t = surfel_areas((1.0, 1.0, 1.0));
        assert_eq!((t[0], t[255]), (0.0, 0.0));
        // One corner: a triangle with sides sqrt(0.5): area sqrt(3) / 8.
        close(t[1], 3f64.sqrt() / 8.0);
        close(t[128], 3f64.sqrt() / 8.0);
        // Four corners of one face (axis 0 = 0): a unit square.
        close(t[0b1111_0000], 1.0);
        close(t[0b0000_1111], 1.0);
        // A corner and its complement (seven corners) cut the same triangle.
        close(t[255 - 1], t[1]);
        let t = surfel_areas((2.0, 1.0, 3.0));
        close(t[0b1111_0000], 3.0);
    }

    #[test]
    fn empty_cases() {
        let z = vec![0u8; 16];
        let one = rect(4, 4, 1..3, 1..3);
        let o = overlap(&z, &z);
        assert_eq!((o.dice, o.iou), (1.0, 1.0));
        assert!(overlap(&z, &one).dice < 1e-6);
        let s = surface_distances_2d(&z, &z, 4, 4, (1.0, 1.0));
        assert!(s.nsd(1.0).is_nan());
        let s = surface_distances_2d(&z, &one, 4, 4, (1.0, 1.0));
        assert_eq!(s.nsd(1.0), 0.0);
        assert_eq!(s.hausdorff(95.0), f64::INFINITY);
    }

    #[test]
    fn distance_transform_is_exact() {
        // One feature point at (2, 3) on a 5 x 7 grid, spacing (2, 1).
        let mut f = vec![false; 35];
        f[2 * 7 + 3] = true;
        let d = edt_2d(&f, 5, 7, (2.0, 1.0));
        for r in 0..5 {
            for c in 0..7 {
                let want = (((r as f64 - 2.0) * 2.0).powi(2) + (c as f64 - 3.0).powi(2)).sqrt();
                close(d[r * 7 + c], want);
            }
        }
    }
}
