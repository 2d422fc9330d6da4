//! `meshctl`: the command line for a Meshwork mesh. Parses flags, calls the client library,
//! prints tables (or JSON with `--json`).

use std::io::Read;
use std::process::ExitCode;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use meshwork_client::{MeshClient, UploadOptions, human_bytes, human_cpu, table};

mod gateway;
mod jobs;
mod services;

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
    /// Content-addressed blobs (e.g. Wasm modules), named by their blake3 hash.
    #[command(subcommand)]
    Blob(BlobCmd),
    /// Container images kept in the mesh (OCI layout or `docker save` tars).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Functions: WebAssembly (WASI) modules run on any node (like Lambda).
    #[command(subcommand, name = "fn")]
    Function(FnCmd),
    /// Container services: replicas of an image kept running on the nodes' containerd.
    #[command(subcommand, name = "svc")]
    Service(services::SvcCmd),
    /// Print a service's stdout and stderr, gathered from the nodes that run its replicas.
    Logs(services::LogsArgs),
    /// Gateway routes: every node's HTTP listener forwards a path prefix to a function or a
    /// service.
    #[command(subcommand)]
    Route(services::RouteCmd),
    /// Usage plans for API keys: rate, burst and daily quota, enforced mesh-wide.
    #[command(subcommand)]
    Plan(gateway::PlanCmd),
    /// API keys (the x-api-key header of routes with --auth key).
    #[command(subcommand)]
    Key(gateway::KeyCmd),
    /// The API gateway's counters.
    #[command(subcommand)]
    Gateway(gateway::GatewayCmd),
    /// Batch jobs: an image or a Wasm module run to completion, once or as an array, with
    /// retries, dependencies and a time limit.
    #[command(subcommand)]
    Job(jobs::JobCmd),
}

