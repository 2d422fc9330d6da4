//! The OCI runtime spec (`config.json`) of a service container.
//!
//! containerd hands runc a runtime spec for every container; `ctr run` and Docker build theirs
//! in Go (containerd's `oci.populateDefaultUnixSpec` plus options). Meshwork talks to
//! containerd over gRPC, so it builds the spec itself: this module turns the image's run
//! config and the service's settings into an [`oci_spec::runtime::Spec`], with no I/O, so
//! every field is unit-tested here and the caller only serialises it.
//!
//! # Security defaults, and why
//!
//! A service is someone's image running on someone else's machine, so the defaults are those of
//! Docker, slightly tighter, and not configurable per service:
//! - **Capabilities**: Docker's default set minus `CAP_NET_RAW` (raw sockets allow ARP/ICMP
//!   spoofing on a shared network namespace) and `CAP_MKNOD` (no device nodes are needed; the
//!   device cgroup denies them anyway). Only the bounding, effective and permitted sets are
//!   filled: nothing is inheritable or ambient, so a non-root process gets no capabilities.
//! - **`noNewPrivileges`**: setuid binaries and file capabilities cannot raise privileges.
//! - **Seccomp** ([`default_seccomp`]): a deny-list of the syscalls a service never needs and
//!   that have been the way out of containers (kernel modules, `mount`, namespaces, `bpf`,
//!   `ptrace`, keyrings, `userfaultfd`, ...), plus new user namespaces through `clone`.
//! - **Devices**: the device cgroup denies everything but the standard character devices.
//! - **`/proc` and `/sys`**: Docker's masked and read-only paths hide host details (`kcore`,
//!   `keys`, `timer_list`, firmware) and stop writes to `/proc/sys` and `sysrq-trigger`;
//!   `/sys` and the cgroup file system are mounted read-only.
//! - **Resources**: every container has a memory limit (with no swap beyond it), a CPU quota
//!   matching its reservation, and at most 4096 processes (no fork bombs).
//! - **Namespaces**: new pid, ipc, uts and mount namespaces; the network namespace is either
//!   new or the one given (the node's), see [`ContainerSpecInput::netns_path`].
//!
//! Not done: user namespaces (root in the container is root on the host, as with Docker's
//! default; use a numeric non-root `User` in the image) and AppArmor/SELinux profiles.

use std::path::PathBuf;

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Arch, Capabilities, Capability, LinuxBuilder, LinuxCapabilities, LinuxCpuBuilder,
    LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder,
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg,
    LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};
use serde::{Deserialize, Serialize};

/// `PATH` when the image sets none (containerd's and Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The capabilities every container gets (bounding, effective and permitted sets): Docker's
/// default set without `CAP_NET_RAW` and `CAP_MKNOD`.
#[rustfmt::skip]
pub const DEFAULT_CAPABILITIES: &[Capability] = {
    use Capability::*;
    &[Chown, DacOverride, Fsetid, Fowner, Setgid, Setuid, Setfcap, Setpcap, NetBindService,
      SysChroot, Kill, AuditWrite]
};

/// Syscalls that fail with `EPERM` in every container (see [`default_seccomp`]).
#[rustfmt::skip]
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "get_kernel_syms", "get_mempolicy", "init_module",
    "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie",
    "mbind", "mount", "move_mount", "open_tree", "fsopen", "fsmount", "fspick", "move_pages",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "perf_event_open", "pivot_root",
    "process_vm_readv", "process_vm_writev", "ptrace", "query_module", "quotactl", "reboot",
    "request_key", "set_mempolicy", "setns", "settimeofday", "stime", "swapoff", "swapon",
    "sysfs", "_sysctl", "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat",
    "vm86", "vm86old", "io_uring_setup", "io_uring_enter", "io_uring_register",
];

/// Docker's masked paths: hidden behind an empty file or directory (host details, kernel
/// memory, keyrings, timers).
#[rustfmt::skip]
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths (kernel tunables and `sysrq-trigger` stay unwritable).
#[rustfmt::skip]
const READONLY_PATHS: &[&str] = &[
    "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
];

