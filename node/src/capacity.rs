//! What this machine can offer, measured from the OS.
//!
//! CPU cores and memory are read once at start (honouring a cgroup memory limit when the node
//! runs in one) and can be overridden with `--cpu` and `--memory`; free disk is re-read for the
//! file system that holds the data dir, because it changes while the node runs.

use std::path::{Path, PathBuf};

use sysinfo::{Disks, System};

use crate::membership::Resources;

/// Measures the node's capacity.
pub struct CapacityProbe {
    data_dir: PathBuf,
    total: Resources,
    disks: Disks,
}

impl CapacityProbe {
    /// Measures CPU and memory now; `cpu_cores` and `memory_bytes` override the measurement.
    pub fn new(data_dir: &Path, cpu_cores: Option<f64>, memory_bytes: Option<u64>) -> Self {
        let cpu_millis = match cpu_cores {
            Some(c) => (c * 1000.0).round() as u64,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()) as u64 * 1000,
        };
        let memory_bytes = memory_bytes.unwrap_or_else(|| {
            let mut sys = System::new();
            sys.refresh_memory();
            let total = sys.total_memory();
            sys.cgroup_limits()
                .map_or(total, |c| c.total_memory.min(total))
        });
        Self {
            data_dir: data_dir
                .canonicalize()
                .unwrap_or_else(|_| data_dir.to_path_buf()),
            total: Resources {
                cpu_millis,
                memory_bytes,
            },
            disks: Disks::new_with_refreshed_list(),
        }
    }

    /// Schedulable CPU and memory.
    pub fn total(&self) -> Resources {
        self.total
    }

    /// Free bytes on the file system of the data dir (the disk with the longest mount point
    /// that contains it), re-read now.
    pub fn disk_free_bytes(&mut self) -> u64 {
        self.disks.refresh(true);
        self.disks
            .list()
            .iter()
            .filter(|d| self.data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map_or(0, |d| d.available_space())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_real_machine_and_honours_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = CapacityProbe::new(dir.path(), None, None);
        assert!(p.total().cpu_millis >= 1000);
        assert!(p.total().memory_bytes > 0);
        assert!(p.disk_free_bytes() > 0);
        let p = CapacityProbe::new(dir.path(), Some(2.5), Some(1 << 30));
        assert_eq!(
            p.total(),
            Resources {
                cpu_millis: 2500,
                memory_bytes: 1 << 30
            }
        );
    }
}
