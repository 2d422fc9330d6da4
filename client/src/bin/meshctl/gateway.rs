//! `meshctl plan`, `meshctl key` and `meshctl gateway`: usage plans, API keys and the
//! gateway's per-route counters. Flags are checked before connecting.

use anyhow::Context;
use clap::Subcommand;
use meshwork_client::proto::{ApiKey, Plan, RouteStats};
use meshwork_client::{MeshClient, human_age, human_rate, now_ms, parse_quota, parse_rate, table};

#[derive(Subcommand)]
pub enum PlanCmd {
    /// Create (or replace) a usage plan: a rate with a burst and an optional daily quota per
    /// key, enforced across the whole mesh.
    Create {
        name: String,
        /// Requests per key, e.g. 10/s, 600/min, 100/h.
        #[arg(long)]
        rate: String,
        /// Requests a key may send at once above the rate.
        #[arg(long)]
        burst: Option<u32>,
        /// Requests per key per UTC day, e.g. 10000/day.
        #[arg(long)]
        quota: Option<String>,
    },
    /// List plans: NAME, RATE, BURST, QUOTA.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a plan that no key or route uses.
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create an API key and print it (the only time it is shown: only its hash is stored).
    Create {
        /// A name for the key (used to list and revoke it).
        #[arg(long)]
        name: String,
        /// Its usage plan; a key without one has no limits.
        #[arg(long)]
        plan: Option<String>,
    },
    /// List keys: NAME, ID, PLAN, STATE, USED TODAY (mesh-wide), CREATED.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key on every node (requests with it get 403).
    Revoke { name: String },
}

#[derive(Subcommand)]
pub enum GatewayCmd {
    /// Per route, summed over all live nodes: requests, 4xx, 5xx, throttled, p50/p99.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

fn plan_from_flags(
    name: String,
    rate: &str,
    burst: Option<u32>,
    quota: Option<&str>,
) -> anyhow::Result<Plan> {
    let rate_per_second = parse_rate(rate).map_err(|e| anyhow::anyhow!("--rate {rate:?}: {e}"))?;
    // Default burst: one second's worth of requests, at least 1.
    let burst = burst.unwrap_or_else(|| rate_per_second.ceil().max(1.0) as u32);
    let quota_per_day = match quota {
        Some(q) => parse_quota(q).map_err(|e| anyhow::anyhow!("--quota {q:?}: {e}"))?,
        None => 0,
    };
    Ok(Plan {
        name,
        rate_per_second,
        burst,
        quota_per_day,
        created_ms: 0,
    })
}

fn plans_table(plans: &[Plan]) -> String {
    let rows: Vec<Vec<String>> = plans
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                human_rate(p.rate_per_second),
                p.burst.to_string(),
                if p.quota_per_day == 0 {
                    "-".into()
                } else {
                    format!("{}/day", p.quota_per_day)
                },
            ]
        })
        .collect();
    table(&["NAME", "RATE", "BURST", "QUOTA"], &rows)
}

fn keys_table(keys: &[ApiKey], now: u64) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.name.clone(),
                k.id.clone(),
                if k.plan.is_empty() {
                    "-".into()
                } else {
                    k.plan.clone()
                },
                if k.revoked { "revoked" } else { "active" }.into(),
                k.used_today.to_string(),
                human_age(k.created_ms, now),
            ]
        })
        .collect();
    table(
        &["NAME", "ID", "PLAN", "STATE", "USED TODAY", "CREATED"],
        &rows,
    )
}

fn ms(seconds: f64) -> String {
    if seconds == 0.0 {
        "-".into()
    } else if seconds.is_infinite() {
        ">900s".into()
    } else if seconds < 1.0 {
        format!("{}ms", seconds * 1000.0)
    } else {
        format!("{seconds}s")
    }
}

fn stats_table(routes: &[RouteStats]) -> String {
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|r| {
            vec![
                r.route.clone(),
                r.requests.to_string(),
                r.client_errors.to_string(),
                r.server_errors.to_string(),
                r.throttled.to_string(),
                ms(r.p50_seconds),
                ms(r.p99_seconds),
            ]
        })
        .collect();
    table(
        &["ROUTE", "REQUESTS", "4XX", "5XX", "THROTTLED", "P50", "P99"],
        &rows,
    )
}

