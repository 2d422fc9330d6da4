//! bench/batch placement core: `meshwork_node::placement::place` alone, on simulated nodes.
//!
//! ```text
//! placement-bench [--nodes 1000] [--jobs 1000] [--repeat 20] [--seeds 5]
//! ```
//! Run it on one core (`taskset -c 0`); bench/batch/run.sh does. Prints:
//!
//! 1. Throughput, `--jobs` single-replica workloads (as batch jobs are: one workload
//!    `job/<id>/<index>` per index, strategy Spread, priority 0, ids in submission order) on
//!    `--nodes` simulated nodes, for node and job mixes below:
//!    - one call: `place(jobs, nodes, [])` places every job (median of `--repeat` calls);
//!    - incremental: the jobs arrive one at a time and every arrival is one scheduler pass,
//!      `place(jobs so far, nodes, claims of the previous pass)`: the last of these passes
//!      re-checks every kept claim, so this is what the scheduler's loop costs when it places
//!      one new job per pass (jobs per second = jobs / sum of the pass times);
//!    - a pass with nothing new: `place(jobs, nodes, all their claims)` (median).
//! 2. Packed capacity against a greedy bin-packing oracle, when the jobs ask for more than the
//!    nodes have (demand 1.2x and 2x of the cluster's CPU), `--seeds` random clusters each:
//!    the share of the cluster's CPU and memory the placed jobs take, with `place` (Spread, as
//!    batch jobs use, and Binpack) and with the oracle: the better of first-fit decreasing and
//!    best-fit decreasing (jobs sorted by their dominant share of an average node, largest
//!    first; first fit over nodes largest first; best fit = the node left with the least free
//!    dominant share). Packed capacity = the mean of the CPU and memory shares.
//!    Ratio place / oracle (goal: within 12 %, i.e. >= 0.88). The same with CPU-only jobs (1 MiB
//!    each), to tell the one-dimensional packing from the two-dimensional one.
//! Every table is checked: no node given more than its capacity, every job placed at most once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use meshwork_node::placement::{Claim, NodeCapacity, Strategy, WorkloadSpec, place};

const MI: u64 = 1 << 20;
const GI: u64 = 1 << 30;

/// splitmix64: small, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// A libp2p-peer-id-like node id (52 characters), as the real ones are.
fn node_id(i: usize, rng: &mut Rng) -> String {
    format!("12D3KooW{:016x}{:016x}{:012x}", rng.next(), rng.next(), i)
}

/// `n` nodes of mixed sizes: 2, 4, 8 or 16 cores with 2, 4 or 8 GiB per core.
fn mixed_nodes(n: usize, rng: &mut Rng) -> Vec<NodeCapacity> {
    (0..n)
        .map(|i| {
            let cores = rng.pick(&[2u64, 4, 8, 16]);
            let gib_per_core = rng.pick(&[2u64, 4, 8]);
            NodeCapacity {
                node: node_id(i, rng),
                cpu_millis: cores * 1000,
                memory_bytes: cores * gib_per_core * GI,
                labels: BTreeMap::new(),
            }
        })
        .collect()
}

/// `n` identical nodes (4 cores, 8 GiB): every empty node ties, so rendezvous hashing decides.
fn uniform_nodes(n: usize, rng: &mut Rng) -> Vec<NodeCapacity> {
    (0..n)
        .map(|i| NodeCapacity {
            node: node_id(i, rng),
            cpu_millis: 4000,
            memory_bytes: 8 * GI,
            labels: BTreeMap::new(),
        })
        .collect()
}

fn job(id: &str, index: usize, cpu_millis: u64, memory_bytes: u64, strategy: Strategy) -> WorkloadSpec {
    WorkloadSpec {
        id: format!("job/{id}/{index}"),
        replicas: 1,
        cpu_millis,
        memory_bytes,
        constraints: BTreeMap::new(),
        strategy,
        priority: 0,
        preferred: BTreeSet::new(),
    }
}

/// One array job of `n` identical indices (what `meshctl job submit --array N` makes).
fn array_job(n: usize, cpu_millis: u64, memory_bytes: u64, strategy: Strategy) -> Vec<WorkloadSpec> {
    (0..n).map(|i| job("019ac3f0b2e1-7d3a", i, cpu_millis, memory_bytes, strategy)).collect()
}

