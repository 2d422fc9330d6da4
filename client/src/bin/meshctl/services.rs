//! `meshctl svc`, `meshctl logs` and `meshctl route`: container services, their logs, and the
//! gateway routes to functions and services. Flags are checked before connecting, so bad
//! input fails the same with or without a reachable node.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Context;
use clap::{Args, Subcommand};
use meshwork_client::proto::{
    CreateServiceRequest, Route, Service, ServiceLogsRequest, UpdateServiceRequest,
};
use meshwork_client::{
    LogPrefixer, MeshClient, human_age, human_bytes, human_cpu, join_command, now_ms, parse_cpu,
    split_command, table,
};
use meshwork_proto::units::parse_bytes;

use crate::{parse_env, parse_labels};

#[derive(Subcommand)]
pub enum SvcCmd {
    /// Create a service: REPLICAS copies of an image pushed to the mesh, kept running.
    Create {
        name: String,
        /// Image tag pushed with `meshctl image push`, NAME:TAG.
        #[arg(long)]
        image: String,
        /// Replicas to keep running.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// CPU per replica: cores (0.5, 1, 2.25) or thousandths of a core (250m).
        #[arg(long, default_value = "100m", allow_hyphen_values = true)]
        cpu: String,
        /// Memory limit per replica (e.g. 128Mi).
        #[arg(long, default_value = "64Mi")]
        memory: String,
        /// The port the service speaks HTTP on inside the container (the node passes the
        /// real one as PORT).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Environment variable K=V; repeat for several.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Command replacing the image's entrypoint, split like a shell: 'sh -c "echo hi"'.
        #[arg(long, value_name = "STRING")]
        cmd: Option<String>,
        /// HTTP health check: GET on this path must answer 2xx or 3xx (e.g. /healthz).
        #[arg(long, value_name = "PATH")]
        health_http: Option<String>,
        /// Health check command run in the container (exit 0 is healthy), split like a shell.
        #[arg(long, value_name = "STRING")]
        health_cmd: Option<String>,
        /// Place replicas on as many nodes as possible (the default).
        #[arg(long, conflicts_with = "binpack")]
        spread: bool,
        /// Fill nodes one after the other.
        #[arg(long)]
        binpack: bool,
        /// Only nodes with this label K=V; repeat for several.
        #[arg(long = "label-constraint", value_name = "K=V")]
        constraints: Vec<String>,
    },
    /// List services: NAME, IMAGE, DESIRED, RUNNING, PENDING, UPDATED (and ROLLOUT).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// List a service's replicas: where they run, their state, restarts and port.
    Ps {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Set the number of replicas.
    Scale { name: String, replicas: u32 },
    /// Roll out a new image, env, command or health check, one replica at a time.
    Update {
        name: String,
        /// New image tag, NAME:TAG.
        #[arg(long)]
        image: Option<String>,
        /// Environment variable K=V; repeat for several (the new environment).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// New command, split like a shell.
        #[arg(long, value_name = "STRING")]
        cmd: Option<String>,
        /// New HTTP health check path.
        #[arg(long, value_name = "PATH")]
        health_http: Option<String>,
    },
    /// Remove a service; its replicas stop.
    Rm { name: String },
    /// Show a service's spec and status.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct LogsArgs {
    /// The service.
    name: String,
    /// Keep printing new output.
    #[arg(short, long)]
    follow: bool,
    /// Only this replica (its index, e.g. 0 for NAME.0).
    #[arg(long)]
    replica: Option<u32>,
    /// How much of the end of each replica's log to print first (e.g. 64Ki; the node's
    /// default is 64Ki).
    #[arg(long, value_name = "BYTES")]
    tail: Option<String>,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum RouteCmd {
    /// Route HTTP requests under PATH on every node to a function or a service. PATH is a
    /// prefix such as /web, with {name} segments for parameters (/api/users/{id}); the target
    /// gets the rest of the path, and each parameter as the header x-mesh-param-NAME.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["function", "service"])))]
    Add {
        path: String,
        /// The function to call.
        #[arg(long = "fn", value_name = "NAME")]
        function: Option<String>,
        /// The service whose healthy replicas answer.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Pass WebSocket upgrades through (services only).
        #[arg(long, conflicts_with = "function")]
        websocket: bool,
        /// Allowed methods, e.g. GET,POST (others get 405); all by default.
        #[arg(long, value_delimiter = ',', value_name = "METHODS")]
        methods: Vec<String>,
        /// Only for requests to this host name (the Host header, port ignored).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// CORS: an allowed origin ('*' or e.g. https://app.example.com); repeat or comma-separate.
        #[arg(long = "cors-origin", value_delimiter = ',', value_name = "ORIGIN")]
        cors_origins: Vec<String>,
        /// Request body limit (e.g. 1Mi; default 6Mi); larger bodies get 413.
        #[arg(long, value_name = "BYTES")]
        max_body: Option<String>,
        /// Time limit per request (e.g. 5s; default 60s); 504 beyond.
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
        /// Response body limit (e.g. 1Mi; default 10Mi; at most 32Mi for a function, 16Gi
        /// for a service). A larger answer gets 502, or is cut while it streams; WebSocket
        /// connections are not limited.
        #[arg(long, value_name = "BYTES")]
        max_response: Option<String>,
        /// Who may call: none, key (x-api-key header) or jwt (Authorization: Bearer). --plan
        /// implies key, --jwt-* flags imply jwt.
        #[arg(long, value_parser = ["none", "key", "jwt"])]
        auth: Option<String>,
        /// With key auth: a plan whose keys may call (repeat or comma-separate); any plan by
        /// default. Keys of other plans get 403.
        #[arg(long = "plan", value_delimiter = ',', value_name = "PLAN")]
        plans: Vec<String>,
        /// JWT: a file holding the HS256 shared secret (a trailing newline is dropped).
        #[arg(long, value_name = "FILE")]
        jwt_hs256_secret_file: Option<std::path::PathBuf>,
        /// JWT: a file holding the RS256 public key in PEM.
        #[arg(long, value_name = "FILE")]
        jwt_rs256_key_file: Option<std::path::PathBuf>,
        /// JWT: the audience tokens must name in "aud".
        #[arg(long, value_name = "AUD")]
        jwt_audience: Option<String>,
    },
    /// List routes: PATH, HOST, TARGET, METHODS, AUTH, OPTIONS (limits, timeout, CORS, WebSocket).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove the route with this PATH (and --host, for a route bound to a host).
    Rm {
        path: String,
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
    },
}

/// Builds the route of `route add` from its flags; reads the JWT key files.
fn route_from_flags(cmd: RouteCmd) -> anyhow::Result<Route> {
    let RouteCmd::Add {
        path,
        function,
        service,
        websocket,
        methods,
        host,
        cors_origins,
        max_body,
        timeout,
        max_response,
        auth,
        plans,
        jwt_hs256_secret_file,
        jwt_rs256_key_file,
        jwt_audience,
    } = cmd
    else {
        anyhow::bail!("not route add");
    };
    let max_body_bytes = match &max_body {
        Some(text) => parse_bytes(text)
            .with_context(|| format!("--max-body {text:?}: expected bytes like 1Mi"))?,
        None => 0,
    };
    let max_response_bytes = match &max_response {
        Some(text) => Some(max_response_flag(text)?),
        None => None,
    };
    let timeout_ms = match &timeout {
        Some(text) => meshwork_proto::units::parse_duration(text)
            .with_context(|| format!("--timeout {text:?}: expected a duration like 5s or 500ms"))?
            .as_millis() as u64,
        None => 0,
    };
    let jwt_flags =
        jwt_hs256_secret_file.is_some() || jwt_rs256_key_file.is_some() || jwt_audience.is_some();
    let auth = match auth {
        Some(a) => a,
        None if !plans.is_empty() => "key".into(),
        None if jwt_flags => "jwt".into(),
        None => "none".into(),
    };
    if auth == "jwt" && jwt_hs256_secret_file.is_none() && jwt_rs256_key_file.is_none() {
        anyhow::bail!("--auth jwt needs --jwt-hs256-secret-file or --jwt-rs256-key-file");
    }
    let jwt_hs256_secret = match &jwt_hs256_secret_file {
        Some(f) => {
            let mut bytes = std::fs::read(f)
                .with_context(|| format!("--jwt-hs256-secret-file {}", f.display()))?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            bytes
        }
        None => vec![],
    };
    let jwt_rs256_public_key = match &jwt_rs256_key_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("--jwt-rs256-key-file {}", f.display()))?,
        None => String::new(),
    };
    Ok(Route {
        path,
        function: function.unwrap_or_default(),
        service: service.unwrap_or_default(),
        websocket,
        created_ms: 0,
        methods,
        host: host.unwrap_or_default(),
        cors_origins,
        max_body_bytes,
        timeout_ms,
        auth,
        plans,
        jwt_hs256_secret,
        jwt_rs256_public_key,
        jwt_audience: jwt_audience.unwrap_or_default(),
        jwt_hs256_configured: false,
        max_response_bytes,
    })
}

