//! `caracal bench`: the governed-request benchmark over real HTTP, side by side in one run with
//! a plain nginx reverse proxy and direct calls to the same loopback upstream. The stack is a
//! child `caracal up` (embedded by default, or `--store`/`--bus` for the distributed figures)
//! with its own home; nginx is a child with a generated configuration. Closed loop (peak
//! throughput: each case at 32 and 128 connections by default, its best rate its peak), then
//! open loop at half the governed peak (latency from each
//! request's due time: no coordinated omission), CPU seconds per 1,000 requests of the serving
//! processes, RSS idle and at peak, and the audit check: every governed call's events stored,
//! and the sweep finding nothing. Results go to a JSON file and a table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::agent::{Agent, Delegation};
use crate::cli::GovernedArgs;

pub(crate) type Http = Client<HttpConnector, Full<Bytes>>;

pub(crate) const RESOURCE: &str = "resource://ledger";

/// One measured case.
#[derive(Debug, Clone, serde::Serialize)]
struct Case {
    name: String,
    /// Requests in flight at once, for a closed-loop case.
    connections: Option<usize>,
    requests: usize,
    rate: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// CPU seconds per 1,000 requests of the serving process(es), when measured.
    cpu_s_per_1000: Option<f64>,
}

fn case(name: &str, elapsed: Duration, mut latencies: Vec<Duration>, cpu: Option<f64>) -> Case {
    latencies.sort_unstable();
    let at =
        |fraction: f64| crate::bench_sts::percentile(&latencies, fraction).as_secs_f64() * 1000.0;
    Case {
        name: name.to_owned(),
        connections: None,
        requests: latencies.len(),
        rate: latencies.len() as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        p50_ms: at(0.50),
        p95_ms: at(0.95),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        cpu_s_per_1000: cpu.map(|seconds| seconds * 1000.0 / latencies.len().max(1) as f64),
    }
}

/// A child process killed when dropped, however the benchmark ends.
pub(crate) struct Owned(pub(crate) Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.0.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) `pid` and its children have used, from `/proc`.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY-free: USER_HZ is 100 on Linux for every architecture we run on.
    const TICKS: f64 = 100.0;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which may hold spaces: `) S ppid ...`.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / TICKS)
        })
        .sum()
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// `pid` and the processes whose parent it is (nginx's workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                });
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The loopback upstream: a small JSON answer to every request.
pub(crate) async fn upstream() -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new().fallback(|| async {
        (
            [(http::header::CONTENT_TYPE, "application/json")],
            r#"{"entries":[1,2,3]}"#,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("bench upstream stopped: {error}");
        }
    });
    Ok(address)
}

fn nginx_binary() -> anyhow::Result<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .context("nginx is not installed: run scripts/install-deps.sh (Debian's nginx)")
}

