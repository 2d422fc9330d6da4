//! The replicated desired state as plain data: a last-writer-wins map with no I/O.
//!
//! Every node holds a full replica. A write is an [`Entry`] stamped with a hybrid logical clock
//! ([`uhlc::Timestamp`], whose order is `(time, writer id)`, so it is total); the entry with the
//! highest stamp wins on every replica, whatever order writes arrive in. Deletes are tombstones
//! (entries without a value) so that a delete beats an older write that arrives late.
//!
//! Anti-entropy compares [`Digest`]s: the key space is split into [`BUCKETS`] buckets by a hash
//! of the key, and each bucket's digest is the XOR of `blake3(key, stamp)` over its entries, so a
//! replica keeps its digest current in O(1) per write and two replicas find the buckets where
//! they differ by comparing 64 hashes. The network code in `p2p` drives the exchange; this module
//! only computes.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uhlc::Timestamp;

/// Number of anti-entropy buckets the key space is split into.
pub const BUCKETS: usize = 64;
/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Largest value accepted, in bytes. Keeps every entry well inside one gossip message.
pub const MAX_VALUE_LEN: usize = 128 * 1024;

/// One versioned write: a value, or a tombstone when `value` is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key, validated by [`validate_key`].
    pub key: String,
    /// The value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// Hybrid logical clock stamp of the write; the highest stamp wins.
    pub stamp: Timestamp,
    /// Peer id of the node that accepted the write.
    pub origin: String,
}

impl Entry {
    /// True when this entry records a delete.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&(self.key.len() as u64).to_le_bytes());
        h.update(self.key.as_bytes());
        h.update(&self.stamp.get_time().as_u64().to_le_bytes());
        h.update(&self.stamp.get_id().to_le_bytes());
        *h.finalize().as_bytes()
    }
}

/// Why a key or an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEntry {
    /// The key is empty.
    #[error("key is empty")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("key is {0} bytes long; the limit is {MAX_KEY_LEN}")]
    KeyTooLong(usize),
    /// The key contains a character outside `[A-Za-z0-9._:/@=+-]`.
    #[error("key contains {0:?}; allowed are letters, digits and . _ : / @ = + -")]
    BadKeyChar(char),
    /// The value is larger than [`MAX_VALUE_LEN`].
    #[error("value is {0} bytes; the limit is {MAX_VALUE_LEN}")]
    ValueTooLarge(usize),
}

/// Checks that a key is non-empty, short enough and made of plain characters.
pub fn validate_key(key: &str) -> Result<(), InvalidEntry> {
    if key.is_empty() {
        return Err(InvalidEntry::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(InvalidEntry::KeyTooLong(key.len()));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:/@=+-".contains(*c)))
    {
        return Err(InvalidEntry::BadKeyChar(c));
    }
    Ok(())
}

/// Checks a whole entry, as received from a client or a peer.
pub fn validate_entry(entry: &Entry) -> Result<(), InvalidEntry> {
    validate_key(&entry.key)?;
    match &entry.value {
        Some(v) if v.len() > MAX_VALUE_LEN => Err(InvalidEntry::ValueTooLarge(v.len())),
        _ => Ok(()),
    }
}

/// Index of the anti-entropy bucket a key falls in.
pub fn bucket_of(key: &str) -> usize {
    let h = blake3::hash(key.as_bytes());
    (h.as_bytes()[0] as usize) % BUCKETS
}

/// Per-bucket summary of a replica, exchanged to find where two replicas differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// One XOR-of-fingerprints per bucket, [`BUCKETS`] long.
    pub buckets: Vec<[u8; 32]>,
}

/// What [`StateMap::merge`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The entry was newer than what the replica had and is now current.
    Applied,
    /// The replica already had this entry or a newer one.
    Stale,
}

/// One replica of the desired state, in memory.
#[derive(Debug, Clone)]
pub struct StateMap {
    entries: BTreeMap<String, Entry>,
    buckets: Vec<[u8; 32]>,
    live: usize,
}

impl Default for StateMap {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            buckets: vec![[0; 32]; BUCKETS],
            live: 0,
        }
    }
}

fn xor_into(acc: &mut [u8; 32], x: &[u8; 32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a ^= b;
    }
}

impl StateMap {
    /// Builds a replica from entries loaded from disk (merging, so duplicates are harmless).
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Self {
        let mut map = Self::default();
        for e in entries {
            map.merge(e);
        }
        map
    }

    /// Applies an entry if it is newer than the current one for its key.
    pub fn merge(&mut self, entry: Entry) -> MergeOutcome {
        let bucket = bucket_of(&entry.key);
        if let Some(current) = self.entries.get(&entry.key) {
            if current.stamp >= entry.stamp {
                return MergeOutcome::Stale;
            }
            let old_fp = current.fingerprint();
            xor_into(&mut self.buckets[bucket], &old_fp);
            if !current.is_tombstone() {
                self.live -= 1;
            }
        }
        xor_into(&mut self.buckets[bucket], &entry.fingerprint());
        if !entry.is_tombstone() {
            self.live += 1;
        }
        self.entries.insert(entry.key.clone(), entry);
        MergeOutcome::Applied
    }