/// `n` jobs of mixed sizes (100m-2 cores, 16 MiB-4 GiB), ids in submission order.
fn mixed_jobs(n: usize, rng: &mut Rng, strategy: Strategy) -> Vec<WorkloadSpec> {
    (0..n)
        .map(|i| {
            let cpu = rng.pick(&[100u64, 250, 500, 1000, 2000]);
            let mem = rng.pick(&[16 * MI, 64 * MI, 256 * MI, GI, 4 * GI]);
            job(&format!("{:012x}-{:04x}", 0x019a_c3f0_0000u64 + i as u64, rng.next() & 0xffff), 0, cpu, mem, strategy)
        })
        .collect()
}

/// Jobs of mixed shapes until their CPU adds up to `demand` x the cluster's.
/// With `cpu_only`, every job asks for 1 MiB of memory: a one-dimensional packing problem.
fn oversubscribed_jobs(nodes: &[NodeCapacity], demand: f64, rng: &mut Rng, strategy: Strategy, cpu_only: bool) -> Vec<WorkloadSpec> {
    let total: u64 = nodes.iter().map(|n| n.cpu_millis).sum();
    let target = (total as f64 * demand) as u64;
    let mut out = Vec::new();
    let mut sum = 0;
    while sum < target {
        let cpu = rng.pick(&[250u64, 500, 1000, 2000, 4000]);
        let gib_per_core = rng.pick(&[1u64, 2, 4, 8]);
        let mem = if cpu_only { MI } else { cpu * gib_per_core * GI / 1000 };
        out.push(job(&format!("{:012x}-{:04x}", 0x019a_c3f0_0000u64 + out.len() as u64, rng.next() & 0xffff), 0, cpu, mem, strategy));
        sum += cpu;
    }
    out
}