/// nginx as a plain reverse proxy to `upstream` on a port of its own, keep-alive both ways.
fn start_nginx(dir: &Path, upstream: SocketAddr) -> anyhow::Result<(Owned, SocketAddr)> {
    let port = free_port()?;
    for sub in ["logs", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let d = dir.display();
    let config = format!(
        "worker_processes auto;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/tmp/body;\n\
           proxy_temp_path {d}/tmp/proxy;\n\
           fastcgi_temp_path {d}/tmp/fastcgi;\n\
           uwsgi_temp_path {d}/tmp/uwsgi;\n\
           scgi_temp_path {d}/tmp/scgi;\n\
           upstream backend {{ server {upstream}; keepalive 128; }}\n\
           server {{\n\
             listen 127.0.0.1:{port};\n\
             location / {{\n\
               proxy_pass http://backend;\n\
               proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n\
             }}\n\
           }}\n\
         }}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    let child = Command::new(nginx_binary()?)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("logs/error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nginx")?;
    Ok((Owned(child), SocketAddr::from(([127, 0, 0, 1], port))))
}

/// `caracal up` with a home of its own, every port chosen by the OS and the mint budget lifted.
fn start_stack(home: &Path, args: &GovernedArgs) -> anyhow::Result<Owned> {
    let mut extra: Vec<String> = Vec::new();
    if let Some(store) = &args.store {
        extra.extend(["--store".to_owned(), store.clone()]);
    }
    if let Some(bus) = &args.bus {
        extra.extend(["--bus".to_owned(), bus.clone()]);
    }
    extra.push("up".to_owned());
    spawn_caracal(home, &extra)
}

/// This binary with `CARACAL_HOME=home`, every port chosen by the OS, the mint budget lifted,
/// warnings only, then `args`; its log goes beside the home.
pub(crate) fn spawn_caracal(home: &Path, args: &[String]) -> anyhow::Result<Owned> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CARACAL_HOME", home)
        .args(["--log", "warn", "--mint-rate-limit-per-minute", "10000000"]);
    for role in caracal_core::Role::ALL {
        command.args(["--port", &format!("{role}=0")]);
    }
    let log = std::fs::File::create(home.with_extension("log"))?;
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting caracal")?;
    Ok(Owned(child))
}

/// The roles' addresses once the run file is written and every role is ready.
pub(crate) async fn wait_ready(
    http: &Http,
    home: &Path,
    stack: &mut Owned,
) -> anyhow::Result<std::collections::BTreeMap<String, SocketAddr>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = stack.0.try_wait()? {
            bail!(
                "caracal up exited ({status}): see {}",
                home.with_extension("log").display()
            );
        }
        let roles = std::fs::read_to_string(home.join(caracal_services::RUN_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<caracal_services::RunFile>(&text).ok())
            .map(|run| {
                run.roles
                    .into_iter()
                    .map(|role| (role.role, role.address))
                    .collect::<std::collections::BTreeMap<_, _>>()
            });
        if let Some(roles) = roles {
            let mut ready = true;
            for address in roles.values() {
                ready &= matches!(get(http, *address, "/ready", &[]).await, Ok((200, _)));
            }
            if ready {
                return Ok(roles);
            }
        }
        ensure!(Instant::now() < deadline, "the stack was not ready in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send(http: &Http, request: hyper::Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)> {
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

pub(crate) async fn get(
    http: &Http,
    address: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, Bytes)> {
    let mut request = hyper::Request::get(format!("http://{address}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(http, request.body(Full::new(Bytes::new()))?).await
}

/// The admin API as the bench uses it: JSON in, JSON out, any refusal an error.
pub(crate) struct Admin<'a> {
    pub(crate) http: &'a Http,
    pub(crate) api: SocketAddr,
    pub(crate) bearer: String,
}

impl Admin<'_> {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.api))
            .header("authorization", &self.bearer)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|body| body.to_string()).unwrap_or_default(),
            )))?;
        let (status, bytes) = send(self.http, request).await?;
        ensure!(
            status < 300,
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call("POST", path, Some(body)).await
    }
}

fn id(value: &Value) -> anyhow::Result<String> {
    value
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no id in {value}"))
}