#[derive(Subcommand)]
enum FnCmd {
    /// Upload a .wasm module and deploy it under NAME (updates an existing function).
    Deploy {
        name: String,
        module: PathBuf,
        /// Memory limit (e.g. 64Mi).
        #[arg(long, default_value = "128Mi")]
        memory: String,
        /// Time limit per call (e.g. 500ms, 5s).
        #[arg(long, default_value = "3s")]
        timeout: String,
        /// Environment variable K=V; repeat for several.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Calls at once per node; more get 429.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// Warm copies kept on the mesh.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Internal event that invokes it asynchronously (e.g. job.finished); repeat.
        #[arg(long = "on", value_name = "EVENT")]
        events: Vec<String>,
        /// Who may call it at http://NODE:8080/fn/NAME: public, key (a valid API key in
        /// x-api-key; its plan's limits apply) or off (routes, events and gRPC only).
        #[arg(long, default_value = "public",
              value_parser = ["public", "key", "off"])]
        url: String,
    },
    /// Call a function and print its answer body.
    Invoke {
        name: String,
        /// Request body.
        #[arg(long, default_value = "")]
        data: String,
        /// Query string, e.g. name=ann.
        #[arg(long, default_value = "")]
        query: String,
        /// Queue the call (at least once, up to 2 retries) and print its id.
        #[arg(long = "async")]
        run_async: bool,
    },
    /// Run a function once per cron tick in the whole mesh.
    Schedule {
        name: String,
        /// 5 fields (min hour day month weekday) or 6 with seconds first; "" removes it.
        #[arg(long)]
        cron: String,
    },
    /// List functions.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a function.
    Rm { name: String },
    /// Recent stderr lines of a function, from every node.
    Logs { name: String },
    /// Invocations, errors, cold starts, p50/p99, GB-seconds, summed over the mesh.
    Stats {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BlobCmd {
    /// Store a file in the mesh; prints its blake3 hash.
    Put {
        file: PathBuf,
        /// Copies the mesh keeps.
        #[arg(long, default_value_t = 2)]
        replicas: u32,
    },
    /// Fetch a blob (from any holder) into a file, or stdout with `-o -`.
    Get {
        hash: String,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List blobs.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Push an image tar (OCI image layout or `docker save`) under NAME:TAG.
    Push {
        tar: PathBuf,
        #[arg(long)]
        tag: String,
        /// Copies the mesh keeps.
        #[arg(long, default_value_t = 2)]
        replicas: u32,
    },
    /// List images: NAME:TAG, ROOT (blake3 of the manifest), SIZE, HOLDERS.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show an image's manifest, layers, digests and holders.
    Inspect {
        reference: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a tag (its blobs go at garbage collection unless used elsewhere).
    Rm { reference: String },
    /// Make the image complete on the answering node (peer to peer).
    Pull { reference: String },
    /// Pull the image onto the answering node and import it into its containerd.
    Import { reference: String },
    /// Collect unreferenced blobs on the answering node now.
    Gc {
        /// Grace period in seconds for this run (default: the node's).
        #[arg(long)]
        grace_secs: Option<u64>,
    },
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
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `meshctl ... | head` closes stdout early; `println!` then panics with "failed printing to
/// stdout". Exit quietly with the status a shell gives for SIGPIPE (141) instead of printing a
/// panic; every other panic keeps the default report.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Commands that need no node, or check their flags before connecting.
    let command = match cli.command {
        Command::Secret(SecretCmd::New) => {
            let bytes: [u8; 32] = rand::random();
            println!("{}", hex::encode(bytes));
            return Ok(());
        }
        Command::Service(cmd) => return services::service(&cli.endpoint, cmd).await,
        Command::Logs(args) => return services::logs(&cli.endpoint, args).await,
        Command::Route(cmd) => return services::route(&cli.endpoint, cmd).await,
        Command::Plan(cmd) => return gateway::plan(&cli.endpoint, cmd).await,
        Command::Key(cmd) => return gateway::key(&cli.endpoint, cmd).await,
        Command::Gateway(cmd) => return gateway::gateway(&cli.endpoint, cmd).await,
        Command::Job(cmd) => return jobs::job(&cli.endpoint, cmd).await,
        other => other,
    };
    let mut client = MeshClient::connect(&cli.endpoint).await?;
    match command {
        Command::Secret(_)
        | Command::Service(_)
        | Command::Logs(_)
        | Command::Route(_)
        | Command::Plan(_)
        | Command::Key(_)
        | Command::Gateway(_)
        | Command::Job(_) => {
            unreachable!("handled above")
        }
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
        Command::Blob(cmd) => blob(&mut client, cmd).await?,
        Command::Image(cmd) => image(&mut client, cmd).await?,
        Command::Function(cmd) => function(&mut client, cmd).await?,
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

/// Parses `--env K=V` flags: K is letters, digits and '_', not starting with a digit.
fn parse_env<C: FromIterator<(String, String)>>(pairs: &[String]) -> anyhow::Result<C> {
    pairs
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?}: expected K=V"))?;
            let name_ok = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_ok {
                anyhow::bail!(
                    "--env {kv:?}: the name must be letters, digits and '_', not starting with a digit"
                );
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Parses node label flags `K=V` (such as `--label-constraint`), with keys as `meshd --label`
/// takes them: letters, digits, '.', '_', '-', '/'.
fn parse_labels<C: FromIterator<(String, String)>>(
    flag: &str,
    pairs: &[String],
) -> anyhow::Result<C> {
    pairs
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("{flag} {kv:?}: expected K=V"))?;
            let key_ok = !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
            if !key_ok {
                anyhow::bail!("{flag} {kv:?}: the key must be letters, digits, '.', '_', '-', '/'");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Opens a Wasm module to upload, saying which file when it cannot.
fn open_module(path: &Path) -> anyhow::Result<std::fs::File> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if !f.metadata()?.is_file() {
        anyhow::bail!("{} is not a file", path.display());
    }
    Ok(f)
}

/// Uploads a Wasm module (pinned, so garbage collection keeps it) and returns its blake3
/// hex, the name functions and jobs refer to it by.
async fn upload_module(client: &mut MeshClient, file: std::fs::File) -> anyhow::Result<String> {
    let info = client
        .put_blob(
            file,
            UploadOptions {
                pinned: true,
                ..Default::default()
            },
            |_| {},
        )
        .await?;
    Ok(info.blake3)
}

/// A byte progress bar on stderr (hidden when stderr is not a terminal).
fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr_with_hz(10),
    );
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn holders_text(holders: &[meshwork_client::proto::Holder]) -> String {
    let names: Vec<String> = holders
        .iter()
        .map(|h| {
            let n = if h.name.is_empty() {
                &h.peer_id
            } else {
                &h.name
            };
            if h.alive {
                n.clone()
            } else {
                format!("{n}(down)")
            }
        })
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

async fn blob(client: &mut MeshClient, cmd: BlobCmd) -> anyhow::Result<()> {
    match cmd {
        BlobCmd::Put { file, replicas } => {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let size = f.metadata()?.len();
            let pb = bar(size, "upload");
            let p = pb.clone();
            let info = client
                .put_blob(
                    f,
                    UploadOptions {
                        pinned: true,
                        replicas,
                        ..Default::default()
                    },
                    move |n| p.inc(n),
                )
                .await?;
            pb.finish_and_clear();
            println!("{}", info.blake3);
        }
        BlobCmd::Get { hash, output } => {
            let to_stdout = output.as_os_str() == "-";
            let mut out: Box<dyn std::io::Write> = if to_stdout {
                Box::new(std::io::stdout().lock())
            } else {
                // Write beside the target and rename, so a failed download leaves nothing.
                Box::new(std::fs::File::create(output.with_extension("part"))?)
            };
            let pb = bar(0, "download");
            let p = pb.clone();
            let result = client
                .get_blob(&hash, &mut out, move |done, total| {
                    p.set_length(total);
                    p.set_position(done);
                })
                .await;
            pb.finish_and_clear();
            drop(out);
            if !to_stdout {
                if let Err(e) = result {
                    let _ = std::fs::remove_file(output.with_extension("part"));
                    return Err(e.into());
                }
                std::fs::rename(output.with_extension("part"), &output)?;
            } else {
                result?;
            }
        }
        BlobCmd::Ls { json } => {
            let blobs = client.blobs().await?;
            if json {
                let v: Vec<_> = blobs
                    .iter()
                    .map(|b| serde_json::json!({
                        "blake3": b.blake3, "sha256": b.sha256, "size": b.size,
                        "pinned": b.pinned, "replicas": b.replicas,
                        "holders": b.holders.iter().map(|h| serde_json::json!({
                            "peer_id": h.peer_id, "name": h.name, "alive": h.alive})).collect::<Vec<_>>(),
                    }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = blobs
                    .iter()
                    .map(|b| {
                        vec![
                            b.blake3.clone(),
                            human_bytes(b.size),
                            holders_text(&b.holders),
                        ]
                    })
                    .collect();
                print!("{}", table(&["HASH", "SIZE", "HOLDERS"], &rows));
            }
        }
    }
    Ok(())
}

fn image_json(i: &meshwork_client::proto::Image) -> serde_json::Value {
    let blob = |b: &Option<meshwork_client::proto::ImageBlob>| {
        b.as_ref().map(|b| {
            serde_json::json!({
            "blake3": b.blake3, "sha256": b.sha256, "size": b.size, "media_type": b.media_type})
        })
    };
    serde_json::json!({
        "reference": i.reference,
        "root": i.manifest.as_ref().map(|m| m.blake3.clone()),
        "size": i.size,
        "replicas": i.replicas,
        "manifest": blob(&i.manifest),
        "config": blob(&i.config),
        "layers": i.layers.iter().map(|l| blob(&Some(l.clone()))).collect::<Vec<_>>(),
        "holders": i.holders.iter().map(|h| serde_json::json!({
            "peer_id": h.peer_id, "name": h.name, "alive": h.alive})).collect::<Vec<_>>(),
    })
}

async fn image(client: &mut MeshClient, cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Push { tar, tag, replicas } => {
            let pb = bar(0, "push");
            let p = pb.clone();
            let image =
                meshwork_client::push_image(client, &tar, &tag, replicas, move |done, total| {
                    p.set_length(total);
                    p.set_position(done);
                })
                .await?;
            pb.finish_and_clear();
            println!(
                "{} pushed: root {} ({})",
                image.reference,
                image.manifest.as_ref().map_or("-", |m| m.blake3.as_str()),
                human_bytes(image.size)
            );
        }
        ImageCmd::Ls { json } => {
            let images = client.images().await?;
            if json {
                let v: Vec<_> = images.iter().map(image_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        let root = i
                            .manifest
                            .as_ref()
                            .map_or("-".to_string(), |m| m.blake3[..16].to_string());
                        vec![
                            i.reference.clone(),
                            root,
                            human_bytes(i.size),
                            holders_text(&i.holders),
                        ]
                    })
                    .collect();
                print!("{}", table(&["NAME:TAG", "ROOT", "SIZE", "HOLDERS"], &rows));
            }
        }
        ImageCmd::Inspect { reference, json } => {
            let i = client.image(&reference).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&image_json(&i))?);
            } else {
                println!("image     {}", i.reference);
                println!("size      {}", human_bytes(i.size));
                println!("replicas  {}", i.replicas);
                println!("holders   {}", holders_text(&i.holders));
                let mut rows = Vec::new();
                let mut row = |kind: String, b: &meshwork_client::proto::ImageBlob| {
                    rows.push(vec![
                        kind,
                        b.sha256.clone(),
                        b.blake3.clone(),
                        human_bytes(b.size),
                        b.media_type.clone(),
                    ]);
                };
                if let Some(m) = &i.manifest {
                    row("manifest".into(), m);
                }
                if let Some(c) = &i.config {
                    row("config".into(), c);
                }
                for (n, l) in i.layers.iter().enumerate() {
                    row(format!("layer {n}"), l);
                }
                println!();
                print!(
                    "{}",
                    table(
                        &["BLOB", "OCI DIGEST", "BLAKE3", "SIZE", "MEDIA TYPE"],
                        &rows
                    )
                );
            }
        }
        ImageCmd::Rm { reference } => {
            client.remove_image(&reference).await?;
            println!("{reference} removed");
        }
        ImageCmd::Pull { reference } => {
            let pb = bar(0, "pull");
            let p = pb.clone();
            client
                .pull_image(&reference, move |done, total| {
                    p.set_length(total);
                    p.set_position(done);
                })
                .await?;
            pb.finish_and_clear();
            println!("{reference} is complete on this node");
        }
        ImageCmd::Import { reference } => {
            let r = client.import_image(&reference).await?;
            println!(
                "{reference} is in containerd as {} ({} blobs written, {} already there, {} layers unpacked)",
                r.containerd_name, r.blobs_written, r.blobs_present, r.layers_unpacked
            );
        }
        ImageCmd::Gc { grace_secs } => {
            let r = client.collect_garbage(grace_secs).await?;
            println!(
                "removed {} blobs, {} chunks, {} freed",
                r.blobs_removed,
                r.chunks_removed,
                human_bytes(r.bytes_freed)
            );
        }
    }
    Ok(())
}

async fn function(client: &mut MeshClient, cmd: FnCmd) -> anyhow::Result<()> {
    use meshwork_client::proto::{DeployFunctionRequest, InvokeRequest};
    use meshwork_proto::units::{parse_bytes, parse_duration};
    match cmd {
        FnCmd::Deploy {
            name,
            module,
            memory,
            timeout,
            env,
            concurrency,
            replicas,
            events,
            url,
        } => {
            let memory_bytes = parse_bytes(&memory)
                .with_context(|| format!("--memory {memory:?}: expected bytes like 64Mi"))?;
            let timeout = parse_duration(&timeout).with_context(|| {
                format!("--timeout {timeout:?}: expected a duration like 5s or 500ms")
            })?;
            let env = parse_env(&env)?;
            let f = open_module(&module)?;
            let module = upload_module(client, f).await?;
            let deployed = client
                .deploy_function(DeployFunctionRequest {
                    name,
                    module,
                    memory_bytes,
                    timeout_ms: timeout.as_millis() as u64,
                    env,
                    concurrency,
                    replicas,
                    events,
                    url,
                })
                .await?;
            println!(
                "{} deployed (module {})",
                deployed.name,
                &deployed.module[..16]
            );
        }
        FnCmd::Invoke {
            name,
            data,
            query,
            run_async,
        } => {
            let request = InvokeRequest {
                name,
                body: data.into_bytes(),
                method: "POST".into(),
                path: "/".into(),
                query,
                headers: Default::default(),
            };
            if run_async {
                println!("{}", client.invoke_async(request).await?);
                return Ok(());
            }
            let r = client.invoke(request).await?;
            use std::io::Write;
            std::io::stdout().write_all(&r.body)?;
            if !(200..300).contains(&r.status) {
                anyhow::bail!("status {}: {}", r.status, r.error);
            }
        }
        FnCmd::Ls { json } => {
            let fns = client.functions().await?;
            if json {
                let v: Vec<_> = fns
                    .iter()
                    .map(|f| {
                        serde_json::json!({
                        "name": f.name, "module": f.module, "memory_bytes": f.memory_bytes,
                        "timeout_ms": f.timeout_ms, "concurrency": f.concurrency,
                        "replicas": f.replicas, "nodes": f.nodes, "env": f.env,
                        "url": f.url})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = fns
                    .iter()
                    .map(|f| {
                        vec![
                            f.name.clone(),
                            f.module[..16].to_string(),
                            human_bytes(f.memory_bytes),
                            format!("{}ms", f.timeout_ms),
                            f.concurrency.to_string(),
                            if f.url.is_empty() {
                                "public".into()
                            } else {
                                f.url.clone()
                            },
                            if f.nodes.is_empty() {
                                "-".into()
                            } else {
                                f.nodes.join(",")
                            },
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "NAME",
                            "MODULE",
                            "MEMORY",
                            "TIMEOUT",
                            "CONCURRENCY",
                            "URL",
                            "WARM ON"
                        ],
                        &rows
                    )
                );
            }
        }
        FnCmd::Schedule { name, cron } => {
            client.schedule(&name, &cron).await?;
            if cron.is_empty() {
                println!("{name} unscheduled");
            } else {
                println!("{name} runs on {cron:?}, once per tick in the mesh");
            }
        }
        FnCmd::Rm { name } => {
            client.remove_function(&name).await?;
            println!("{name} removed");
        }
        FnCmd::Logs { name } => {
            for l in client.function_logs(&name).await?.lines {
                println!("{} {} {}", l.at_ms, l.node, l.line);
            }
        }
        FnCmd::Stats { name, json } => {
            let s = client.function_stats(&name).await?;
            let v = serde_json::json!({
                "invocations": s.invocations, "errors": s.errors, "cold_starts": s.cold_starts,
                "throttled": s.throttled, "gb_seconds": s.gb_seconds,
                "p50_seconds": s.p50_seconds, "p99_seconds": s.p99_seconds});
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("invocations  {}", s.invocations);
                println!("errors       {}", s.errors);
                println!("cold starts  {}", s.cold_starts);
                println!("throttled    {}", s.throttled);
                println!("p50          <= {}ms", s.p50_seconds * 1000.0);
                println!("p99          <= {}ms", s.p99_seconds * 1000.0);
                println!("GB-seconds   {:.6}", s.gb_seconds);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn env_flags() {
        let env: BTreeMap<String, String> =
            parse_env(&["A=1".into(), "_x9=a=b".into(), "EMPTY=".into()]).unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["_x9"], "a=b");
        assert_eq!(env["EMPTY"], "");
        for bad in ["noequals", "=v", "9A=1", "A-B=1", "A B=1", "É=1"] {
            let e = parse_env::<BTreeMap<_, _>>(&[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--env"), "{bad}: {e}");
        }
    }

    #[test]
    fn label_flags() {
        let l: BTreeMap<String, String> = parse_labels(
            "--label-constraint",
            &["zone=a".into(), "k8s.io/arch=arm64".into()],
        )
        .unwrap();
        assert_eq!(l["k8s.io/arch"], "arm64");
        for bad in ["zone", "=a", "a b=c"] {
            let e = parse_labels::<BTreeMap<_, _>>("--label-constraint", &[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--label-constraint"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
