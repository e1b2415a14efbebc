//! The major members' bounds and clamped targets for one owner in `i16` lanes: eight to an
//! SSE2 register rather than four, with the minimum and maximum SSE2 has for them (it has
//! none for `i32`).
use super::Sums;

/// The most entries an owner or a share may have for [`Narrow`] to apply: then a row's
/// counts, the shares, the fair parts and the differences [`Narrow::bound`] takes fit in
/// `i16`.
pub(super) const MAX_COUNT: u32 = 1 << 14;

/// Buffers for [`Narrow::bound`].
pub(super) struct Narrow {
    owned: Vec<i16>,
    /// -1 for each major member, 0 for the others.
    major: Vec<i16>,
    /// The most entries a member owns.
    owned_max: i16,
    row: Vec<i16>,
    target: Vec<i16>,
}

impl Narrow {
    /// Buffers for members who own `owned` entries, with `is_major` 1 for the major ones;
    /// `None` if some member owns `MAX_COUNT` entries or more.
    pub(super) fn new(owned: &[u32], is_major: &[u32]) -> Option<Self> {
        if owned.iter().any(|&o| o >= MAX_COUNT) {
            return None;
        }
        let n = owned.len();
        Some(Self {
            owned: owned.iter().map(|&o| o as i16).collect(),
            major: is_major.iter().map(|&m| -(m as i16)).collect(),
            owned_max: owned.iter().max().map_or(0, |&o| o as i16),
            row: vec![0; n],
            target: vec![0; n],
        })
    }

    /// [`super::Targets::bound_major`]'s loop over the major members other than `d`, for
    /// heir counts `row` of an owner with `estate` entries and the major bounds
    /// `(floor, ceiling, fair_lo, fair_hi)`, with the ceiling and `estate` (so each count in
    /// `row`) below [`MAX_COUNT`]; writes the targets, 0 for the other members, to `target`.
    /// `fair_hi` may exceed `i16` (it is the fair part plus up to 2) and is clamped, which
    /// its `min` with `ceiling - owned` makes no difference to. Every bound and target is
    /// within `m`, the largest of the ceiling, `estate` and any member's entries, so sums
    /// over blocks of at most `i16::MAX / m` members are exact in `i16`.
    pub(super) fn bound(
        &mut self,
        row: &[u32],
        (d, estate): (usize, u32),
        bounds: (i32, i32, i32, i32),
        target: &mut [u32],
    ) -> Sums {
        let n = row.len();
        let (floor, ceiling, fair_lo, fair_hi) = bounds;
        let m = ceiling.max(estate as i32).max(self.owned_max.into()).max(1);
        // A power of two, so blocks are whole vectors and loop unrolls.
        let block = 1 << (i32::from(i16::MAX) / m).ilog2();
        let (floor, ceiling) = (floor as i16, ceiling as i16);
        let (fair_lo, fair_hi) = (fair_lo as i16, fair_hi.min(i16::MAX.into()) as i16);
        for (narrow, &count) in self.row.iter_mut().zip(row) {
            *narrow = count as i16;
        }
        // The owner is not its own heir.
        let owner_major = std::mem::take(&mut self.major[d]);
        let (owned, major, row) = (&self.owned[..n], &self.major[..n], &self.row[..n]);
        let target_n = &mut self.target[..n];
        let mut sums = [0i64; 4];
        for start in (0..n).step_by(block) {
            let end = (start + block).min(n);
            let mut part = [0i16; 4];
            for i in start..end {
                let on = major[i];
                let lo = (floor - owned[i]).max(fair_lo).max(0);
                let hi = (ceiling - owned[i]).min(fair_hi);
                let t = row[i].max(lo).min(hi) & on;
                target_n[i] = t;
                part[0] = part[0].wrapping_add(lo & on);
                part[1] = part[1].wrapping_add(hi & on);
                part[2] = part[2].wrapping_add(t);
                part[3] = part[3].wrapping_add(i16::from(lo > hi) & on);
            }
            for (sum, part) in sums.iter_mut().zip(part) {
                *sum += i64::from(part);
            }
        }
        self.major[d] = owner_major;
        for (wide, &narrow) in target.iter_mut().zip(&self.target[..n]) {
            *wide = i32::from(narrow) as u32;
        }
        let [lo, hi, target, crossed] = sums;
        Sums {
            lo,
            hi,
            target,
            crossed,
        }
    }
}