/// The zone, application (and secret), provider, resource and grants, activated and loaded.
pub(crate) async fn provision(
    admin: &Admin<'_>,
    upstream: SocketAddr,
) -> anyhow::Result<(String, String, String)> {
    let zone = id(&admin.post("/v1/zones", json!({"name": "bench"})).await?)?;
    let base = format!("/v1/zones/{zone}");
    let app = admin
        .post(
            &format!("{base}/applications"),
            json!({"name": "bench", "registration_method": "managed"}),
        )
        .await?;
    let (app_id, secret) = (
        id(&app)?,
        app.get("client_secret")
            .and_then(Value::as_str)
            .context("client_secret")?
            .to_owned(),
    );
    // The resource's credential is the `use=resource` mandate, so every governed call mints
    // one and injects it: the whole path of issue 10 (with a provider key instead, the
    // in-process re-exchange mints nothing).
    let provider = id(&admin
        .post(
            &format!("{base}/providers"),
            json!({"name": "mandate", "identifier": "provider://mandate", "kind": "caracal_mandate"}),
        )
        .await?)?;
    admin
        .post(
            &format!("{base}/resources"),
            json!({"name": "ledger", "identifier": RESOURCE, "scopes": ["ledger:read"],
                "upstream_url": format!("http://{upstream}/api"), "credential_provider_id": provider,
                "operations": [{"method": "GET", "path": "/entries", "scope": "ledger:read"}]}),
        )
        .await?;
    let document = format!(
        "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"bench\": \"{app_id}\"}}\ngrants := {{\"{RESOURCE}\": {{\"application\": \"bench\", \"roles\": {{\"{app_id}\": [\"ledger:read\"]}}}}}}\n"
    );
    let policy = admin
        .post(
            &format!("{base}/policies"),
            json!({"name": "grants", "content": document}),
        )
        .await?;
    let set = id(&admin
        .post(&format!("{base}/policy-sets"), json!({"name": "main"}))
        .await?)?;
    let sets = format!("{base}/policy-sets/{set}");
    let version = id(&admin
        .post(
            &format!("{sets}/versions"),
            json!({"manifest": [{"policy_version_id": policy.get("version_id")}]}),
        )
        .await?)?;
    admin
        .post(&format!("{sets}/activate"), json!({"version_id": version}))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = admin
            .call(
                "GET",
                &format!("{sets}/activation-status?version_id={version}"),
                None,
            )
            .await?;
        if status.get("propagation_status").and_then(Value::as_str) == Some("loaded") {
            break;
        }
        ensure!(Instant::now() < deadline, "the STS never loaded the grants");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((zone, app_id, secret))
}