/// Reads `--max-response`: a size of at least one byte (the node checks the maximum, which
/// depends on the target).
fn max_response_flag(text: &str) -> anyhow::Result<u64> {
    let bytes = parse_bytes(text)
        .with_context(|| format!("--max-response {text:?}: expected bytes like 1Mi"))?;
    if bytes == 0 {
        anyhow::bail!(
            "--max-response {text:?}: must be at least 1 byte (leave it out for the default, 10Mi)"
        );
    }
    Ok(bytes)
}

pub(crate) fn cpu_flag(text: &str) -> anyhow::Result<u64> {
    parse_cpu(text).map_err(|e| anyhow::anyhow!("--cpu {text:?}: {e}"))
}

pub(crate) fn memory_flag(text: &str) -> anyhow::Result<u64> {
    parse_bytes(text).with_context(|| format!("--memory {text:?}: expected bytes like 64Mi"))
}

pub(crate) fn command_flag(flag: &str, text: Option<&str>) -> anyhow::Result<Vec<String>> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => split_command(t).map_err(|e| anyhow::anyhow!("{flag} {t:?}: {e}")),
    }
}

pub(crate) fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

pub(crate) fn pairs(map: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = map.iter().collect();
    let text: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if text.is_empty() {
        "-".into()
    } else {
        text.join(",")
    }
}

