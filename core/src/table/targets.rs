//! How many of one owner's entries should name each other member as heir, computed so that
//! heirs already within bounds stay, in one loop over the members that vectorizes.
mod narrow;

use self::narrow::{MAX_COUNT, Narrow};
use super::{
    heirs::HeirQuotas,
    members::{Members, pack, share, unpack},
};

/// Above this many members whose weight is not the most common one, bounds are computed
/// member by member rather than in one vectorized loop.
const MAX_MINORS: usize = 8;

/// Above this many heirs to add or take back, they are chosen in rounds of a selection
/// rather than one at a time.
const MAX_STEPS: i64 = 4;

/// How many of one owner's entries should name each other member as heir: as many as it
/// has now wherever that is within bounds, the nearest bound elsewhere, then one more or
/// one less for the members furthest behind or ahead of their fair part until they add up
/// to the owner's entries. The bounds are those of [`HeirQuotas`] (after the owner's
/// removal every survivor owns the floor or the ceiling of its new share) and a fair part
/// of the inheritance within one entry (equal weights) or two; where they cannot all hold,
/// the owner's heirs are [`HeirQuotas`] exactly. Holds its buffers, so computing it for
/// every owner allocates nothing.
pub(super) struct Targets<'a> {
    members: &'a Members,
    /// The most common weight (the lowest of those as common), and 1 for each member that
    /// has it, 0 for the others ...
    major: u32,
    is_major: Vec<u32>,
    /// ... the minors, by position.
    minors: Vec<usize>,
    /// How far from its fair part a count may be: 1 with equal weights, 2 with unequal.
    width: i32,
    /// For the owner at hand: its position, and the bounds of a major member as
    /// `(floor, ceiling, fair_lo, fair_hi)` of its inheritance, less what it owns.
    owner: usize,
    major_bounds: (i32, i32, i32, i32),
    /// Whether every member's bounds are in `lo` and `hi`, not only the minors'.
    each: bool,
    lo: Vec<i32>,
    hi: Vec<i32>,
    target: Vec<u32>,
    /// Buffers for the major members' bounds in `i16` lanes, if every count fits.
    narrow: Option<Narrow>,
    quotas: HeirQuotas,
    candidates: Vec<i64>,
}

/// Sums over one owner's row: of the lower bounds, the upper bounds, the clamped targets,
/// and how many lower bounds exceed their upper bound.
#[derive(Default)]
pub(super) struct Sums {
    lo: i64,
    hi: i64,
    target: i64,
    crossed: i64,
}

impl<'a> Targets<'a> {
    /// Buffers for `members`, who own `owned` entries for as long as this is used.
    pub(super) fn new(members: &'a Members, owned: &[u32]) -> Self {
        let n = members.len();
        let mut weights = members.weights.clone();
        weights.sort_unstable();
        let major = weights
            .chunk_by(|a, b| a == b)
            .max_by_key(|run| (run.len(), std::cmp::Reverse(run[0])))
            .map_or(0, |run| run[0]);
        let is_major: Vec<u32> = members
            .weights
            .iter()
            .map(|&w| u32::from(w == major))
            .collect();
        let minors: Vec<usize> = (0..n).filter(|&i| is_major[i] == 0).collect();
        let narrow = Narrow::new(owned, &is_major);
        Self {
            members,
            major,
            is_major,
            width: if minors.is_empty() { 1 } else { 2 },
            each: minors.len() > MAX_MINORS,
            minors,
            owner: 0,
            major_bounds: (0, 0, 0, 0),
            lo: vec![0; n],
            hi: vec![0; n],
            target: vec![0; n],
            narrow,
            quotas: HeirQuotas::new(n),
            candidates: Vec::with_capacity(n),
        }
    }