/// A fresh mandate minted with `form` over the pooled client.
pub(crate) async fn mint(http: &Http, sts: SocketAddr, form: &Bytes) -> anyhow::Result<String> {
    let mint = hyper::Request::post(format!("http://{sts}/oauth/2/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(form.clone()))?;
    let (status, body) = send(http, mint).await?;
    ensure!(
        status == 200,
        "mint {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice::<Value>(&body)?
        .get("access_token")
        .and_then(Value::as_str)
        .context("access_token")?
        .to_owned())
}

/// One governed request: a fresh delegated mint at the STS, then the Gateway call with it.
async fn governed_once(
    http: &Http,
    sts: SocketAddr,
    gateway: SocketAddr,
    form: &Bytes,
) -> anyhow::Result<()> {
    let bearer = format!("Bearer {}", mint(http, sts, form).await?);
    let (status, body) = get(
        http,
        gateway,
        "/entries",
        &[("authorization", &bearer), ("x-caracal-resource", RESOURCE)],
    )
    .await?;
    ensure!(
        status == 200,
        "gateway {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

async fn direct_once(http: &Http, address: SocketAddr) -> anyhow::Result<()> {
    let (status, _) = get(http, address, "/entries", &[]).await?;
    ensure!(status == 200, "status {status}");
    Ok(())
}

/// `count` calls of `one`, `connections` at a time; latencies of each.
async fn closed_loop<F, Fut>(
    count: usize,
    connections: usize,
    progress: &indicatif::ProgressBar,
    one: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (one, next, progress) = (one.clone(), Arc::clone(&next), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let at = Instant::now();
                one().await?;
                latencies.push(at.elapsed());
                progress.inc(1);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok((started.elapsed(), latencies))
}

/// `count` calls of `one` scheduled at `rate` from a thread of their own; each latency runs
/// from when the call was due, so a slow answer delays nothing it should not.
async fn open_loop<F, Fut>(
    count: usize,
    rate: f64,
    progress: &indicatif::ProgressBar,
    one: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let runtime = tokio::runtime::Handle::current();
    let started = Instant::now();
    let progress = progress.clone();
    let scheduler = std::thread::spawn(move || {
        let mut tasks = Vec::with_capacity(count);
        for n in 0..count {
            let due = started + interval.mul_f64(n as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (one, progress) = (one.clone(), progress.clone());
            tasks.push(runtime.spawn(async move {
                one().await?;
                progress.inc(1);
                anyhow::Ok(due.elapsed())
            }));
        }
        tasks
    });
    let tasks = tokio::task::spawn_blocking(move || scheduler.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the request scheduler panicked"))?;
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok((started.elapsed(), latencies))
}

/// The sum of a metric's samples on a role's `/metrics`.
async fn metric(http: &Http, address: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let (_, body) = get(http, address, "/metrics", &[]).await?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series.split('{').next() == Some(name)).then(|| value.parse::<f64>().ok())?
        })
        .sum())
}

/// Waits until the Audit role's ingested count reaches `target`, or else stops moving: for a
/// second when there is no target, and for longer than the audit reclaim window (30 s) when
/// the target is not reached yet, so an event left pending by a failed store write and
/// delivered again is still counted.
async fn settled_ingested(
    http: &Http,
    audit: SocketAddr,
    target: Option<f64>,
) -> anyhow::Result<f64> {
    let still_enough = if target.is_some() {
        Duration::from_secs(40)
    } else {
        Duration::from_secs(1)
    };
    let mut last = metric(http, audit, "caracal_audit_ingested_total").await?;
    let mut still_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if target.is_some_and(|target| (last - target).abs() < 0.5) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = metric(http, audit, "caracal_audit_ingested_total").await?;
        if (now - last).abs() > f64::EPSILON {
            (last, still_since) = (now, Instant::now());
        } else if still_since.elapsed() >= still_enough {
            return Ok(now);
        }
        ensure!(Instant::now() < deadline, "audit ingestion never settled");
    }
}

pub async fn run(args: &GovernedArgs) -> anyhow::Result<()> {
    let requests = if args.quick { 300 } else { args.requests };
    let open_seconds = if args.quick { 3.0 } else { args.open_seconds };
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let scratch = tempfile::tempdir()?;
    let home = scratch.path().join("home");
    let disk_idle = crate::bench_disk::idle(scratch.path(), if args.quick { 100 } else { 1000 })
        .context("measuring fdatasync")?;
    let upstream = upstream().await?;
    let (nginx, nginx_address) = start_nginx(&scratch.path().join("nginx"), upstream)?;
    let mut stack = start_stack(&home, args)?;
    let roles = wait_ready(&http, &home, &mut stack).await?;
    let role = |name: &str| {
        roles
            .get(name)
            .copied()
            .with_context(|| format!("no {name} role in the run file"))
    };
    let (api, sts, coordinator, gateway, audit) = (
        role("api")?,
        role("sts")?,
        role("coordinator")?,
        role("gateway")?,
        role("audit")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        get(&http, nginx_address, "/entries", &[]).await,
        Ok((200, _))
    ) {
        ensure!(Instant::now() < deadline, "nginx did not answer in 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(home.join(caracal_store::ADMIN_TOKEN_FILE))?;
    let admin = Admin {
        http: &http,
        api,
        bearer: format!("Bearer {}", token.trim()),
    };
    let (zone, app, secret) = provision(&admin, upstream).await?;
    let agent = Agent {
        sts,
        coordinator,
        zone: &zone,
        app: &app,
        secret: &secret,
        resource: RESOURCE,
    };
    let delegation: Delegation = agent.delegate("ledger:read", "caracal bench").await?;
    let form = Bytes::from(agent.delegated_form(&delegation));
    let stack_pid = stack.0.id();
    let nginx_pids = with_children(nginx.0.id());
    let idle_rss = memory_kib(stack_pid, "VmRSS");

    // Warm every path (connections, caches), then count what one governed call records.
    for _ in 0..50 {
        direct_once(&http, upstream).await?;
        direct_once(&http, nginx_address).await?;
        governed_once(&http, sts, gateway, &form).await?;
    }
    let before = settled_ingested(&http, audit, None).await?;
    governed_once(&http, sts, gateway, &form).await?;
    let per_call = settled_ingested(&http, audit, None).await? - before;
    ensure!(per_call >= 1.0, "a governed call recorded no audit event");

    let connections = &args.connections;
    let closed_runs = (requests * 3 * connections.len()) as u64;
    let total = closed_runs + (requests as f64 / 2.0) as u64;
    let progress = indicatif::ProgressBar::new(total);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg:<22} [{bar:40}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut cases = Vec::new();
    for &n in connections {
        progress.set_message(format!("direct upstream ×{n}"));
        let direct_http = http.clone();
        let (elapsed, latencies) = closed_loop(requests, n, &progress, move || {
            let http = direct_http.clone();
            async move { direct_once(&http, upstream).await }
        })
        .await?;
        cases.push(Case {
            connections: Some(n),
            ..case("direct upstream", elapsed, latencies, None)
        });
    }
    for &n in connections {
        progress.set_message(format!("through nginx ×{n}"));
        let cpu = cpu_seconds(&nginx_pids);
        let nginx_http = http.clone();
        let (elapsed, latencies) = closed_loop(requests, n, &progress, move || {
            let http = nginx_http.clone();
            async move { direct_once(&http, nginx_address).await }
        })
        .await?;
        let nginx_cpu = cpu_seconds(&nginx_pids) - cpu;
        cases.push(Case {
            connections: Some(n),
            ..case("through nginx", elapsed, latencies, Some(nginx_cpu))
        });
    }
    let governed = {
        let (http, form) = (http.clone(), form.clone());
        move || {
            let (http, form) = (http.clone(), form.clone());
            async move { governed_once(&http, sts, gateway, &form).await }
        }
    };
    for &n in connections {
        progress.set_message(format!("governed ×{n}"));
        let cpu = cpu_seconds(&[stack_pid]);
        let (elapsed, latencies) = closed_loop(requests, n, &progress, governed.clone()).await?;
        let governed_cpu = cpu_seconds(&[stack_pid]) - cpu;
        cases.push(Case {
            connections: Some(n),
            ..case(
                "governed, closed loop",
                elapsed,
                latencies,
                Some(governed_cpu),
            )
        });
    }
    // Each case's peak: its best rate over the connection counts.
    let peak = |cases: &[Case], name: &str| {
        cases
            .iter()
            .filter(|case| case.name == name)
            .map(|case| case.rate)
            .fold(0.0, f64::max)
    };
    let governed_peak = peak(&cases, "governed, closed loop");
    let (open_rate, open_name) = match args.open_rate {
        Some(rate) => (rate, format!("governed, open loop {rate}/s")),
        None => (governed_peak / 2.0, "governed, open loop ½ peak".to_owned()),
    };

    progress.set_message("governed, open loop");
    let open_count = ((open_rate * open_seconds) as usize).max(1);
    progress.set_length(total - (requests as f64 / 2.0) as u64 + open_count as u64);
    let cpu = cpu_seconds(&[stack_pid]);
    let disk_probe = crate::bench_disk::start(&home);
    let (elapsed, latencies) = open_loop(open_count, open_rate, &progress, governed).await?;
    let open_cpu = cpu_seconds(&[stack_pid]) - cpu;
    let disk_loaded = disk_probe.finish().context("measuring fdatasync")?;
    let mut open = case(&open_name, elapsed, latencies, Some(open_cpu));
    open.rate = open_rate;
    cases.push(open);
    progress.finish_and_clear();
    let peak_rss = memory_kib(stack_pid, "VmHWM");

    // Audit lossless: every governed call's events stored, none dead-lettered, and a sweep
    // after the load finding nothing.
    let governed_calls = (requests * connections.len() + open_count) as f64;
    let expected = per_call * governed_calls;
    let after = settled_ingested(&http, audit, Some(before + per_call + expected)).await?;
    let stored = after - before - per_call;
    let dead = metric(&http, audit, "caracal_audit_ingest_dead_lettered_total").await?;
    let swept_from = caracal_store::now_ms() / 1000;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&http, audit, "caracal_audit_tamper_last_sweep_unix").await? <= swept_from as f64 {
        ensure!(
            Instant::now() < deadline,
            "no audit sweep ran within 60 s of the load"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let findings = metric(&http, audit, "caracal_audit_tamper_detected_total").await?;
    let lossless = (stored - expected).abs() < 0.5 && dead == 0.0 && findings == 0.0;

    let (nginx_peak, direct_peak) = (
        peak(&cases, "through nginx"),
        peak(&cases, "direct upstream"),
    );
    let results = json!({
        "machine": {"cores": std::thread::available_parallelism().map(usize::from).unwrap_or(0)},
        "store": args.store.as_deref().unwrap_or("embedded"),
        "bus": args.bus.as_deref().unwrap_or("embedded"),
        "connections": connections,
        "cases": cases,
        "peaks": {
            "direct": direct_peak,
            "nginx": nginx_peak,
            "governed": governed_peak,
        },
        "ratios": {
            "governed_over_nginx": governed_peak / nginx_peak.max(f64::EPSILON),
            "governed_over_direct": governed_peak / direct_peak.max(f64::EPSILON),
        },
        "memory_kib": {"idle_rss": idle_rss, "peak_rss": peak_rss},
        "fdatasync": {"idle": disk_idle, "open_loop": disk_loaded},
        "audit": {
            "events_per_governed_call": per_call,
            "governed_calls": governed_calls,
            "expected": expected,
            "stored": stored,
            "dead_lettered": dead,
            "tamper_findings": findings,
            "lossless": lossless,
        },
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", args.out.display()))?;

    println!(
        "{:<28} {:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>14}",
        "case", "conns", "req/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "CPU s/1k req"
    );
    for case in &cases {
        println!(
            "{:<28} {:>6} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>14}",
            case.name,
            case.connections
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            case.rate,
            case.p50_ms,
            case.p95_ms,
            case.p99_ms,
            case.p999_ms,
            case.cpu_s_per_1000
                .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.3}"))
        );
    }
    println!(
        "peaks (best over the connection counts): governed {governed_peak:.0}, nginx {nginx_peak:.0}, direct {direct_peak:.0} req/s"
    );
    println!(
        "governed / nginx {:.3}x   governed / direct {:.3}x   RSS idle {} MiB, peak {} MiB",
        governed_peak / nginx_peak.max(f64::EPSILON),
        governed_peak / direct_peak.max(f64::EPSILON),
        idle_rss.map_or(0, |kib| kib / 1024),
        peak_rss.map_or(0, |kib| kib / 1024),
    );
    println!(
        "disk fdatasync (under every durable commit): idle {disk_idle}; during the open loop {disk_loaded}"
    );
    println!(
        "audit: {stored} of {expected} events stored ({per_call} per governed call), {dead} dead-lettered, {findings} tamper findings: {}",
        if lossless {
            "lossless"
        } else {
            "LOST OR EXTRA EVENTS"
        }
    );
    println!("results: {}", args.out.display());
    drop((stack, nginx));
    if !lossless {
        // The stack's log goes with the scratch directory: keep it for the diagnosis.
        let log = args.out.with_extension("stack.log");
        let _ = std::fs::copy(home.with_extension("log"), &log);
        bail!(
            "the audit check failed: see {} and {}",
            args.out.display(),
            log.display()
        );
    }
    Ok(())
}