fn service_json(s: &Service) -> serde_json::Value {
    let sorted = |m: &std::collections::HashMap<String, String>| -> BTreeMap<String, String> {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    serde_json::json!({
        "name": s.name, "image": s.image, "replicas": s.replicas,
        "cpu_millis": s.cpu_millis, "memory_bytes": s.memory_bytes, "port": s.port,
        "env": sorted(&s.env), "cmd": s.cmd, "health_http": s.health_http,
        "health_cmd": s.health_cmd, "strategy": s.strategy,
        "constraints": sorted(&s.constraints), "generation": s.generation,
        "created_ms": s.created_ms, "running": s.running, "pending": s.pending,
        "updated": s.updated, "rollout": s.rollout,
    })
}

/// Runs a `meshctl svc` command against the node at `endpoint`.
pub async fn service(endpoint: &str, cmd: SvcCmd) -> anyhow::Result<()> {
    match cmd {
        SvcCmd::Create {
            name,
            image,
            replicas,
            cpu,
            memory,
            port,
            env,
            cmd,
            health_http,
            health_cmd,
            spread: _,
            binpack,
            constraints,
        } => {
            let request = CreateServiceRequest {
                name,
                image,
                replicas,
                cpu_millis: cpu_flag(&cpu)?,
                memory_bytes: memory_flag(&memory)?,
                port: port.map_or(0, u32::from),
                env: parse_env(&env)?,
                cmd: command_flag("--cmd", cmd.as_deref())?,
                health_http: health_http.unwrap_or_default(),
                health_cmd: command_flag("--health-cmd", health_cmd.as_deref())?,
                strategy: if binpack { "binpack" } else { "spread" }.into(),
                constraints: parse_labels("--label-constraint", &constraints)?,
            };
            let mut client = MeshClient::connect(endpoint).await?;
            let s = client.create_service(request).await?;
            println!(
                "{} created: {} replica{} of {}",
                s.name,
                s.replicas,
                if s.replicas == 1 { "" } else { "s" },
                s.image
            );
        }
        SvcCmd::Update {
            name,
            image,
            env,
            cmd,
            health_http,
        } => {
            if image.is_none() && env.is_empty() && cmd.is_none() && health_http.is_none() {
                anyhow::bail!("nothing to update: give --image, --env, --cmd or --health-http");
            }
            let request = UpdateServiceRequest {
                name,
                image: image.unwrap_or_default(),
                env: parse_env(&env)?,
                cmd: command_flag("--cmd", cmd.as_deref())?,
                health_http: health_http.unwrap_or_default(),
            };
            let mut client = MeshClient::connect(endpoint).await?;
            let s = client.update_service(request).await?;
            println!(
                "{} updating to generation {} ({})",
                s.name,
                s.generation,
                if s.rollout.is_empty() {
                    "one replica at a time"
                } else {
                    &s.rollout
                }
            );
        }
        SvcCmd::Scale { name, replicas } => {
            let mut client = MeshClient::connect(endpoint).await?;
            let s = client.scale_service(&name, replicas).await?;
            println!(
                "{} scaled to {} replica{}",
                s.name,
                s.replicas,
                if s.replicas == 1 { "" } else { "s" }
            );
        }
        SvcCmd::Rm { name } => {
            let mut client = MeshClient::connect(endpoint).await?;
            client.remove_service(&name).await?;
            println!("{name} removed");
        }
        SvcCmd::Ls { json } => {
            let mut client = MeshClient::connect(endpoint).await?;
            let services = client.services().await?;
            if json {
                let v: Vec<_> = services.iter().map(service_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", services_table(&services));
            }
        }
        SvcCmd::Ps { name, json } => {
            let mut client = MeshClient::connect(endpoint).await?;
            let mut replicas = client.service_ps(&name).await?;
            replicas.sort_by_key(|r| r.index);
            if json {
                let v: Vec<_> = replicas
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                        "id": format!("{name}.{}", r.index), "index": r.index, "node": r.node,
                        "node_id": r.node_id, "state": r.state, "restarts": r.restarts,
                        "since_ms": r.since_ms, "reason": r.reason, "healthy": r.healthy,
                        "port": r.port, "container_id": r.container_id,
                        "generation": r.generation, "epoch": r.epoch})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let now = now_ms();
                let rows: Vec<Vec<String>> = replicas
                    .iter()
                    .map(|r| {
                        vec![
                            format!("{name}.{}", r.index),
                            or_dash(&r.node),
                            or_dash(&r.state),
                            r.restarts.to_string(),
                            human_age(r.since_ms, now),
                            if r.port == 0 {
                                "-".into()
                            } else {
                                r.port.to_string()
                            },
                            or_dash(&r.reason),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["ID", "NODE", "STATE", "RESTARTS", "SINCE", "PORT", "REASON"],
                        &rows
                    )
                );
            }
        }
        SvcCmd::Inspect { name, json } => {
            let mut client = MeshClient::connect(endpoint).await?;
            let s = client.service(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&service_json(&s))?);
            } else {
                print!("{}", inspect_text(&s, now_ms()));
            }
        }
    }
    Ok(())
}