/// Checks a table; returns (placed jobs, placed CPU, placed memory).
fn check(workloads: &[WorkloadSpec], nodes: &[NodeCapacity], claims: &[Claim]) -> (usize, u64, u64) {
    let by_id: HashMap<&str, &WorkloadSpec> = workloads.iter().map(|w| (w.id.as_str(), w)).collect();
    let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut seen = BTreeSet::new();
    let (mut cpu, mut mem) = (0, 0);
    for c in claims {
        assert!(seen.insert((&c.workload, c.replica)), "{} placed twice", c.workload);
        let w = by_id[c.workload.as_str()];
        let u = used.entry(c.node.as_str()).or_default();
        u.0 += w.cpu_millis;
        u.1 += w.memory_bytes;
        cpu += w.cpu_millis;
        mem += w.memory_bytes;
    }
    for n in nodes {
        if let Some(&(c, m)) = used.get(n.node.as_str()) {
            assert!(c <= n.cpu_millis && m <= n.memory_bytes, "node {} over capacity", n.node);
        }
    }
    (claims.len(), cpu, mem)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn per_s(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Throughput of one node/job mix.
fn throughput(label: &str, nodes: &[NodeCapacity], jobs: &[WorkloadSpec], repeat: usize) {
    // One call places them all.
    let mut times = Vec::new();
    let mut table = place(jobs, nodes, &[]);
    for _ in 0..repeat {
        let t = Instant::now();
        table = std::hint::black_box(place(std::hint::black_box(jobs), nodes, &[]));
        times.push(t.elapsed());
    }
    let (placed, _, _) = check(jobs, nodes, &table.claims);
    let one = median(times);
    // Nothing new: every claim kept.
    let mut times = Vec::new();
    for _ in 0..repeat {
        let t = Instant::now();
        let again = std::hint::black_box(place(jobs, nodes, std::hint::black_box(&table.claims)));
        times.push(t.elapsed());
        assert_eq!(again.claims.len(), table.claims.len());
    }
    let steady = median(times);
    // One arrival per pass.
    let mut claims: Vec<Claim> = Vec::new();
    let mut total = Duration::ZERO;
    let mut slowest = Duration::ZERO;
    for i in 1..=jobs.len() {
        let t = Instant::now();
        let pass = place(&jobs[..i], nodes, &claims);
        let d = t.elapsed();
        total += d;
        slowest = slowest.max(d);
        claims = pass.claims;
    }
    let (inc_placed, _, _) = check(jobs, nodes, &claims);
    println!(
        "  {label:<44} one call: {placed:>5} placed in {:>8.2} ms = {:>9.0} placements/s ({:>6.1} us each); \
         pass with all {placed} kept: {:>7.2} ms",
        one.as_secs_f64() * 1e3,
        per_s(placed, one),
        one.as_secs_f64() * 1e6 / placed.max(1) as f64,
        steady.as_secs_f64() * 1e3,
    );
    println!(
        "  {:<44} incremental, one new job per pass: {inc_placed:>5} passes in {:>8.1} ms = {:>9.0} jobs/s (last/slowest pass {:.2} ms)",
        "",
        total.as_secs_f64() * 1e3,
        per_s(jobs.len(), total),
        slowest.as_secs_f64() * 1e3,
    );
}

/// Greedy bin-packing oracle: jobs largest first (dominant share of an average node); first
/// fit over nodes largest first, or best fit. Returns (placed, cpu, memory).
fn oracle(jobs: &[WorkloadSpec], nodes: &[NodeCapacity], best_fit: bool) -> (usize, u64, u64) {
    let n = nodes.len() as f64;
    let avg_cpu = nodes.iter().map(|x| x.cpu_millis as f64).sum::<f64>() / n;
    let avg_mem = nodes.iter().map(|x| x.memory_bytes as f64).sum::<f64>() / n;
    let size = |w: &WorkloadSpec| (w.cpu_millis as f64 / avg_cpu).max(w.memory_bytes as f64 / avg_mem);
    let mut order: Vec<&WorkloadSpec> = jobs.iter().collect();
    order.sort_by(|a, b| size(b).total_cmp(&size(a)).then(a.id.cmp(&b.id)));
    let mut free: Vec<(u64, u64, u64, u64)> = nodes.iter().map(|x| (x.cpu_millis, x.memory_bytes, x.cpu_millis, x.memory_bytes)).collect();
    free.sort_by(|a, b| (b.2 as f64 / avg_cpu).max(b.3 as f64 / avg_mem).total_cmp(&(a.2 as f64 / avg_cpu).max(a.3 as f64 / avg_mem)));
    let (mut placed, mut cpu, mut mem) = (0, 0, 0);
    for w in order {
        let fits = |f: &(u64, u64, u64, u64)| w.cpu_millis <= f.0 && w.memory_bytes <= f.1;
        let slot = if best_fit {
            free.iter()
                .enumerate()
                .filter(|(_, f)| fits(f))
                .min_by(|(_, a), (_, b)| {
                    let left = |f: &(u64, u64, u64, u64)| {
                        ((f.0 - w.cpu_millis) as f64 / f.2 as f64).max((f.1 - w.memory_bytes) as f64 / f.3 as f64)
                    };
                    left(a).total_cmp(&left(b))
                })
                .map(|(i, _)| i)
        } else {
            free.iter().position(fits)
        };
        if let Some(i) = slot {
            free[i].0 -= w.cpu_millis;
            free[i].1 -= w.memory_bytes;
            placed += 1;
            cpu += w.cpu_millis;
            mem += w.memory_bytes;
        }
    }
    (placed, cpu, mem)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut n_nodes, mut n_jobs, mut repeat, mut seeds) = (1000usize, 1000usize, 20usize, 5u64);
    while let Some(a) = args.next() {
        let v: usize = args.next().and_then(|v| v.parse().ok()).expect("a number after each flag");
        match a.as_str() {
            "--nodes" => n_nodes = v,
            "--jobs" => n_jobs = v,
            "--repeat" => repeat = v,
            "--seeds" => seeds = v as u64,
            _ => panic!("usage: placement-bench [--nodes N] [--jobs N] [--repeat N] [--seeds N]"),
        }
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("placement core (meshwork_node::placement::place), {n_nodes} simulated nodes, {n_jobs} single-replica jobs; {cpus} CPU(s) allowed to this process");
    println!("1. throughput (one thread)");
    let mut rng = Rng(0x6d65_7368_776f_726b);
    let mixed = mixed_nodes(n_nodes, &mut rng);
    let uniform = uniform_nodes(n_nodes, &mut rng);
    throughput("array of 100m/16Mi jobs, mixed nodes, Spread", &mixed, &array_job(n_jobs, 100, 16 * MI, Strategy::Spread), repeat);
    throughput("array of 100m/16Mi jobs, uniform nodes, Spread", &uniform, &array_job(n_jobs, 100, 16 * MI, Strategy::Spread), repeat);
    throughput("mixed jobs, mixed nodes, Spread", &mixed, &mixed_jobs(n_jobs, &mut rng, Strategy::Spread), repeat);
    throughput("mixed jobs, mixed nodes, Binpack", &mixed, &mixed_jobs(n_jobs, &mut rng, Strategy::Binpack), repeat);

    println!("2. packed capacity when jobs ask for more than the cluster has ({seeds} random clusters of {n_nodes} mixed nodes per demand; job shapes 250m-4 cores x 1-8 GiB per core)");
    println!("   {:<8} {:<8} {:>7} {:>22} {:>22} {:>22} {:>22} {:>8} {:>10}", "demand", "seed", "jobs", "place Spread cpu/mem", "place Binpack cpu/mem", "oracle FFD cpu/mem", "oracle BFD cpu/mem", "ratio S", "ratio B");
    let mut worst = (f64::MAX, f64::MAX);
    let mut worst_1d = (f64::MAX, f64::MAX);
    for (demand, cpu_only) in [(1.2, false), (2.0, false), (1.2, true), (2.0, true)] {
        if cpu_only && demand == 1.2 {
            println!("   the same with CPU-only jobs (1 MiB of memory each): one dimension, for comparison");
        }
        for seed in 1..=seeds {
            let mut rng = Rng(seed.wrapping_mul(0x1234_5678_9abc_def1));
            let nodes = mixed_nodes(n_nodes, &mut rng);
            let spread = oversubscribed_jobs(&nodes, demand, &mut rng, Strategy::Spread, cpu_only);
            let binpack: Vec<WorkloadSpec> = spread.iter().map(|w| WorkloadSpec { strategy: Strategy::Binpack, ..w.clone() }).collect();
            let total_cpu: u64 = nodes.iter().map(|x| x.cpu_millis).sum();
            let total_mem: u64 = nodes.iter().map(|x| x.memory_bytes).sum();
            let share = |(_, c, m): (usize, u64, u64)| (c as f64 / total_cpu as f64, m as f64 / total_mem as f64);
            // Packed capacity: the mean of the CPU and memory shares (CPU alone for CPU-only jobs).
            let packed = |s: (f64, f64)| if cpu_only { s.0 } else { (s.0 + s.1) / 2.0 };
            let t = Instant::now();
            let ts = place(&spread, &nodes, &[]);
            let dt = t.elapsed();
            let s = share(check(&spread, &nodes, &ts.claims));
            let tb = place(&binpack, &nodes, &[]);
            let b = share(check(&binpack, &nodes, &tb.claims));
            let ffd = share(oracle(&spread, &nodes, false));
            let bfd = share(oracle(&spread, &nodes, true));
            let best = packed(ffd).max(packed(bfd));
            let (rs, rb) = (packed(s) / best, packed(b) / best);
            let w = if cpu_only { &mut worst_1d } else { &mut worst };
            *w = (w.0.min(rs), w.1.min(rb));
            let f = |x: (f64, f64)| format!("{:.1}% / {:.1}%", x.0 * 100.0, x.1 * 100.0);
            println!(
                "   {:<8} {:<8} {:>7} {:>22} {:>22} {:>22} {:>22} {:>8.3} {:>10.3}   (place: {} placed, {} pending, {:.1} ms, {:.0} placements/s)",
                format!("{demand}x"), seed, spread.len(), f(s), f(b), f(ffd), f(bfd), rs, rb,
                ts.claims.len(), ts.pending.len(), dt.as_secs_f64() * 1e3, per_s(ts.claims.len(), dt)
            );
        }
    }
    println!(
        "   worst ratio of packed capacity (mean of CPU and memory share) place / best oracle: Spread {:.3}, Binpack {:.3}   (goal >= 0.88: Spread {}, Binpack {})",
        worst.0, worst.1,
        if worst.0 >= 0.88 { "met" } else { "NOT met" },
        if worst.1 >= 0.88 { "met" } else { "NOT met" },
    );
    println!(
        "   CPU-only jobs, worst ratio of packed CPU place / best oracle: Spread {:.3}, Binpack {:.3}",
        worst_1d.0, worst_1d.1
    );
}