/// containerd's default mounts: destination, type, source, comma-separated options.
#[rustfmt::skip]
const MOUNTS: &[(&str, &str, &str, &str)] = &[
    ("/proc", "proc", "proc", "nosuid,noexec,nodev"),
    ("/dev", "tmpfs", "tmpfs", "nosuid,strictatime,mode=755,size=65536k"),
    ("/dev/pts", "devpts", "devpts", "nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ("/dev/shm", "tmpfs", "shm", "nosuid,noexec,nodev,mode=1777,size=65536k"),
    ("/dev/mqueue", "mqueue", "mqueue", "nosuid,noexec,nodev"),
    ("/sys", "sysfs", "sysfs", "nosuid,noexec,nodev,ro"),
    ("/sys/fs/cgroup", "cgroup", "cgroup", "nosuid,noexec,nodev,relatime,ro"),
];

/// The character devices allowed (major, minor; `None` is any): null, zero, full, random,
/// urandom, tty, ptmx, and every `/dev/pts/N`.
#[rustfmt::skip]
const ALLOWED_CHAR_DEVICES: &[(i64, Option<i64>)] = &[
    (1, Some(3)), (1, Some(5)), (1, Some(7)), (1, Some(8)), (1, Some(9)),
    (5, Some(0)), (5, Some(2)), (136, None),
];

/// The CFS period, in microseconds, that the CPU quota is a share of.
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CPU quota given (1% of a CPU); the kernel refuses less than 1 ms.
const MIN_CPU_QUOTA_US: i64 = 1_000;
/// The most processes (threads included) a container may have.
const PIDS_LIMIT: i64 = 4_096;
/// `CLONE_NEWUSER`, the `clone` flag that creates a user namespace.
const CLONE_NEWUSER: u64 = 0x1000_0000;
/// The error most denied syscalls return ("operation not permitted").
const EPERM: u32 = 1;
/// The error `clone3` returns ("not implemented"), so that libc falls back to `clone`.
const ENOSYS: u32 = 38;

/// Why a spec could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither the service nor the image says what to run.
    #[error(
        "nothing to run: the image sets neither Entrypoint nor Cmd and the service gives no command"
    )]
    NoCommand,
    /// The image's `User` names a user or group instead of giving numeric ids.
    #[error(
        "image user {user:?} is a name: only a numeric UID or UID:GID is supported, because the \
         node does not read the image's /etc/passwd or /etc/group; use e.g. \"65534:65534\""
    )]
    UserName {
        /// The image's `User`.
        user: String,
    },
    /// The image's `User` is malformed (empty part, too many colons, id out of range).
    #[error("image user {user:?} is not a valid UID or UID:GID")]
    InvalidUser {
        /// The image's `User`.
        user: String,
    },
    /// The image config blob is not JSON of the expected shape.
    #[error("invalid image config: {0}")]
    ImageConfig(#[source] serde_json::Error),
    /// An environment variable name is empty or contains `=` or NUL.
    #[error("invalid environment variable name {name:?}: it must be non-empty, without '=' or NUL")]
    EnvName {
        /// The rejected name.
        name: String,
    },
    /// The memory limit is zero (which runc reads as "unlimited") or above `i64::MAX`.
    #[error("invalid memory limit {bytes} bytes: every container needs a limit above zero")]
    Memory {
        /// The requested limit.
        bytes: u64,
    },
    /// The oci-spec builders refused a value (not expected: every field has a default).
    #[error("building the runtime spec: {0}")]
    Build(#[from] OciSpecError),
}

/// What the image's config says about how to run it (subset of the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRunConfig {
    /// `Entrypoint`: the start of the argv.
    pub entrypoint: Vec<String>,
    /// `Cmd`: the rest of the argv (or all of it without an entrypoint).
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// `WorkingDir`; empty means `/`.
    pub working_dir: String,
    /// `User`: empty, `UID` or `UID:GID` (names are refused, see [`parse_user`]).
    pub user: String,
}