/// Runs a `meshctl plan` command.
pub async fn plan(endpoint: &str, cmd: PlanCmd) -> anyhow::Result<()> {
    let create = match &cmd {
        PlanCmd::Create {
            name,
            rate,
            burst,
            quota,
        } => Some(plan_from_flags(
            name.clone(),
            rate,
            *burst,
            quota.as_deref(),
        )?),
        _ => None,
    };
    let mut client = MeshClient::connect(endpoint).await?;
    match cmd {
        PlanCmd::Create { .. } => {
            let p = client.create_plan(create.expect("parsed above")).await?;
            print!("{}", plans_table(&[p]));
        }
        PlanCmd::Ls { json } => {
            let mut plans = client.plans().await?;
            plans.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                let v: Vec<_> = plans
                    .iter()
                    .map(|p| {
                        serde_json::json!({"name": p.name, "rate_per_second": p.rate_per_second,
                        "burst": p.burst, "quota_per_day": p.quota_per_day,
                        "created_ms": p.created_ms})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", plans_table(&plans));
            }
        }
        PlanCmd::Rm { name } => {
            client.remove_plan(&name).await?;
            println!("plan {name} removed");
        }
    }
    Ok(())
}

/// Runs a `meshctl key` command.
pub async fn key(endpoint: &str, cmd: KeyCmd) -> anyhow::Result<()> {
    let mut client = MeshClient::connect(endpoint).await?;
    match cmd {
        KeyCmd::Create { name, plan } => {
            let created = client
                .create_key(&name, plan.as_deref().unwrap_or_default())
                .await?;
            // The key alone on stdout, so `KEY=$(meshctl key create ...)` works; the note on
            // stderr.
            println!("{}", created.secret);
            eprintln!(
                "key {name} created; this is the only time it is shown (send it as x-api-key)"
            );
        }
        KeyCmd::Ls { json } => {
            let mut keys = client.keys().await?;
            keys.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({"name": k.name, "id": k.id, "plan": k.plan,
                        "revoked": k.revoked, "used_today": k.used_today,
                        "created_ms": k.created_ms, "revoked_ms": k.revoked_ms})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", keys_table(&keys, now_ms()));
            }
        }
        KeyCmd::Revoke { name } => {
            client
                .revoke_key(&name)
                .await
                .with_context(|| format!("revoking key {name}"))?;
            println!("key {name} revoked");
        }
    }
    Ok(())
}

/// Runs a `meshctl gateway` command.
pub async fn gateway(endpoint: &str, cmd: GatewayCmd) -> anyhow::Result<()> {
    let mut client = MeshClient::connect(endpoint).await?;
    match cmd {
        GatewayCmd::Stats { json } => {
            let routes = client.gateway_stats().await?;
            if json {
                let v: Vec<_> = routes
                    .iter()
                    .map(|r| {
                        serde_json::json!({"route": r.route, "requests": r.requests,
                        "4xx": r.client_errors, "5xx": r.server_errors,
                        "throttled": r.throttled, "p50_seconds": r.p50_seconds,
                        "p99_seconds": r.p99_seconds})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", stats_table(&routes));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_flags() {
        let p = plan_from_flags("basic".into(), "10/s", Some(20), Some("10000/day")).unwrap();
        assert_eq!(
            (p.rate_per_second, p.burst, p.quota_per_day),
            (10.0, 20, 10000)
        );
        let p = plan_from_flags("slow".into(), "30/min", None, None).unwrap();
        assert_eq!((p.burst, p.quota_per_day), (1, 0));
        assert!(plan_from_flags("x".into(), "10", None, None).is_err());
        assert!(plan_from_flags("x".into(), "10/s", None, Some("5/h")).is_err());
        let t = plans_table(&[p]);
        assert!(t.contains("30/min"), "{t}");
    }

    #[test]
    fn stats_are_readable() {
        let t = stats_table(&[RouteStats {
            route: "/api".into(),
            requests: 10,
            client_errors: 2,
            server_errors: 1,
            throttled: 1,
            p50_seconds: 0.002,
            p99_seconds: 0.5,
        }]);
        assert!(t.contains("/api"), "{t}");
        assert!(t.contains("2ms"), "{t}");
        assert!(t.contains("500ms"), "{t}");
    }
}