    /// The heirs member `d` should have, by position, given the entries each member owns
    /// and the heirs `d` has now (`row`).
    pub(super) fn of(&mut self, owned: &[u32], row: &[u32], d: usize) -> &[u32] {
        let members = self.members;
        let rest = members.total - u64::from(members.weights[d]);
        let estate = owned[d];
        self.owner = d;
        let sums = if self.each {
            self.bound_each(owned, row, rest, estate)
        } else {
            self.bound_major(owned, row, rest, estate)
        };
        let estate = i64::from(estate);
        if sums.crossed > 0 || sums.lo > estate || sums.hi < estate {
            self.target
                .copy_from_slice(self.quotas.compute(members, owned, d));
            return &self.target;
        }
        let mut sum = sums.target;
        while sum != estate {
            let need = estate - sum;
            let moved = if !self.each && need.abs() <= MAX_STEPS {
                self.step(need, owned, estate, rest)
            } else {
                self.round(need, owned, estate, rest)
            };
            assert!(moved != 0, "bounds that add up leave room to move");
            sum += moved;
        }
        &self.target
    }

    /// Bounds of member `i` for the owner at hand.
    fn bounds(&self, i: usize, owned: &[u32]) -> (i32, i32) {
        if i == self.owner {
            (0, 0)
        } else if self.each || self.is_major[i] == 0 {
            (self.lo[i], self.hi[i])
        } else {
            let (floor, ceiling, fair_lo, fair_hi) = self.major_bounds;
            let owned = owned[i] as i32;
            (
                (floor - owned).max(fair_lo).max(0),
                (ceiling - owned).min(fair_hi),
            )
        }
    }

    /// Clamps every target within its bounds, computing the bounds once for the members
    /// with the most common weight, in one loop that vectorizes, and then for each other.
    fn bound_major(&mut self, owned: &[u32], row: &[u32], rest: u64, estate: u32) -> Sums {
        let d = self.owner;
        let (floor, ceiling) = share(self.members.size, self.major, rest);
        let fair = u64::from(estate) * u64::from(self.major);
        let (fair_lo, fair_hi) = fair_window(fair, rest, self.width);
        let (floor, ceiling) = (floor as i32, ceiling as i32);
        self.major_bounds = (floor, ceiling, fair_lo, fair_hi);
        let mut sums = match &mut self.narrow {
            Some(narrow) if ceiling < MAX_COUNT as i32 && estate < MAX_COUNT => {
                narrow.bound(row, (d, estate), self.major_bounds, &mut self.target)
            }
            _ => self.bound_wide(owned, row),
        };
        for k in 0..self.minors.len() {
            let i = self.minors[k];
            if i != d {
                self.bound_one(i, owned, row, rest, estate, &mut sums);
            }
        }
        sums
    }

    /// The major members' part of [`Targets::bound_major`] in `i32` lanes, whatever the
    /// counts.
    fn bound_wide(&mut self, owned: &[u32], row: &[u32]) -> Sums {
        let (n, d) = (self.target.len(), self.owner);
        let (floor, ceiling, fair_lo, fair_hi) = self.major_bounds;
        let (is_major, owned_n, row) = (&self.is_major[..n], &owned[..n], &row[..n]);
        let target = &mut self.target[..n];
        // i32 sums: n * TABLE_SIZE at most.
        let (mut lo_sum, mut hi_sum, mut sum, mut crossed) = (0i32, 0i32, 0i32, 0i32);
        for i in 0..n {
            let mine = (is_major[i] != 0) & (i != d);
            let lo = (floor - owned_n[i] as i32).max(fair_lo).max(0);
            let hi = (ceiling - owned_n[i] as i32).min(fair_hi);
            let t = (row[i] as i32).max(lo).min(hi);
            target[i] = if mine { t as u32 } else { 0 };
            let on = i32::from(mine);
            lo_sum += lo * on;
            hi_sum += hi * on;
            sum += t * on;
            crossed += i32::from(lo > hi) * on;
        }
        Sums {
            lo: i64::from(lo_sum),
            hi: i64::from(hi_sum),
            target: i64::from(sum),
            crossed: i64::from(crossed),
        }
    }

    /// [`Targets::bound_major`] member by member, for many distinct weights.
    fn bound_each(&mut self, owned: &[u32], row: &[u32], rest: u64, estate: u32) -> Sums {
        let mut sums = Sums::default();
        for i in 0..self.target.len() {
            if i == self.owner {
                (self.lo[i], self.hi[i], self.target[i]) = (0, 0, 0);
            } else {
                self.bound_one(i, owned, row, rest, estate, &mut sums);
            }
        }
        sums
    }