/// The run part (`config`) of an image config blob as OCI and Docker tools write it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

impl ImageRunConfig {
    /// Parses the JSON bytes of an OCI (or Docker) image config blob (`{"config":
    /// {"Entrypoint":..,"Cmd":..,"Env":..,"WorkingDir":..,"User":..}}`; every field optional,
    /// null allowed). Other fields are ignored.
    pub fn from_config_json(bytes: &[u8]) -> Result<Self, SpecError> {
        // A map first: serde would also read a struct from a JSON array.
        let mut blob: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(bytes).map_err(SpecError::ImageConfig)?;
        let config = blob.remove("config").unwrap_or_default();
        let Some(c) = serde_json::from_value::<Option<RawRunConfig>>(config)
            .map_err(SpecError::ImageConfig)?
        else {
            return Ok(Self::default());
        };
        Ok(Self {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        })
    }
}

/// Everything needed for one container's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSpecInput {
    /// The container's hostname (in its own UTS namespace).
    pub hostname: String,
    /// The image's run config.
    pub image: ImageRunConfig,
    /// The service's command; when non-empty it replaces the image's entrypoint and cmd.
    pub cmd_override: Vec<String>,
    /// The service's environment, then `PORT` etc.; overrides image variables of the same name.
    pub env: Vec<(String, String)>,
    /// Reserved CPU in thousandths of a CPU; becomes the CFS quota and the CPU shares.
    pub cpu_millis: u64,
    /// Memory limit in bytes (memory plus swap); must be above zero.
    pub memory_bytes: u64,
    /// The cgroup path runc creates (`/meshwork/<id>` for cgroupfs, `slice:prefix:name` for the
    /// systemd driver); empty leaves runc's default.
    pub cgroups_path: String,
    /// `Some(path)`: join that network namespace (e.g. the node's, `/proc/1/ns/net`), and bind
    /// the host's `/etc/resolv.conf` and `/etc/hosts` read-only into the container (both exist
    /// on Debian). `None`: a new network namespace with only loopback.
    pub netns_path: Option<String>,
}

/// The argv to run: `cmd_override` if non-empty (it replaces entrypoint AND cmd, like
/// Kubernetes `command`), else the image's entrypoint followed by its cmd.
/// [`SpecError::NoCommand`] if that is empty or starts with an empty program name.
pub fn resolve_args(
    image: &ImageRunConfig,
    cmd_override: &[String],
) -> Result<Vec<String>, SpecError> {
    let args: Vec<String> = if cmd_override.is_empty() {
        image.entrypoint.iter().chain(&image.cmd).cloned().collect()
    } else {
        cmd_override.to_vec()
    };
    match args.first() {
        Some(program) if !program.is_empty() => Ok(args),
        _ => Err(SpecError::NoCommand),
    }
}

/// Merged env as `KEY=VALUE`: image env first, then `extra` overriding variables of the same
/// name in place (a later duplicate wins); `PATH` is [`DEFAULT_PATH`] when the image sets none.
pub fn merge_env(image_env: &[String], extra: &[(String, String)]) -> Vec<String> {
    fn name(entry: &str) -> &str {
        entry.split_once('=').map_or(entry, |(name, _)| name)
    }
    fn upsert(env: &mut Vec<String>, entry: String) {
        match env.iter_mut().find(|e| name(e) == name(&entry)) {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    }
    let mut env = Vec::with_capacity(image_env.len() + extra.len() + 1);
    if !image_env.iter().any(|e| name(e) == "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    for entry in image_env {
        upsert(&mut env, entry.clone());
    }
    for (key, value) in extra {
        upsert(&mut env, format!("{key}={value}"));
    }
    env
}

/// The uid and gid for the image's `User`: `""` → 0:0; numeric `UID` → UID:0 (the group
/// Docker uses when the image's `/etc/passwd` has no entry) and `UID:GID` → that. Names
/// (e.g. `nobody`) are [`SpecError::UserName`]: the node does not read the rootfs's
/// `/etc/passwd`.
pub fn parse_user(user: &str) -> Result<(u32, u32), SpecError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let invalid = || SpecError::InvalidUser { user: user.into() };
    let id = |part: &str| -> Result<u32, SpecError> {
        if part.is_empty() || part.contains(':') {
            Err(invalid())
        } else if !part.bytes().all(|b| b.is_ascii_digit()) {
            Err(SpecError::UserName { user: user.into() })
        } else {
            part.parse().map_err(|_| invalid())
        }
    };
    match user.split_once(':') {
        Some((uid, gid)) => Ok((id(uid)?, id(gid)?)),
        None => Ok((id(user)?, 0)),
    }
}