    /// The live (non-deleted) entry for a key.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key).filter(|e| !e.is_tombstone())
    }

    /// The current entry for a key, tombstone or not.
    pub fn get_any(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Live entries whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> impl Iterator<Item = &Entry> {
        self.entries
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
            .filter(|e| !e.is_tombstone())
    }

    /// Number of live entries.
    pub fn live_len(&self) -> usize {
        self.live
    }

    /// Number of entries including tombstones.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the replica holds nothing, not even tombstones.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// This replica's per-bucket summary.
    pub fn digest(&self) -> Digest {
        Digest {
            buckets: self.buckets.clone(),
        }
    }

    /// Buckets in which this replica differs from a peer's digest. A digest of the wrong
    /// length (a confused or lying peer) differs everywhere it cannot be compared.
    pub fn differing_buckets(&self, theirs: &Digest) -> Vec<usize> {
        (0..BUCKETS)
            .filter(|&b| theirs.buckets.get(b) != Some(&self.buckets[b]))
            .collect()
    }

    /// All entries (tombstones included) of the given buckets, as many whole buckets as fit
    /// in `max_bytes` of values. Returns the buckets covered and their entries; at least one
    /// bucket is always covered when any is asked for, so a sync always makes progress.
    pub fn bucket_entries(&self, buckets: &[usize], max_bytes: usize) -> (Vec<usize>, Vec<Entry>) {
        let wanted: BTreeSet<usize> = buckets.iter().copied().filter(|b| *b < BUCKETS).collect();
        let mut per_bucket: BTreeMap<usize, Vec<&Entry>> = BTreeMap::new();
        for e in self.entries.values() {
            let b = bucket_of(&e.key);
            if wanted.contains(&b) {
                per_bucket.entry(b).or_default().push(e);
            }
        }
        let mut covered = Vec::new();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for b in wanted {
            let list = per_bucket.remove(&b).unwrap_or_default();
            let size: usize = list
                .iter()
                .map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len) + 64)
                .sum();
            if !covered.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            covered.push(b);
            out.extend(list.into_iter().cloned());
        }
        (covered, out)
    }

    /// Merges a peer's full contents of `covered` buckets and returns what this replica
    /// applied, plus the entries of those buckets that the peer lacks or has older, which
    /// the caller sends back so that both sides end equal.
    pub fn reconcile(&mut self, covered: &[usize], theirs: Vec<Entry>) -> (Vec<Entry>, Vec<Entry>) {
        let covered: BTreeSet<usize> = covered.iter().copied().collect();
        let mut their_stamps: BTreeMap<String, Timestamp> = BTreeMap::new();
        let mut applied = Vec::new();
        for e in theirs {
            if !covered.contains(&bucket_of(&e.key)) {
                continue; // not part of what the peer claimed to send
            }
            their_stamps.insert(e.key.clone(), e.stamp);
            if self.merge(e.clone()) == MergeOutcome::Applied {
                applied.push(e);
            }
        }
        let to_push = self
            .entries
            .values()
            .filter(|e| covered.contains(&bucket_of(&e.key)))
            .filter(|e| their_stamps.get(&e.key).is_none_or(|s| *s < e.stamp))
            .cloned()
            .collect();
        (applied, to_push)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uhlc::{ID, NTP64};

    fn stamp(time: u64, id: u8) -> Timestamp {
        Timestamp::new(NTP64(time), ID::try_from([id.max(1)]).unwrap())
    }

    fn entry(key: &str, value: Option<&str>, time: u64, id: u8) -> Entry {
        Entry {
            key: key.into(),
            value: value.map(|v| v.as_bytes().to_vec()),
            stamp: stamp(time, id),
            origin: format!("node{id}"),
        }
    }

    #[test]
    fn newer_write_wins_and_older_is_stale() {
        let mut m = StateMap::default();
        assert_eq!(m.merge(entry("a", Some("1"), 10, 1)), MergeOutcome::Applied);
        assert_eq!(m.merge(entry("a", Some("0"), 5, 2)), MergeOutcome::Stale);
        assert_eq!(m.merge(entry("a", Some("2"), 11, 1)), MergeOutcome::Applied);
        assert_eq!(m.get("a").unwrap().value.as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn equal_time_is_broken_by_writer_id() {
        let mut a = StateMap::default();
        let mut b = StateMap::default();
        let x = entry("k", Some("x"), 10, 1);
        let y = entry("k", Some("y"), 10, 2);
        a.merge(x.clone());
        a.merge(y.clone());
        b.merge(y);
        b.merge(x);
        assert_eq!(a.get("k"), b.get("k"));
        assert_eq!(a.get("k").unwrap().value.as_deref(), Some(&b"y"[..]));
    }

    #[test]
    fn tombstone_hides_value_and_beats_late_older_write() {
        let mut m = StateMap::default();
        m.merge(entry("a", Some("1"), 10, 1));
        m.merge(entry("a", None, 20, 1));
        assert!(m.get("a").is_none());
        assert_eq!(
            m.merge(entry("a", Some("late"), 15, 2)),
            MergeOutcome::Stale
        );
        assert!(m.get("a").is_none());
        assert_eq!(m.live_len(), 0);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn list_respects_prefix_and_skips_tombstones() {
        let mut m = StateMap::default();
        m.merge(entry("svc/a", Some("1"), 1, 1));
        m.merge(entry("svc/b", Some("1"), 1, 1));
        m.merge(entry("svc/c", None, 1, 1));
        m.merge(entry("sva", Some("1"), 1, 1));
        m.merge(entry("t", Some("1"), 1, 1));
        let keys: Vec<_> = m.list("svc/").map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["svc/a", "svc/b"]);
        assert_eq!(m.list("").count(), 4);
    }

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("svc/web:1.0").is_ok());
        assert_eq!(validate_key(""), Err(InvalidEntry::EmptyKey));
        assert_eq!(validate_key("a b"), Err(InvalidEntry::BadKeyChar(' ')));
        assert_eq!(validate_key("a\nb"), Err(InvalidEntry::BadKeyChar('\n')));
        assert!(matches!(
            validate_key(&"k".repeat(300)),
            Err(InvalidEntry::KeyTooLong(300))
        ));
        let mut big = entry("k", None, 1, 1);
        big.value = Some(vec![0; MAX_VALUE_LEN + 1]);
        assert!(matches!(
            validate_entry(&big),
            Err(InvalidEntry::ValueTooLarge(_))
        ));
    }

    #[test]
    fn wrong_length_digest_differs_everywhere() {
        let m = StateMap::default();
        let d = Digest { buckets: vec![] };
        assert_eq!(m.differing_buckets(&d).len(), BUCKETS);
    }

    #[test]
    fn bucket_entries_always_makes_progress() {
        let mut m = StateMap::default();
        for i in 0..50 {
            let mut e = entry(&format!("k{i}"), None, 1, 1);
            e.value = Some(vec![7; 1000]);
            m.merge(e);
        }
        let all: Vec<usize> = (0..BUCKETS).collect();
        let (covered, entries) = m.bucket_entries(&all, 10);
        assert!(!covered.is_empty());
        assert!(entries.iter().all(|e| bucket_of(&e.key) == covered[0]));
    }

    /// Runs the two-step exchange that `p2p` runs over the network, without it.
    fn sync(a: &mut StateMap, b: &mut StateMap, max_bytes: usize) {
        for _ in 0..=BUCKETS {
            let diff = b.differing_buckets(&a.digest());
            if diff.is_empty() {
                return;
            }
            let (covered, theirs) = b.bucket_entries(&diff, max_bytes);
            let (_applied, push) = a.reconcile(&covered, theirs);
            for e in push {
                b.merge(e);
            }
        }
        panic!("sync did not converge");
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        // One stamp is one write: the value is a function of (key, time, writer).
        (0u8..40, 1u64..50, 1u8..5).prop_map(|(k, t, id)| {
            let value = ((u64::from(k) + t + u64::from(id)) % 4 != 0).then(|| format!("v{t}-{id}"));
            entry(&format!("k{k}"), value.as_deref(), t, id)
        })
    }

    proptest! {
        #[test]
        fn merge_order_does_not_matter(mut es in proptest::collection::vec(arb_entry(), 0..60), seed in any::<u64>()) {
            let a = StateMap::from_entries(es.clone());
            // a deterministic shuffle driven by the seed
            let n = es.len();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                es.swap(i, (s >> 33) as usize % (i + 1));
            }
            let b = StateMap::from_entries(es);
            prop_assert_eq!(a.digest(), b.digest());
            prop_assert_eq!(a.list("").collect::<Vec<_>>(), b.list("").collect::<Vec<_>>());
        }

        #[test]
        fn anti_entropy_converges(xs in proptest::collection::vec(arb_entry(), 0..60),
                                  ys in proptest::collection::vec(arb_entry(), 0..60),
                                  max_bytes in 1usize..4000) {
            let mut a = StateMap::from_entries(xs.clone());
            let mut b = StateMap::from_entries(ys.clone());
            sync(&mut a, &mut b, max_bytes);
            let union = StateMap::from_entries(xs.into_iter().chain(ys));
            prop_assert_eq!(a.digest(), union.digest());
            prop_assert_eq!(b.digest(), union.digest());
            prop_assert_eq!(a.list("").collect::<Vec<_>>(), union.list("").collect::<Vec<_>>());
        }
    }
}