fn services_table(services: &[Service]) -> String {
    let rollout = services.iter().any(|s| !s.rollout.is_empty());
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let mut row = vec![
                s.name.clone(),
                s.image.clone(),
                s.replicas.to_string(),
                s.running.to_string(),
                s.pending.to_string(),
                s.updated.to_string(),
            ];
            if rollout {
                row.push(or_dash(&s.rollout));
            }
            row
        })
        .collect();
    let mut header = vec!["NAME", "IMAGE", "DESIRED", "RUNNING", "PENDING", "UPDATED"];
    if rollout {
        header.push("ROLLOUT");
    }
    table(&header, &rows)
}

fn inspect_text(s: &Service, now: u64) -> String {
    let mut health = Vec::new();
    if !s.health_http.is_empty() {
        health.push(format!("GET {}", s.health_http));
    }
    if !s.health_cmd.is_empty() {
        health.push(format!("exec {}", join_command(&s.health_cmd)));
    }
    let lines = [
        ("name", s.name.clone()),
        ("image", s.image.clone()),
        (
            "replicas",
            format!(
                "{} desired, {} running, {} pending, {} updated",
                s.replicas, s.running, s.pending, s.updated
            ),
        ),
        ("rollout", or_dash(&s.rollout)),
        ("generation", s.generation.to_string()),
        ("cpu", human_cpu(s.cpu_millis)),
        ("memory", human_bytes(s.memory_bytes)),
        (
            "port",
            if s.port == 0 {
                "-".into()
            } else {
                s.port.to_string()
            },
        ),
        (
            "cmd",
            if s.cmd.is_empty() {
                "- (the image's)".into()
            } else {
                join_command(&s.cmd)
            },
        ),
        ("health", or_dash(&health.join(", "))),
        ("strategy", or_dash(&s.strategy)),
        ("constraints", pairs(&s.constraints)),
        ("env", pairs(&s.env)),
        (
            "created",
            if s.created_ms == 0 {
                "-".into()
            } else {
                format!("{} ago", human_age(s.created_ms, now))
            },
        ),
    ];
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    lines
        .iter()
        .map(|(k, v)| format!("{k:<width$}{v}\n"))
        .collect()
}