/// The full runtime spec of a container (see the module docs for the security defaults).
pub fn runtime_spec(input: &ContainerSpecInput) -> Result<Spec, SpecError> {
    if let Some((name, _)) = input
        .env
        .iter()
        .find(|(k, _)| k.is_empty() || k.contains(['=', '\0']))
    {
        return Err(SpecError::EnvName { name: name.clone() });
    }
    let memory = i64::try_from(input.memory_bytes)
        .ok()
        .filter(|&m| m > 0)
        .ok_or(SpecError::Memory {
            bytes: input.memory_bytes,
        })?;
    let (uid, gid) = parse_user(&input.image.user)?;
    let cwd = match input.image.working_dir.as_str() {
        "" => "/".to_owned(),
        dir if dir.starts_with('/') => dir.to_owned(),
        dir => format!("/{dir}"), // OCI wants an absolute cwd
    };

    let caps: Capabilities = DEFAULT_CAPABILITIES.iter().copied().collect();
    let mut capabilities = LinuxCapabilities::default();
    capabilities
        .set_bounding(Some(caps.clone()))
        .set_effective(Some(caps.clone()))
        .set_permitted(Some(caps))
        .set_inheritable(None)
        .set_ambient(None);
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(uid).gid(gid).build()?)
        .args(resolve_args(&input.image, &input.cmd_override)?)
        .env(merge_env(&input.image.env, &input.env))
        .cwd(cwd)
        .no_new_privileges(true)
        .capabilities(capabilities)
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .soft(1024u64)
                .hard(1024u64)
                .build()?,
        ])
        .build()?;

    let quota = i64::try_from(input.cpu_millis.saturating_mul(100))
        .unwrap_or(i64::MAX)
        .max(MIN_CPU_QUOTA_US);
    let shares = (input.cpu_millis.saturating_mul(1024) / 1000).clamp(2, 262_144);
    let resources = LinuxResourcesBuilder::default()
        .devices(device_rules()?)
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .swap(memory)
                .build()?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .period(CPU_PERIOD_US)
                .quota(quota)
                .shares(shares)
                .build()?,
        )
        .pids(LinuxPidsBuilder::default().limit(PIDS_LIMIT).build()?)
        .build()?;

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
    }
    let mut net = LinuxNamespace::default();
    net.set_typ(LinuxNamespaceType::Network)
        .set_path(input.netns_path.as_ref().map(PathBuf::from));
    namespaces.push(net);

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(strings(MASKED_PATHS))
        .readonly_paths(strings(READONLY_PATHS))
        .seccomp(default_seccomp())
        .build()?;
    linux.set_cgroups_path(
        Some(PathBuf::from(&input.cgroups_path)).filter(|p| !p.as_os_str().is_empty()),
    );

    Ok(SpecBuilder::default()
        .version("1.0.2-dev") // what runc 1.1 implements
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()?,
        )
        .process(process)
        .hostname(input.hostname.clone())
        .mounts(mounts(input.netns_path.is_some())?)
        .linux(linux)
        .build()?)
}

