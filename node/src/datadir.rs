//! The node's data directory: its identity, its marker and its state database.
//!
//! A data dir belongs to exactly one cluster. A marker file records the format and the public
//! cluster id; opening a directory that has files but no marker (someone else's directory), a
//! marker of another cluster, or a database that does not open is an error that says so. The
//! node never resets a data dir on its own: losing the desired state silently is worse than
//! refusing to start.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::Entry;

const MARKER: &str = "MESHWORK";
const IDENTITY: &str = "identity.key";
const STATE_DB: &str = "state.redb";
const FORMAT: u32 = 1;
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");

/// Errors opening or writing the data dir. Each names the path and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The directory has files but no Meshwork marker.
    #[error(
        "{0} is not empty and is not a Meshwork data dir (no {MARKER} file); refusing to use it"
    )]
    Foreign(PathBuf),
    /// The marker exists but cannot be read.
    #[error("{path}: corrupt marker file: {reason}")]
    CorruptMarker {
        /// The marker path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The data dir was written by a different on-disk format.
    #[error("{path}: data dir format {found}, this meshd understands format {FORMAT}")]
    UnsupportedFormat {
        /// The marker path.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
    /// The data dir belongs to another cluster (another join secret).
    #[error(
        "{path}: data dir belongs to cluster {found}, but the secret given is for cluster {expected}"
    )]
    OtherCluster {
        /// The marker path.
        path: PathBuf,
        /// Cluster id in the marker.
        found: String,
        /// Cluster id of the secret given.
        expected: String,
    },
    /// The identity key does not decode.
    #[error("{0}: corrupt node identity key")]
    CorruptIdentity(PathBuf),
    /// The state database failed.
    #[error("{path}: state database: {reason}")]
    Database {
        /// The database path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// An entry in the database does not decode.
    #[error("{path}: corrupt state entry {key:?}: {reason}")]
    CorruptEntry {
        /// The database path.
        path: PathBuf,
        /// The key of the bad entry.
        key: String,
        /// The decoding error.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Marker {
    format: u32,
    cluster_id: String,
}

/// An opened, validated data dir.
pub struct DataDir {
    root: PathBuf,
    identity: Keypair,
    db: StateDb,
}

impl DataDir {
    /// Opens (creating if absent) the data dir for the cluster `cluster_id`.
    pub fn open(root: &Path, cluster_id: &str) -> Result<Self, DataDirError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DataDirError::Io { path, source }
        };
        fs::create_dir_all(root).map_err(io(root))?;
        let marker_path = root.join(MARKER);
        if marker_path.exists() {
            let text = fs::read_to_string(&marker_path).map_err(io(&marker_path))?;
            let marker: Marker =
                serde_json::from_str(&text).map_err(|e| DataDirError::CorruptMarker {
                    path: marker_path.clone(),
                    reason: e.to_string(),
                })?;
            if marker.format != FORMAT {
                return Err(DataDirError::UnsupportedFormat {
                    path: marker_path,
                    found: marker.format,
                });
            }
            if marker.cluster_id != cluster_id {
                return Err(DataDirError::OtherCluster {
                    path: marker_path,
                    found: marker.cluster_id,
                    expected: cluster_id.to_string(),
                });
            }
        } else {
            let mut entries = fs::read_dir(root).map_err(io(root))?;
            if entries.next().is_some() {
                return Err(DataDirError::Foreign(root.to_path_buf()));
            }
            let marker = Marker {
                format: FORMAT,
                cluster_id: cluster_id.to_string(),
            };
            let text = serde_json::to_string_pretty(&marker).expect("marker serializes");
            write_atomic(&marker_path, text.as_bytes())?;
        }

        let id_path = root.join(IDENTITY);
        let identity = if id_path.exists() {
            let bytes = fs::read(&id_path).map_err(io(&id_path))?;
            Keypair::from_protobuf_encoding(&bytes)
                .map_err(|_| DataDirError::CorruptIdentity(id_path.clone()))?
        } else {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .expect("ed25519 keys always encode");
            write_atomic(&id_path, &bytes)?;
            key
        };

        let db = StateDb::open(&root.join(STATE_DB))?;
        Ok(Self {
            root: root.to_path_buf(),
            identity,
            db,
        })
    }

    /// The node's libp2p identity, stable across restarts.
    pub fn identity(&self) -> &Keypair {
        &self.identity
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Splits off the state database, which the replica owns.
    pub fn into_db(self) -> StateDb {
        self.db
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let tmp = path.with_extension("tmp");
    let err = |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::create(&tmp).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// The desired state on disk: one redb table from key to encoded [`Entry`].
pub struct StateDb {
    path: PathBuf,
    db: Database,
}

impl StateDb {
    /// Opens or creates the database file.
    pub fn open(path: &Path) -> Result<Self, DataDirError> {
        let db = Database::create(path).map_err(|e| DataDirError::Database {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let this = Self {
            path: path.to_path_buf(),
            db,
        };
        // Make sure the table exists so that reads on a fresh database succeed.
        this.write(&[])?;
        Ok(this)
    }

    fn db_err(&self, e: impl std::fmt::Display) -> DataDirError {
        DataDirError::Database {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Every stored entry. A record that does not decode is an error, not a skip.
    pub fn load(&self) -> Result<Vec<Entry>, DataDirError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = tx.open_table(ENTRIES).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            let entry: Entry =
                postcard::from_bytes(v.value()).map_err(|e| DataDirError::CorruptEntry {
                    path: self.path.clone(),
                    key: k.value().to_string(),
                    reason: e.to_string(),
                })?;
            out.push(entry);
        }
        Ok(out)
    }

    /// Writes entries in one durable transaction (on disk when this returns).
    pub fn write(&self, entries: &[Entry]) -> Result<(), DataDirError> {
        self.write_with(entries, true)
    }

    /// Writes entries without waiting for the disk: they become durable with the next
    /// durable write or [`StateDb::flush`]. For entries learned from peers, which a crash can
    /// only lose on this node (the peers still have them, and anti-entropy brings them back):
    /// the network task must not wait on fsync.
    pub fn write_lazy(&self, entries: &[Entry]) -> Result<(), DataDirError> {
        self.write_with(entries, false)
    }

    /// Makes every earlier lazy write durable.
    pub fn flush(&self) -> Result<(), DataDirError> {
        self.write_with(&[], true)
    }

    fn write_with(&self, entries: &[Entry], durable: bool) -> Result<(), DataDirError> {
        let mut tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(|e| self.db_err(e))?;
        }
        {
            let mut table = tx.open_table(ENTRIES).map_err(|e| self.db_err(e))?;
            for e in entries {
                let bytes = postcard::to_allocvec(e).expect("entries serialize");
                table
                    .insert(e.key.as_str(), bytes.as_slice())
                    .map_err(|e| self.db_err(e))?;
            }
        }
        tx.commit().map_err(|e| self.db_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_keeps_identity_and_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (peer, entry) = {
            let dd = DataDir::open(dir.path(), "c1").unwrap();
            let peer = dd.identity().public().to_peer_id();
            let hlc = uhlc::HLC::default();
            let entry = Entry {
                key: "a".into(),
                value: Some(b"1".to_vec()),
                stamp: hlc.new_timestamp(),
                origin: peer.to_string(),
            };
            dd.into_db().write(std::slice::from_ref(&entry)).unwrap();
            (peer, entry)
        };
        let dd = DataDir::open(dir.path(), "c1").unwrap();
        assert_eq!(dd.identity().public().to_peer_id(), peer);
        assert_eq!(dd.into_db().load().unwrap(), vec![entry]);
    }

    #[test]
    fn foreign_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("photo.jpg"), b"x").unwrap();
        let err = DataDir::open(dir.path(), "c1").err().unwrap();
        assert!(matches!(err, DataDirError::Foreign(_)), "{err}");
        assert!(dir.path().join("photo.jpg").exists());
    }

    #[test]
    fn other_cluster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(DataDir::open(dir.path(), "c1").unwrap());
        let err = DataDir::open(dir.path(), "c2").err().unwrap();
        assert!(err.to_string().contains("belongs to cluster c1"), "{err}");
    }

    #[test]
    fn corrupt_database_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        drop(DataDir::open(dir.path(), "c1").unwrap());
        fs::write(dir.path().join(STATE_DB), vec![0x5a; 8192]).unwrap();
        let err = DataDir::open(dir.path(), "c1").err().unwrap();
        assert!(matches!(err, DataDirError::Database { .. }), "{err}");
        // nothing was rewritten
        assert_eq!(
            fs::read(dir.path().join(STATE_DB)).unwrap(),
            vec![0x5a; 8192]
        );
    }

    #[test]
    fn corrupt_identity_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(DataDir::open(dir.path(), "c1").unwrap());
        fs::write(dir.path().join(IDENTITY), b"garbage").unwrap();
        let err = DataDir::open(dir.path(), "c1").err().unwrap();
        assert!(matches!(err, DataDirError::CorruptIdentity(_)), "{err}");
    }
}