/// Runs `meshctl logs`: prints the chunks as they arrive.
pub async fn logs(endpoint: &str, args: LogsArgs) -> anyhow::Result<()> {
    let tail_bytes = match &args.tail {
        None => 0,
        Some(t) => parse_bytes(t)
            .with_context(|| format!("--tail {t:?}: expected bytes like 64Ki or 4096"))?,
    };
    let mut client = MeshClient::connect(endpoint).await?;
    // Prefix lines from the start when the service has several replicas (a second replica
    // showing up later turns prefixes on too).
    let prefix = args.replica.is_none() && client.service(&args.name).await?.replicas > 1;
    let mut stream = client
        .service_logs(ServiceLogsRequest {
            name: args.name.clone(),
            replica: args.replica,
            follow: args.follow,
            tail_bytes,
        })
        .await?;
    let mut lines = LogPrefixer::new(&args.name, prefix);
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = stream.next().await? {
            write_stdout(&lines.push(chunk.replica, &chunk.data))?;
        }
        write_stdout(&lines.finish())?;
        Ok(())
    }
    .await;
    closed_pipe_is_fine(result)
}

/// Writes log output to stdout now (not when a line ends).
pub(crate) fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// The result of printing logs: `meshctl logs web | head` closes the pipe, which ends the
/// command, not an error.
pub(crate) fn closed_pipe_is_fine(result: anyhow::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Runs a `meshctl route` command against the node at `endpoint`.
pub async fn route(endpoint: &str, cmd: RouteCmd) -> anyhow::Result<()> {
    // Flags and files are checked before connecting.
    let (add, cmd) = match cmd {
        cmd @ RouteCmd::Add { .. } => (Some(route_from_flags(cmd)?), None),
        other => (None, Some(other)),
    };
    let mut client = MeshClient::connect(endpoint).await?;
    if let Some(route) = add {
        let r = client.add_route(route).await?;
        println!(
            "{} -> {}{}",
            route_label(&r),
            route_target(&r),
            if r.websocket { " (websocket)" } else { "" }
        );
        return Ok(());
    }
    match cmd.expect("not add") {
        RouteCmd::Add { .. } => unreachable!("handled above"),
        RouteCmd::Ls { json } => {
            let mut routes = client.routes().await?;
            routes.sort_by(|a, b| (&a.path, &a.host).cmp(&(&b.path, &b.host)));
            if json {
                let v: Vec<_> = routes
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                        "path": r.path, "host": r.host, "function": r.function,
                        "service": r.service, "websocket": r.websocket,
                        "methods": r.methods, "cors_origins": r.cors_origins,
                        "max_body_bytes": r.max_body_bytes, "timeout_ms": r.timeout_ms,
                        "max_response_bytes": r.max_response_bytes,
                        "auth": r.auth, "plans": r.plans,
                        "jwt_hs256": r.jwt_hs256_configured,
                        "jwt_rs256": !r.jwt_rs256_public_key.is_empty(),
                        "jwt_audience": r.jwt_audience,
                        "created_ms": r.created_ms})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", routes_table(&routes));
            }
        }
        RouteCmd::Rm { path, host } => {
            let host = host.unwrap_or_default();
            client.remove_route(&host, &path).await?;
            println!("{host}{path} removed");
        }
    }
    Ok(())
}

