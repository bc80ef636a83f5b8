//! A name index kept as one sorted array: built with one sort, looked up by
//! binary search, and serialized flat, so a table read back from the host
//! cache needs no rebuild (a hash map would be rebuilt entry by entry).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// Items (ids, indices) sorted by the name each stands for; items with the
/// same name keep the order they were given in. Each entry carries its
/// name's first 8 bytes, so most comparisons of a lookup stay inside the
/// array instead of following the item to its name.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct NameIndex<T>(Vec<(u64, T)>);

/// The first 8 bytes of `name`, big-endian and zero-padded: ordering these
/// orders names that differ in them as the names order (names hold no NUL).
fn prefix(name: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = name.len().min(8);
    if let (Some(dst), Some(src)) = (b.get_mut(..n), name.get(..n)) {
        dst.copy_from_slice(src);
    }
    u64::from_be_bytes(b)
}

impl<T> NameIndex<T> {
    /// Sorts `items` by `name` (stable; bytes order is `str` order).
    pub(crate) fn build<'a>(items: Vec<T>, name: impl Fn(&T) -> &'a [u8]) -> NameIndex<T> {
        // Each name is looked up once, not once per comparison.
        let mut keyed: Vec<(&[u8], T)> = items.into_iter().map(|t| (name(&t), t)).collect();
        keyed.sort_by(|a, b| a.0.cmp(b.0));
        NameIndex(keyed.into_iter().map(|(n, t)| (prefix(n), t)).collect())
    }

    /// The items named `want`, in the order they were given.
    pub(crate) fn get<'a>(&self, want: &[u8], name: impl Fn(&T) -> &'a [u8]) -> impl Iterator<Item = &T> {
        let p = prefix(want);
        // Equal prefixes of a name shorter than 8 bytes mean equal names.
        let cmp = |(q, t): &(u64, T)| q.cmp(&p).then_with(|| if want.len() < 8 { Ordering::Equal } else { name(t).cmp(want) });
        let lo = self.0.partition_point(|e| cmp(e) == Ordering::Less);
        let rest = self.0.get(lo..).unwrap_or(&[]);
        let n = rest.partition_point(|e| cmp(e) == Ordering::Equal);
        rest.get(..n).unwrap_or(&[]).iter().map(|(_, t)| t)
    }

    /// The items whose names start with `prefix`, in name order.
    pub(crate) fn with_prefix<'a>(&self, prefix: &[u8], name: impl Fn(&T) -> &'a [u8]) -> impl Iterator<Item = &T> {
        let lo = self.0.partition_point(|(_, t)| name(t) < prefix);
        let rest = self.0.get(lo..).unwrap_or(&[]);
        let n = rest.partition_point(|(_, t)| name(t).starts_with(prefix));
        rest.get(..n).unwrap_or(&[]).iter().map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_keep_their_order_and_missing_names_are_empty() {
        let names = ["b", "a", "c", "a", "b", "a", "abcdefghij", "abcdefghik", "abcdefgh", "abcdefghij", ""];
        let name = |i: &usize| names[*i].as_bytes();
        let ix = NameIndex::build((0..names.len()).collect(), name);
        let get = |w: &str| ix.get(w.as_bytes(), name).copied().collect::<Vec<_>>();
        assert_eq!(get("a"), [1, 3, 5]);
        assert_eq!(get("b"), [0, 4]);
        assert_eq!(get("c"), [2]);
        assert_eq!(get("abcdefgh"), [8]);
        assert_eq!(get("abcdefghij"), [6, 9]);
        assert_eq!(get("abcdefghik"), [7]);
        assert_eq!(get(""), [10]);
        for missing in ["bb", "z", "abcdefg", "abcdefghi", "abcdefghijk", "0"] {
            assert!(get(missing).is_empty(), "{missing}");
        }
        let pre = |w: &str| ix.with_prefix(w.as_bytes(), name).copied().collect::<Vec<_>>();
        assert_eq!(pre("abcdefghi"), [6, 9, 7]);
        assert_eq!(pre("a"), [1, 3, 5, 8, 6, 9, 7]);
        assert_eq!(pre("").len(), names.len());
        assert!(pre("q").is_empty());
        let empty: NameIndex<usize> = NameIndex::build(Vec::new(), name);
        assert_eq!(empty.get(b"a", name).count(), 0);
    }
}
