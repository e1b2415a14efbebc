//! A stable sort by a small integer key (an entry's index, an owner's position): linear in
//! the items, so an operation touching tens of thousands of entries (a removal from a few
//! members) does not pay a comparison sort's `k log k`.

/// Sorts `items` by `key` (below `1 << bits`), stably: items of one key keep their order.
pub(super) fn sort_by_key<T: Copy>(items: &mut Vec<T>, bits: u32, key: impl Fn(&T) -> u32) {
    const DIGIT: u32 = 8;
    if items.len() < 64 {
        // Few items: a comparison sort is cheaper than a pass over the buckets.
        items.sort_by_key(|item| key(item));
        return;
    }
    let mut scratch = items.clone();
    let mut shift = 0;
    while shift < bits {
        let digit = |item: &T| ((key(item) >> shift) & ((1 << DIGIT) - 1)) as usize;
        let mut starts = [0usize; 1 << DIGIT];
        for item in items.iter() {
            starts[digit(item)] += 1;
        }
        let mut next = 0;
        for start in &mut starts {
            let count = *start;
            *start = next;
            next += count;
        }
        for item in items.iter() {
            let bucket = &mut starts[digit(item)];
            scratch[*bucket] = *item;
            *bucket += 1;
        }
        std::mem::swap(items, &mut scratch);
        shift += DIGIT;
    }
}

#[cfg(test)]
mod tests {
    use super::sort_by_key;

    #[test]
    fn sorts_stably_by_the_key() {
        for len in [0, 5, 63, 64, 1000, 50_000] {
            let mut items: Vec<(u32, u32)> = (0..len as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) % 70_000, i))
                .collect();
            let mut expected = items.clone();
            expected.sort_by_key(|&(key, _)| key);
            sort_by_key(&mut items, 17, |&(key, _)| key);
            assert_eq!(items, expected, "{len} items");
        }
    }
}