fn route_label(r: &Route) -> String {
    format!("{}{}", r.host, r.path)
}

fn routes_table(routes: &[Route]) -> String {
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|r| {
            let auth = match r.auth.as_str() {
                "key" if !r.plans.is_empty() => format!("key:{}", r.plans.join(",")),
                "" => "none".into(),
                a => a.to_string(),
            };
            let mut limits = vec![];
            if r.max_body_bytes > 0 {
                limits.push(format!("body {}", human_bytes(r.max_body_bytes)));
            }
            if let Some(bytes) = r.max_response_bytes {
                limits.push(format!("response {}", human_bytes(bytes)));
            }
            if r.timeout_ms > 0 {
                limits.push(format!("{}ms", r.timeout_ms));
            }
            if !r.cors_origins.is_empty() {
                limits.push(format!("cors {}", r.cors_origins.join(",")));
            }
            if r.websocket {
                limits.push("websocket".into());
            }
            vec![
                r.path.clone(),
                or_dash(&r.host),
                route_target(r),
                or_dash(&r.methods.join(",")),
                auth,
                or_dash(&limits.join(" ")),
            ]
        })
        .collect();
    table(
        &["PATH", "HOST", "TARGET", "METHODS", "AUTH", "OPTIONS"],
        &rows,
    )
}

