//! `meshctl`: the command line for a Meshwork mesh. Parses flags, calls the client library,
//! prints tables (or JSON with `--json`).

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshwork_client::{MeshClient, human_bytes, human_cpu, table};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Control a Meshwork mesh through any of its nodes."
)]
struct Cli {
    /// gRPC endpoint of any node.
    #[arg(
        long,
        global = true,
        env = "MESH_ENDPOINT",
        default_value = "http://127.0.0.1:7100"
    )]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cluster secrets.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// List the members of the mesh as the answering node sees them.
    Nodes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the answering node and its cluster.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The replicated key-value state (low level; workloads live here too).
    #[command(subcommand)]
    State(StateCmd),
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Print a new random cluster secret (64 hex characters).
    New,
}

#[derive(Subcommand)]
enum StateCmd {
    /// Write VALUE (or stdin with `-`) at KEY.
    Put { key: String, value: String },
    /// Print the value at KEY.
    Get { key: String },
    /// Delete KEY.
    Rm { key: String },
    /// List entries under PREFIX.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Secret(SecretCmd::New) = cli.command {
        let bytes: [u8; 32] = rand::random();
        println!("{}", hex::encode(bytes));
        return Ok(());
    }
    let mut client = MeshClient::connect(&cli.endpoint).await?;
    match cli.command {
        Command::Secret(_) => unreachable!("handled above"),
        Command::Nodes { json } => {
            let nodes = client.nodes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        let short = n.peer_id.len().saturating_sub(8);
                        vec![
                            if n.is_self {
                                format!("{}*", n.name)
                            } else {
                                n.name.clone()
                            },
                            format!("…{}", &n.peer_id[short..]),
                            n.addr(),
                            n.state.to_uppercase(),
                            format!(
                                "{}/{}",
                                human_cpu(n.cpu_free_millis),
                                human_cpu(n.cpu_total_millis)
                            ),
                            format!(
                                "{}/{}",
                                human_bytes(n.memory_free_bytes),
                                human_bytes(n.memory_total_bytes)
                            ),
                            human_bytes(n.disk_free_bytes),
                            n.workloads.to_string(),
                            n.labels
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(","),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "NAME",
                            "PEER",
                            "ADDR",
                            "STATE",
                            "CPU (free/total)",
                            "MEMORY (free/total)",
                            "DISK FREE",
                            "WORKLOADS",
                            "LABELS"
                        ],
                        &rows
                    )
                );
            }
        }
        Command::Info { json } => {
            let info = client.info().await?;
            let node = info.node.unwrap_or_default();
            if json {
                let v = serde_json::json!({
                    "cluster_id": info.cluster_id,
                    "version": info.version,
                    "name": node.name,
                    "peer_id": node.peer_id,
                    "addrs": node.addrs,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("cluster  {}", info.cluster_id);
                println!("node     {} ({})", node.name, node.peer_id);
                println!("version  {}", info.version);
            }
        }
        Command::State(cmd) => match cmd {
            StateCmd::Put { key, value } => {
                let bytes = if value == "-" {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading the value from stdin")?;
                    buf
                } else {
                    value.into_bytes()
                };
                let e = client.put(&key, bytes).await?;
                println!("{} written at {}", e.key, e.stamp);
            }
            StateCmd::Get { key } => {
                let e = client.get(&key).await?;
                use std::io::Write;
                std::io::stdout().write_all(&e.raw)?;
                if !e.raw.ends_with(b"\n") {
                    println!();
                }
            }
            StateCmd::Rm { key } => {
                client.delete(&key).await?;
                println!("{key} deleted");
            }
            StateCmd::Ls { prefix, json } => {
                let entries = client.list(&prefix).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    let rows: Vec<Vec<String>> = entries
                        .iter()
                        .map(|e| {
                            let mut v = e.value.replace(['\n', '\r', '\t'], " ");
                            if v.chars().count() > 60 {
                                v = v.chars().take(57).collect::<String>() + "...";
                            }
                            vec![e.key.clone(), v, e.stamp.clone()]
                        })
                        .collect();
                    print!("{}", table(&["KEY", "VALUE", "STAMP"], &rows));
                }
            }
        },
    }
    Ok(())
}
