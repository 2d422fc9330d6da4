//! Multi-host fault tests for Meshwork.
//!
//! Real `meshd` processes run in their own network namespaces joined by a
//! bridge ([`netns`]); a nemesis kills, pauses, partitions and drops packets
//! ([`cluster`], [`firewall`]); clients drive them through `meshctl` and every
//! operation and fault is recorded in a [`history`] that the checkers read;
//! [`images`] drives and inspects the registry (image push/pull, `/metrics`,
//! the chunks a node stored); [`containers`] samples what containerd runs for
//! the service scenarios and checks those samples; [`gateway`] sends a
//! client load through the nodes' gateways; [`jobs`] reads batch jobs and
//! checks their attempts.
//! Scenario lengths scale with `CHAOS_SCALE` ([`timing`]).
//!
//! The scenarios themselves are the integration tests in `tests/`; see the
//! crate's README for how to run them.

pub mod cluster;
pub mod containers;
pub mod exec;
pub mod firewall;
pub mod gateway;
pub mod history;
pub mod images;
pub mod jobs;
pub mod netns;
pub mod timing;

pub use cluster::{Cluster, ClusterOptions, NodeView, StateEntry};
pub use containers::{NodeStatus, ReplicaSample, ReplicaWatch, SvcShape, analyse};
pub use firewall::Faults;
pub use gateway::{GatewayLoad, LoadOptions, LoadSummary};
pub use history::{History, OpKind, Outcome};
pub use images::{HolderView, ImageBlobView, ImageView, blake3_file};
pub use jobs::{ExactlyOnce, JobTracker, JobView, job_problems};
pub use netns::{Netns, skip_unless_capable};
pub use timing::{deadline, full, full_only, scale, scaled, scenario_length, secs};