    /// Bounds and clamped target of member `i`, added to `sums`.
    fn bound_one(
        &mut self,
        i: usize,
        owned: &[u32],
        row: &[u32],
        rest: u64,
        estate: u32,
        sums: &mut Sums,
    ) {
        let weight = self.members.weights[i];
        let (floor, ceiling) = share(self.members.size, weight, rest);
        let fair = u64::from(estate) * u64::from(weight);
        let (fair_lo, fair_hi) = fair_window(fair, rest, self.width);
        let lo = (floor as i32 - owned[i] as i32).max(fair_lo).max(0);
        let hi = (ceiling as i32 - owned[i] as i32).min(fair_hi);
        let t = (row[i] as i32).max(lo).min(hi);
        (self.lo[i], self.hi[i], self.target[i]) = (lo, hi, t as u32);
        sums.lo += i64::from(lo);
        sums.hi += i64::from(hi);
        sums.target += i64::from(t);
        sums.crossed += i64::from(lo > hi);
    }

    /// Whether member `i` can take one more heir (`grow`) or give one up.
    fn has_room(&self, i: usize, owned: &[u32], grow: bool) -> bool {
        let (lo, hi) = self.bounds(i, owned);
        let t = self.target[i] as i32;
        if grow { t < hi } else { t > lo }
    }

    /// One more heir for the member furthest behind its fair part that has room (one less
    /// for the furthest ahead, if `need` is negative), ties to the lower position. Among
    /// the major members that is the first at the lowest (highest) target with room, and
    /// their targets lie within the fair window, so a few walks that stop at the first
    /// find it. Returns 1, -1, or 0 if no member has room.
    fn step(&mut self, need: i64, owned: &[u32], estate: i64, rest: u64) -> i64 {
        let grow = need > 0;
        let rank = |t: u32, weight: u32| {
            let ahead = i64::from(t) * rest as i64 - estate * i64::from(weight);
            if grow { ahead } else { -ahead }
        };
        let (_, _, fair_lo, fair_hi) = self.major_bounds;
        let levels = fair_lo.max(0)..=fair_hi.max(0);
        let major = |level: i32| {
            (0..self.target.len()).find(|&i| {
                self.is_major[i] != 0
                    && self.target[i] as i32 == level
                    && self.has_room(i, owned, grow)
            })
        };
        let pick = if grow {
            levels.clone().find_map(major)
        } else {
            levels.rev().find_map(major)
        };
        let mut best = pick.map(|i| pack(rank(self.target[i], self.major), i));
        for &i in &self.minors {
            if i != self.owner && self.has_room(i, owned, grow) {
                let key = pack(rank(self.target[i], self.members.weights[i]), i);
                best = Some(best.map_or(key, |b| b.min(key)));
            }
        }
        let Some(key) = best else {
            return 0;
        };
        let i = unpack(key);
        self.target[i] = if grow {
            self.target[i] + 1
        } else {
            self.target[i] - 1
        };
        need.signum()
    }

    /// One round: one more heir for each of the `need` members furthest behind their fair
    /// part that have room (one less for the furthest ahead), ties to the lower position.
    /// Returns how many it added (negative: took).
    fn round(&mut self, need: i64, owned: &[u32], estate: i64, rest: u64) -> i64 {
        let grow = need > 0;
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        for i in 0..self.target.len() {
            // How far ahead of its fair part member i is, as in HeirQuotas.
            let ahead = i64::from(self.target[i]) * rest as i64
                - estate * i64::from(self.members.weights[i]);
            if self.has_room(i, owned, grow) {
                candidates.push(pack(if grow { ahead } else { -ahead }, i));
            }
        }
        let take = (need.unsigned_abs() as usize).min(candidates.len());
        if take < candidates.len() {
            candidates.select_nth_unstable(take);
        }
        for &key in &candidates[..take] {
            let i = unpack(key);
            self.target[i] = if grow {
                self.target[i] + 1
            } else {
                self.target[i] - 1
            };
        }
        self.candidates = candidates;
        take as i64 * need.signum()
    }
}

/// The counts strictly within `width` of the fair part `fair / rest`.
fn fair_window(fair: u64, rest: u64, width: i32) -> (i32, i32) {
    let q = (fair / rest) as i32;
    let exact = fair.is_multiple_of(rest);
    (q + 1 - width, q + width - 1 + i32::from(!exact))
}
