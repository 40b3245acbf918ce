//! `raftwasm bench`: drives a running cluster over HTTP with N concurrent
//! connections for a fixed time and prints ops/s and latency percentiles.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::client::Client;

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  raftwasm bench --cluster=127.0.0.1:6000 --connections=64 --seconds=5
  raftwasm bench --cluster=127.0.0.1:6000 --swap-guest=my_guest.wasm")]
pub struct BenchConfig {
    /// HTTP address of the leader (writes) and of the node to read from.
    #[arg(long, default_value = "127.0.0.1:6000")]
    pub cluster: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds to run each workload.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Workloads to run: set, get-linearizable, get-lease, get-stale.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "set,get-linearizable,get-lease,get-stale"
    )]
    pub workloads: Vec<String>,
    /// Distinct keys written and read.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Also measure a hot swap to this guest (deployed with force, so it may
    /// be the active guest again): the time until every member runs it, and
    /// set throughput during the swap next to the set row above.
    #[arg(long)]
    pub swap_guest: Option<std::path::PathBuf>,
    /// The cluster token, for the swap.
    #[arg(long, env = "RAFTWASM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA bundle (PEM) of a TLS cluster: talk HTTPS, trusting only it.
    #[arg(long, env = "RAFTWASM_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Runs every workload and prints one table row each.
///
/// # Errors
/// When the cluster cannot be reached or a workload name is unknown.
pub async fn run(config: BenchConfig) -> anyhow::Result<()> {
    let client = crate::tls::http_client_builder(config.tls_ca.as_deref())?
        .pool_max_idle_per_host(config.connections)
        .build()?;
    let tls = config.tls_ca.is_some();
    let base = crate::proto::base_url(&config.cluster, tls);
    let value = "v".repeat(100);
    println!(
        "{} connections, {} s per workload, 16-byte keys, 100-byte values, against {base}",
        config.connections, config.seconds
    );
    println!(
        "{:<18} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "workload", "ops/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for workload in &config.workloads {
        let path = match workload.as_str() {
            "set" => format!("set?value={value}&key="),
            "get-linearizable" => "get?consistency=linearizable&key=".to_owned(),
            "get-lease" => "get?consistency=lease&key=".to_owned(),
            "get-stale" => "get?consistency=stale&key=".to_owned(),
            other => anyhow::bail!("unknown workload `{other}`"),
        };
        workload_row(&client, &base, workload, &path, &config).await?;
    }
    if let Some(guest) = &config.swap_guest {
        let module =
            std::fs::read(guest).with_context(|| format!("cannot read {}", guest.display()))?;
        let swap_client = Client::new(
            std::slice::from_ref(&config.cluster),
            config.token.clone(),
            config.tls_ca.as_deref(),
            Duration::from_secs(30),
        )?;
        let swap = tokio::spawn(swap(swap_client, module, config.seconds));
        let path = format!("set?value={value}&key=");
        workload_row(&client, &base, "set during swap", &path, &config).await?;
        let (upload, everywhere) = swap.await.context("the swap task failed")??;
        println!(
            "swap: leader answered after {upload:.1} ms; every member ran the new guest after {everywhere:.1} ms"
        );
    }
    Ok(())
}

/// Deploys `module` halfway through the workload; returns the milliseconds
/// until the leader answered and until every member reported the guest.
async fn swap(client: Client, module: Vec<u8>, seconds: u64) -> anyhow::Result<(f64, f64)> {
    tokio::time::sleep(Duration::from_millis(seconds * 500)).await;
    let started = Instant::now();
    let record = client
        .deploy(&module, true)
        .await
        .context("the swap was refused")?;
    let upload = started.elapsed().as_secs_f64() * 1e3;
    let mut behind = Vec::new();
    client
        .wait_for_guest(&record, Duration::from_secs(30), |member, running| {
            if !running {
                behind.push(member.to_owned());
            }
        })
        .await?;
    anyhow::ensure!(behind.is_empty(), "{behind:?} never ran the new guest");
    Ok((upload, started.elapsed().as_secs_f64() * 1e3))
}

/// Runs one workload for `config.seconds` and prints its row.
async fn workload_row(
    client: &reqwest::Client,
    base: &str,
    workload: &str,
    path: &str,
    config: &BenchConfig,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(config.seconds);
    let tasks: Vec<_> = (0..config.connections)
        .map(|worker| {
            let client = client.clone();
            let url = format!("{base}/{path}");
            let keys = config.keys;
            tokio::spawn(async move {
                let mut latencies = latency_histogram();
                let mut errors = 0u64;
                let mut n = worker;
                while Instant::now() < deadline {
                    let key = format!("bench-key-{:06}", n % keys);
                    n += 7919;
                    let start = Instant::now();
                    let ok = match client.get(format!("{url}{key}")).send().await {
                        Ok(r) => {
                            r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND
                        }
                        Err(_) => false,
                    };
                    if ok {
                        latencies.saturating_record(start.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let started = Instant::now();
    let mut latencies = latency_histogram();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.context("a bench worker failed")?;
        latencies
            .add(&l)
            .context("merging the workers' latency histograms")?;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |micros: u64| micros as f64 / 1e3;
    println!(
        "{workload:<18} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {errors:>8}",
        latencies.len() as f64 / elapsed,
        ms(latencies.value_at_quantile(0.50)),
        ms(latencies.value_at_quantile(0.99)),
        ms(latencies.max()),
    );
    Ok(())
}

/// A latency histogram in microseconds, from 1 µs to 10 minutes with three
/// significant digits: fixed memory however long the run, unlike keeping
/// every sample. Longer latencies are counted at the top.
fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
        .expect("constant histogram bounds are valid")
}