/// The default seccomp profile: a deny-list. Everything is allowed except [`DENIED_SYSCALLS`]
/// (`EPERM`), `clone` with `CLONE_NEWUSER` (`EPERM`) and `clone3` (`ENOSYS`, whose flags
/// seccomp cannot read, so glibc falls back to `clone`).
///
/// Why a deny-list: an allow-list like Docker's needs ~350 syscall names kept in step with the
/// kernel and libseccomp versions, and a missing name breaks programs in obscure ways. The
/// deny-list blocks what a service never needs and what has been the source of container
/// escapes: kernel modules and kexec, mounts and new namespaces, `bpf`, `perf_event_open`,
/// `userfaultfd`, `ptrace` and cross-process memory access, keyrings, clock and swap control,
/// file handles (`open_by_handle_at`, the "shocker" escape) and NUMA policy calls. Most of these
/// also need capabilities the container lacks; the filter is the second wall. runc applies
/// seccomp last, just before `execve`, so blocking `mount`, `unshare` or `setns` does not get
/// in its way, and libseccomp ignores names an architecture lacks (`vm86` on x86-64).
pub fn default_seccomp() -> LinuxSeccomp {
    let rule = |names: Vec<String>, errno: u32, args: Option<Vec<LinuxSeccompArg>>| {
        let mut rule = LinuxSyscall::default();
        rule.set_names(names)
            .set_action(LinuxSeccompAction::ScmpActErrno)
            .set_errno_ret(Some(errno))
            .set_args(args);
        rule
    };
    let new_user_ns = LinuxSeccompArgBuilder::default()
        .index(0usize) // the flags of clone(2) on x86 and arm
        .value(CLONE_NEWUSER)
        .value_two(CLONE_NEWUSER)
        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
        .build()
        .expect("every field of a seccomp argument is set");
    let mut seccomp = LinuxSeccomp::default();
    seccomp
        .set_default_action(LinuxSeccompAction::ScmpActAllow)
        .set_architectures(Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
            Arch::ScmpArchAarch64,
            Arch::ScmpArchArm,
        ]))
        .set_syscalls(Some(vec![
            rule(strings(DENIED_SYSCALLS), EPERM, None),
            rule(strings(&["clone"]), EPERM, Some(vec![new_user_ns])),
            rule(strings(&["clone3"]), ENOSYS, None),
        ]));
    seccomp
}

/// The device cgroup: deny all, then allow the standard character devices and the ptys.
fn device_rules() -> Result<Vec<LinuxDeviceCgroup>, OciSpecError> {
    let mut rules = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .typ(LinuxDeviceType::A)
            .access("rwm")
            .build()?,
    ];
    for &(major, minor) in ALLOWED_CHAR_DEVICES {
        let mut rule = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(major)
            .access("rwm")
            .build()?;
        rule.set_minor(minor);
        rules.push(rule);
    }
    Ok(rules)
}