fn route_target(r: &Route) -> String {
    if !r.function.is_empty() {
        format!("fn:{}", r.function)
    } else if !r.service.is_empty() {
        format!("svc:{}", r.service)
    } else {
        "-".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Service {
        Service {
            name: "web".into(),
            image: "app:1.0".into(),
            replicas: 3,
            cpu_millis: 250,
            memory_bytes: 128 << 20,
            port: 8080,
            env: [("B".to_string(), "2".to_string()), ("A".into(), "1".into())].into(),
            cmd: vec!["sh".into(), "-c".into(), "echo hi".into()],
            health_http: "/healthz".into(),
            strategy: "spread".into(),
            generation: 2,
            created_ms: 1_000,
            running: 2,
            pending: 1,
            updated: 1,
            ..Default::default()
        }
    }

    #[test]
    fn the_rollout_column_shows_only_while_a_rollout_has_something_to_say() {
        let mut s = vec![web()];
        let t = services_table(&s);
        assert_eq!(
            t.lines().next().unwrap(),
            "NAME  IMAGE    DESIRED  RUNNING  PENDING  UPDATED"
        );
        assert_eq!(
            t.lines().nth(1).unwrap(),
            "web   app:1.0  3        2        1        1"
        );
        s.push(Service {
            name: "api".into(),
            rollout: "rolling 1/3".into(),
            ..web()
        });
        let t = services_table(&s);
        assert!(
            t.lines().next().unwrap().ends_with("UPDATED  ROLLOUT"),
            "{t}"
        );
        assert!(t.lines().nth(1).unwrap().ends_with(" -"), "{t}");
        assert!(t.lines().nth(2).unwrap().ends_with("rolling 1/3"), "{t}");
    }

    #[test]
    fn inspect_is_readable() {
        let t = inspect_text(&web(), 181_000);
        assert!(t.contains("name         web\n"), "{t}");
        assert!(t.contains("cpu          250m\n"), "{t}");
        assert!(t.contains("memory       128Mi\n"), "{t}");
        assert!(t.contains("cmd          sh -c 'echo hi'\n"), "{t}");
        assert!(t.contains("health       GET /healthz\n"), "{t}");
        assert!(t.contains("env          A=1,B=2\n"), "{t}");
        assert!(t.contains("created      3m ago\n"), "{t}");
        assert!(t.contains("2 running, 1 pending"), "{t}");
    }

    #[test]
    fn route_targets() {
        let r = Route {
            function: "hello".into(),
            ..Default::default()
        };
        assert_eq!(route_target(&r), "fn:hello");
        let r = Route {
            service: "web".into(),
            ..Default::default()
        };
        assert_eq!(route_target(&r), "svc:web");
    }

    #[test]
    fn route_flags_become_a_route() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: RouteCmd,
        }
        let cli = Cli::try_parse_from([
            "x",
            "add",
            "/api/users/{id}",
            "--fn",
            "users",
            "--methods",
            "GET,POST",
            "--plan",
            "basic",
            "--max-body",
            "1Mi",
            "--timeout",
            "5s",
            "--cors-origin",
            "*",
            "--max-response",
            "2Mi",
        ])
        .unwrap();
        let r = route_from_flags(cli.cmd).unwrap();
        assert_eq!(r.max_response_bytes, Some(2 << 20));
        assert_eq!(r.methods, ["GET", "POST"]);
        assert_eq!(r.auth, "key");
        assert_eq!(r.plans, ["basic"]);
        assert_eq!(r.max_body_bytes, 1 << 20);
        assert_eq!(r.timeout_ms, 5000);
        assert_eq!(r.cors_origins, ["*"]);
        let t = routes_table(&[r]);
        assert!(t.contains("key:basic"), "{t}");
        assert!(t.contains("response 2.0Mi"), "{t}");
        let cli = Cli::try_parse_from(["x", "add", "/a", "--service", "web"]).unwrap();
        assert_eq!(route_from_flags(cli.cmd).unwrap().max_response_bytes, None);
        for (bad, why) in [
            ("0", "must be at least 1 byte"),
            ("0Mi", "must be at least 1 byte"),
            ("lots", "expected bytes like 1Mi"),
            ("1 Mi", "expected bytes like 1Mi"),
        ] {
            let cli =
                Cli::try_parse_from(["x", "add", "/a", "--service", "web", "--max-response", bad])
                    .unwrap();
            let e = format!("{:#}", route_from_flags(cli.cmd).unwrap_err());
            assert!(e.contains(&format!("--max-response {bad:?}")), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
        let cli = Cli::try_parse_from(["x", "add", "/a", "--fn", "f", "--auth", "jwt"]).unwrap();
        assert!(route_from_flags(cli.cmd).is_err());
    }
}
