//! A name index kept as one sorted array: built with one sort, looked up by
//! binary search, and serialized flat, so a table read back from the host
//! cache needs no rebuild (a hash map would be rebuilt entry by entry).

use serde::{Deserialize, Serialize};

/// Items (ids, indices) sorted by the name each stands for; items with the
/// same name keep the order they were given in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct NameIndex<T>(Vec<T>);

impl<T> NameIndex<T> {
    /// Sorts `items` by `name` (stable; bytes order is `str` order).
    pub(crate) fn build<'a>(items: Vec<T>, name: impl Fn(&T) -> &'a [u8]) -> NameIndex<T> {
        // Each name is looked up once, not once per comparison.
        let mut keyed: Vec<(&[u8], T)> = items.into_iter().map(|t| (name(&t), t)).collect();
        keyed.sort_by(|a, b| a.0.cmp(b.0));
        NameIndex(keyed.into_iter().map(|(_, t)| t).collect())
    }

    /// The items named `want`, in the order they were given.
    pub(crate) fn get<'a>(&self, want: &[u8], name: impl Fn(&T) -> &'a [u8]) -> &[T] {
        let lo = self.0.partition_point(|x| name(x) < want);
        let rest = self.0.get(lo..).unwrap_or(&[]);
        let n = rest.partition_point(|x| name(x) == want);
        rest.get(..n).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_keep_their_order_and_missing_names_are_empty() {
        let names = ["b", "a", "c", "a", "b", "a"];
        let name = |i: &usize| names[*i].as_bytes();
        let ix = NameIndex::build((0..names.len()).collect(), name);
        assert_eq!(ix.get(b"a", name), &[1, 3, 5]);
        assert_eq!(ix.get(b"b", name), &[0, 4]);
        assert_eq!(ix.get(b"c", name), &[2]);
        assert!(ix.get(b"", name).is_empty());
        assert!(ix.get(b"bb", name).is_empty());
        assert!(ix.get(b"z", name).is_empty());
        let empty: NameIndex<usize> = NameIndex::build(Vec::new(), name);
        assert!(empty.get(b"a", name).is_empty());
    }
}