/// containerd's default [`MOUNTS`], plus the host's resolver files when sharing its network.
fn mounts(host_network: bool) -> Result<Vec<Mount>, OciSpecError> {
    let resolver = [
        ("/etc/resolv.conf", "bind", "/etc/resolv.conf", "rbind,ro"),
        ("/etc/hosts", "bind", "/etc/hosts", "rbind,ro"),
    ];
    let extra = if host_network { &resolver[..] } else { &[] };
    MOUNTS
        .iter()
        .chain(extra)
        .map(|&(destination, typ, source, options)| {
            MountBuilder::default()
                .destination(destination)
                .typ(typ)
                .source(source)
                .options(options.split(',').map(str::to_owned).collect::<Vec<_>>())
                .build()
        })
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Whitespace-separated words as strings.
    fn v(words: &str) -> Vec<String> {
        words.split_whitespace().map(str::to_owned).collect()
    }

    fn has(list: &Value, item: impl Into<Value>) -> bool {
        list.as_array().unwrap().contains(&item.into())
    }

    fn input() -> ContainerSpecInput {
        ContainerSpecInput {
            hostname: "web-1".into(),
            image: ImageRunConfig {
                entrypoint: v("/bin/server"),
                cmd: v("--port 80"),
                env: v("LANG=C.UTF-8"),
                working_dir: "/app".into(),
                user: "1000:1000".into(),
            },
            cmd_override: vec![],
            env: vec![("PORT".into(), "8080".into())],
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            cgroups_path: "/meshwork/web-1".into(),
            netns_path: None,
        }
    }

    fn spec_json(input: &ContainerSpecInput) -> Value {
        serde_json::to_value(runtime_spec(input).unwrap()).unwrap()
    }

    fn with(change: impl FnOnce(&mut ContainerSpecInput)) -> ContainerSpecInput {
        let mut input = input();
        change(&mut input);
        input
    }

    #[test]
    fn resolve_args_cases() {
        let mut image = ImageRunConfig::default();
        (image.entrypoint, image.cmd) = (v("/ep -x"), v("run"));
        assert_eq!(resolve_args(&image, &[]).unwrap(), v("/ep -x run"));
        let over = v("sh -c true");
        assert_eq!(resolve_args(&image, &over).unwrap(), over, "replaces both");
        image.entrypoint.clear();
        assert_eq!(resolve_args(&image, &[]).unwrap(), v("run"));
        image.cmd.clear();
        for over in [vec![], vec![String::new()]] {
            let err = resolve_args(&image, &over);
            assert!(matches!(err, Err(SpecError::NoCommand)), "{err:?}");
        }
    }

    #[test]
    fn merge_env_overrides_and_defaults_path() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let env = merge_env(
            &v("A=1 PATH=/custom B=2"),
            &[pair("B", "3"), pair("PORT", "80")],
        );
        assert_eq!(env, v("A=1 PATH=/custom B=3 PORT=80"));
        let env = merge_env(&v("A=x=y"), &[pair("A", "z"), pair("A", "w")]);
        assert_eq!(env, [format!("PATH={DEFAULT_PATH}"), "A=w".into()]);
        assert_eq!(merge_env(&[], &[pair("PATH", "/p")]), v("PATH=/p"));
    }

    #[test]
    fn parse_user_cases() {
        assert_eq!(parse_user("").unwrap(), (0, 0));
        assert_eq!(parse_user("1000").unwrap(), (1000, 0));
        assert_eq!(parse_user("1000:100").unwrap(), (1000, 100));
        for name in ["nobody", "app:app", "1000:staff", "root:0", "-1"] {
            let err = parse_user(name).unwrap_err();
            assert!(matches!(err, SpecError::UserName { .. }), "{name}: {err}");
            assert!(err.to_string().contains("/etc/passwd"));
        }
        for bad in [":", "1000:", ":1000", "1:2:3", "4294967296"] {
            let err = parse_user(bad).unwrap_err();
            assert!(matches!(err, SpecError::InvalidUser { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn image_config_parsing() {
        let oci = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/ep"],
            "Cmd":["a","b"],"Env":["PATH=/x","K=V"],"WorkingDir":"/w","User":"10:20"},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let expected = ImageRunConfig {
            entrypoint: v("/ep"),
            cmd: v("a b"),
            env: v("PATH=/x K=V"),
            working_dir: "/w".into(),
            user: "10:20".into(),
        };
        assert_eq!(ImageRunConfig::from_config_json(oci).unwrap(), expected);
        let nulls = br#"{"config":{"Entrypoint":null,"Cmd":null,"Env":null,"WorkingDir":null,
            "User":null}}"#;
        for empty in [&nulls[..], b"{}", b"{\"config\":null}", b"{\"config\":{}}"] {
            let c = ImageRunConfig::from_config_json(empty).unwrap();
            assert_eq!(c, ImageRunConfig::default());
        }
        // `docker save`'s config: more keys, and a container_config to ignore.
        let docker = br##"{"architecture":"amd64","config":{"Hostname":"","User":"",
            "Env":["PATH=/usr/bin"],"Cmd":["sh"],"Image":"sha256:ab","WorkingDir":"",
            "Entrypoint":null,"OnBuild":null,"Labels":{}},"container_config":{"Cmd":["/bin/sh",
            "-c","#(nop) CMD [\"sh\"]"]},"created":"2023-05-19T20:19:43Z","os":"linux"}"##;
        let c = ImageRunConfig::from_config_json(docker).unwrap();
        assert_eq!(
            (c.cmd, c.entrypoint, c.env),
            (v("sh"), v(""), v("PATH=/usr/bin"))
        );
        for garbage in [
            &b"not json"[..],
            b"",
            b"[]",
            b"null",
            br#"{"config":{"Cmd":"sh"}}"#,
        ] {
            let err = ImageRunConfig::from_config_json(garbage).unwrap_err();
            assert!(matches!(err, SpecError::ImageConfig(_)), "{err:?}");
        }
    }

    #[test]
    fn spec_process_and_security() {
        let j = spec_json(&input());
        assert_eq!(j["root"], json!({"path": "rootfs", "readonly": false}));
        assert_eq!(j["hostname"], "web-1");
        let p = &j["process"];
        assert_eq!(
            (&p["terminal"], &p["noNewPrivileges"]),
            (&json!(false), &json!(true))
        );
        assert_eq!(p["user"], json!({"uid": 1000, "gid": 1000}));
        assert_eq!(p["cwd"], "/app");
        assert_eq!(p["args"], json!(["/bin/server", "--port", "80"]));
        let path = format!("PATH={DEFAULT_PATH}");
        assert_eq!(p["env"], json!([path, "LANG=C.UTF-8", "PORT=8080"]));
        let nofile = json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]);
        assert_eq!(p["rlimits"], nofile);
        let caps = &p["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            let len = caps[set].as_array().unwrap().len();
            assert_eq!(len, DEFAULT_CAPABILITIES.len());
            for cap in v("CAP_CHOWN CAP_NET_BIND_SERVICE CAP_KILL CAP_SETUID") {
                assert!(has(&caps[set], cap.as_str()), "{cap}");
            }
            for cap in v("CAP_SYS_ADMIN CAP_NET_RAW CAP_MKNOD CAP_SYS_PTRACE") {
                assert!(!has(&caps[set], cap.as_str()), "{cap}");
            }
        }
        assert!(caps.get("inheritable").is_none() && caps.get("ambient").is_none());

        let l = &j["linux"];
        assert_eq!(l["cgroupsPath"], "/meshwork/web-1");
        let r = &l["resources"];
        assert_eq!(r["memory"], json!({"limit": 256 << 20, "swap": 256 << 20}));
        assert_eq!(
            r["cpu"],
            json!({"period": 100_000, "quota": 50_000, "shares": 512})
        );
        assert_eq!(r["pids"], json!({"limit": 4096}));
        assert_eq!(
            r["devices"][0],
            json!({"allow": false, "type": "a", "access": "rwm"})
        );
        let pts = json!({"allow": true, "type": "c", "major": 136, "access": "rwm"});
        let urandom = json!({"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"});
        assert!(has(&r["devices"], pts) && has(&r["devices"], urandom));
        assert!(has(&l["maskedPaths"], "/proc/kcore"));
        assert!(has(&l["readonlyPaths"], "/proc/sysrq-trigger"));

        let s = &l["seccomp"];
        assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(has(&s["architectures"], "SCMP_ARCH_X86_64"));
        let rule = &s["syscalls"][0];
        assert_eq!(rule["action"], "SCMP_ACT_ERRNO");
        assert_eq!(rule["errnoRet"], 1);
        for name in v("mount ptrace unshare setns bpf keyctl userfaultfd open_by_handle_at") {
            assert!(has(&rule["names"], name.as_str()), "{name}");
        }
        assert!(!has(&rule["names"], "personality"));
        let clone = &s["syscalls"][1];
        assert_eq!(
            (&clone["names"], &clone["errnoRet"]),
            (&json!(["clone"]), &json!(1))
        );
        let arg = json!({"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
            "op": "SCMP_CMP_MASKED_EQ"});
        assert_eq!(clone["args"], json!([arg]));
        assert_eq!(
            s["syscalls"][2],
            json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO",
            "errnoRet": 38})
        );
    }

    #[test]
    fn spec_network_namespace_and_mounts() {
        let private = spec_json(&input());
        let ns = &private["linux"]["namespaces"];
        let types = ns.as_array().unwrap().iter().map(|n| n["type"].clone());
        assert_eq!(
            types.collect::<Vec<_>>(),
            ["pid", "ipc", "uts", "mount", "network"]
        );
        assert_eq!(ns[4], json!({"type": "network"}), "a new one: no path");
        let dests = |j: &Value| -> Vec<String> {
            let mounts = j["mounts"].as_array().unwrap();
            mounts
                .iter()
                .map(|m| m["destination"].as_str().unwrap().into())
                .collect()
        };
        let defaults = v("/proc /dev /dev/pts /dev/shm /dev/mqueue /sys /sys/fs/cgroup");
        assert_eq!(dests(&private), defaults);
        assert!(has(&private["mounts"][5]["options"], "ro"));

        let shared = spec_json(&with(|i| i.netns_path = Some("/proc/1/ns/net".into())));
        let ns = &shared["linux"]["namespaces"][4];
        assert_eq!(*ns, json!({"type": "network", "path": "/proc/1/ns/net"}));
        assert_eq!(dests(&shared)[7..], v("/etc/resolv.conf /etc/hosts"));
        let resolv = json!({"destination": "/etc/resolv.conf", "type": "bind",
            "source": "/etc/resolv.conf", "options": ["rbind", "ro"]});
        assert_eq!(shared["mounts"][7], resolv);
    }

    #[test]
    fn spec_edge_cases() {
        let mut i = input();
        (i.image.user, i.image.working_dir, i.cgroups_path) = Default::default();
        i.cpu_millis = 0;
        i.cmd_override = v("/bin/other");
        let j = spec_json(&i);
        assert_eq!(j["process"]["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(j["process"]["cwd"], "/");
        assert_eq!(j["process"]["args"], json!(["/bin/other"]));
        assert!(j["linux"].get("cgroupsPath").is_none());
        let cpu = &j["linux"]["resources"]["cpu"];
        assert_eq!((&cpu["quota"], &cpu["shares"]), (&json!(1000), &json!(2)));
        i.cpu_millis = 2500;
        assert_eq!(spec_json(&i)["linux"]["resources"]["cpu"]["quota"], 250_000);

        for memory_bytes in [0, u64::MAX] {
            let err = runtime_spec(&with(|i| i.memory_bytes = memory_bytes));
            assert!(matches!(err, Err(SpecError::Memory { .. })), "{err:?}");
        }
        for name in ["", "A=B", "A\0"] {
            let err = runtime_spec(&with(|i| i.env = vec![(name.into(), "x".into())]));
            assert!(matches!(err, Err(SpecError::EnvName { .. })), "{err:?}");
        }
        let err = runtime_spec(&with(|i| i.image.user = "nobody".into()));
        assert!(matches!(err, Err(SpecError::UserName { .. })), "{err:?}");
        let err = runtime_spec(&with(|i| i.image = ImageRunConfig::default()));
        assert!(matches!(err, Err(SpecError::NoCommand)), "{err:?}");
    }

    #[test]
    fn spec_json_round_trips() {
        for netns_path in [None, Some("/var/run/netns/x".to_owned())] {
            let spec = runtime_spec(&with(|i| i.netns_path = netns_path)).unwrap();
            let text = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<Spec>(&text).unwrap(), spec);
            let value: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["ociVersion"], "1.0.2-dev");
        }
    }
}
