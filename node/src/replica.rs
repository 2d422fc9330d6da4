//! This node's replica of the desired state: the in-memory [`StateMap`], kept on disk in the
//! [`StateDb`], stamped by this node's hybrid logical clock.
//!
//! A local write is durable (fsynced) before the client is answered, so what a client was told
//! is written survives a crash and a whole-cluster restart loses nothing. Entries learned from
//! peers are written at once but made durable lazily (within a couple of seconds, or with the
//! next local write): a crash can only lose them on this node, the peers still have them, and
//! anti-entropy brings them back; the network task never waits on fsync for them.

use std::time::Duration;

use uhlc::{HLC, HLCBuilder, ID};

use crate::datadir::{DataDirError, StateDb};
use crate::state::{Digest, Entry, InvalidEntry, StateMap, validate_entry};

/// Clock skew tolerated before a peer's stamp stops advancing our clock (its entries are
/// still merged; see docs/ARCHITECTURE.md).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Errors of a replica operation.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The key or value was refused.
    #[error(transparent)]
    Invalid(#[from] InvalidEntry),
    /// The write could not be made durable.
    #[error(transparent)]
    Storage(#[from] DataDirError),
}

/// What merging a batch of entries from a peer did.
#[derive(Debug, Default)]
pub struct Merged {
    /// Entries that were newer and are now current (and durable).
    pub applied: Vec<Entry>,
    /// Entries of the compared buckets that the peer lacks or has older (anti-entropy only).
    pub to_push: Vec<Entry>,
    /// Entries refused as malformed, with why: evidence against the peer.
    pub invalid: Vec<(Entry, InvalidEntry)>,
}

/// The state replica of one node.
pub struct Replica {
    map: StateMap,
    db: StateDb,
    /// Entries were written lazily (from peers, or by [`Replica::write_lazy`]) since the last
    /// durable commit.
    dirty: bool,
    hlc: HLC,
    origin: String,
}

impl Replica {
    /// Loads the replica from disk; `origin` is this node's peer id.
    pub fn load(db: StateDb, origin: String) -> Result<Self, DataDirError> {
        let entries = db.load()?;
        let id_bytes: [u8; 16] = blake3::hash(origin.as_bytes()).as_bytes()[..16]
            .try_into()
            .expect("16 bytes");
        let id = ID::try_from(id_bytes).unwrap_or_else(|_| ID::rand());
        let hlc = HLCBuilder::new()
            .with_id(id)
            .with_max_delta(MAX_CLOCK_SKEW)
            .build();
        for e in &entries {
            let _ = hlc.update_with_timestamp(&e.stamp);
        }
        Ok(Self {
            map: StateMap::from_entries(entries),
            dirty: false,
            db,
            hlc,
            origin,
        })
    }

    /// A local write (`None` deletes). Returns the stamped entry, already durable.
    pub fn write(&mut self, key: &str, value: Option<Vec<u8>>) -> Result<Entry, ReplicaError> {
        let entry = self.stamp(key, value)?;
        self.db.write(std::slice::from_ref(&entry))?;
        self.dirty = false; // a durable commit also persists earlier lazy ones
        self.map.merge(entry.clone());
        Ok(entry)
    }

    /// A local write made durable lazily, as entries from peers are (by the next [`flush`] or
    /// durable write), for records whose loss in a crash of this node does not matter: say,
    /// "this node is pulling blob X now", which is stale after a crash anyway. It spares the
    /// fsync, which a durable write makes while holding the replica.
    ///
    /// [`flush`]: Self::flush
    pub fn write_lazy(&mut self, key: &str, value: Option<Vec<u8>>) -> Result<Entry, ReplicaError> {
        let entry = self.stamp(key, value)?;
        self.db.write_lazy(std::slice::from_ref(&entry))?;
        self.dirty = true;
        self.map.merge(entry.clone());
        Ok(entry)
    }

    /// A new local entry, stamped and checked.
    fn stamp(&self, key: &str, value: Option<Vec<u8>>) -> Result<Entry, ReplicaError> {
        let entry = Entry {
            key: key.to_string(),
            value,
            stamp: self.hlc.new_timestamp(),
            origin: self.origin.clone(),
        };
        validate_entry(&entry)?;
        Ok(entry)
    }

    /// Applies entries from a peer. Invalid ones are returned separately (the caller counts
    /// them against the peer); the applied ones are durable when this returns.
    pub fn apply_remote(&mut self, entries: Vec<Entry>) -> Result<Merged, ReplicaError> {
        let mut merged = Merged::default();
        for e in entries {
            if let Err(why) = validate_entry(&e) {
                merged.invalid.push((e, why));
                continue;
            }
            let _ = self.hlc.update_with_timestamp(&e.stamp);
            if self
                .map
                .get_any(&e.key)
                .is_none_or(|cur| cur.stamp < e.stamp)
            {
                merged.applied.push(e);
            }
        }
        self.db.write_lazy(&merged.applied)?;
        self.dirty |= !merged.applied.is_empty();
        for e in &merged.applied {
            self.map.merge(e.clone());
        }
        Ok(merged)
    }

    /// Anti-entropy, responder side: the entries of the buckets where `theirs` differs.
    pub fn bucket_entries_for(
        &self,
        theirs: &Digest,
        max_bytes: usize,
    ) -> (Vec<usize>, Vec<Entry>) {
        let diff = self.map.differing_buckets(theirs);
        if diff.is_empty() {
            return (vec![], vec![]);
        }
        self.map.bucket_entries(&diff, max_bytes)
    }

    /// Anti-entropy, requester side: merges the peer's whole `covered` buckets and says what
    /// to push back.
    pub fn reconcile(
        &mut self,
        covered: &[usize],
        theirs: Vec<Entry>,
    ) -> Result<Merged, ReplicaError> {
        let mut invalid = Vec::new();
        let mut valid = Vec::with_capacity(theirs.len());
        for e in theirs {
            match validate_entry(&e) {
                Ok(()) => {
                    let _ = self.hlc.update_with_timestamp(&e.stamp);
                    valid.push(e);
                }
                Err(why) => invalid.push((e, why)),
            }
        }
        // Merge into a copy first so that memory only changes once the disk has the entries.
        let mut scratch = self.map.clone();
        let (applied, to_push) = scratch.reconcile(covered, valid);
        self.db.write_lazy(&applied)?;
        self.dirty |= !applied.is_empty();
        self.map = scratch;
        Ok(Merged {
            applied,
            to_push,
            invalid,
        })
    }

    /// Makes entries written lazily (learned from peers, or local lazy writes) durable, if any.
    pub fn flush(&mut self) -> Result<(), ReplicaError> {
        if self.dirty {
            self.db.flush()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// The in-memory map, for reads.
    pub fn map(&self) -> &StateMap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(dir: &std::path::Path, name: &str) -> Replica {
        let db = StateDb::open(&dir.join(format!("{name}.redb"))).unwrap();
        Replica::load(db, name.into()).unwrap()
    }

    #[test]
    fn local_writes_are_durable_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = replica(dir.path(), "a");
            let w1 = r.write("k", Some(b"1".to_vec())).unwrap();
            let w2 = r.write("k", Some(b"2".to_vec())).unwrap();
            assert!(w2.stamp > w1.stamp);
            r.write("gone", Some(b"x".to_vec())).unwrap();
            r.write("gone", None).unwrap();
        }
        let r = replica(dir.path(), "a");
        assert_eq!(r.map().get("k").unwrap().value.as_deref(), Some(&b"2"[..]));
        assert!(r.map().get("gone").is_none());
        // the clock moved past what was loaded
        let mut r = r;
        let w3 = r.write("k", Some(b"3".to_vec())).unwrap();
        assert!(w3.stamp > r.map().get_any("gone").unwrap().stamp);
    }

    #[test]
    fn lazy_local_writes_are_seen_at_once_and_kept_by_the_next_flush_or_durable_write() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = replica(dir.path(), "a");
            let w1 = r.write_lazy("pulling/x", Some(b"1".to_vec())).unwrap();
            assert_eq!(r.map().get("pulling/x").unwrap().stamp, w1.stamp);
            r.flush().unwrap();
            r.write_lazy("pulling/y", Some(b"1".to_vec())).unwrap();
            let w2 = r.write("k", Some(b"2".to_vec())).unwrap();
            assert!(
                w2.stamp > w1.stamp,
                "lazy and durable writes share one clock"
            );
            r.write_lazy("pulling/x", None).unwrap();
            r.flush().unwrap();
            assert!(r.write_lazy("bad key", None).is_err());
        }
        let r = replica(dir.path(), "a");
        assert!(r.map().get("pulling/x").is_none());
        assert!(r.map().get("pulling/y").is_some());
        assert!(r.map().get("k").is_some());
    }

    #[test]
    fn invalid_remote_entries_are_separated_and_nothing_else_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = replica(dir.path(), "a");
        let mut b = replica(dir.path(), "b");
        let good = a.write("ok", Some(b"1".to_vec())).unwrap();
        let mut bad = good.clone();
        bad.key = "bad key".into();
        let merged = b.apply_remote(vec![bad, good.clone()]).unwrap();
        assert_eq!(merged.applied, vec![good]);
        assert_eq!(merged.invalid.len(), 1);
        assert!(b.write("", None).is_err());
    }
}
