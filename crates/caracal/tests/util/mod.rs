//! Helpers for tests that run the real `caracal` binary: a fresh `CARACAL_HOME` per test, every
//! port chosen by the OS, and a plain HTTP/1.1 client so the tests share no code with the server.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const ROLES: [&str; 6] = ["api", "console", "coordinator", "sts", "gateway", "audit"];

/// A command for the built binary with a clean environment: no `CARACAL_*` or `RUST_LOG` from
/// the developer's shell leaks into a test.
pub fn caracal(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_caracal"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.parent().unwrap_or(home))
        .env("CARACAL_HOME", home)
        .stdin(Stdio::null());
    command
}

/// `--port ROLE=0` for every role.
pub fn free_ports() -> Vec<String> {
    ROLES
        .iter()
        .flat_map(|role| ["--port".to_owned(), format!("{role}=0")])
        .collect()
}

/// A fresh `caracal up` in `home` on free ports, its API role ready, and the bootstrap admin
/// token (trimmed).
pub fn up(home: &Path) -> (Running, String) {
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(home, &args);
    let ready = wait_ready(running.address("api"));
    assert_eq!(ready.status, 200, "{}", ready.body);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    (running, token.trim().to_owned())
}

/// A temporary parent directory and a `home` path inside it that does not exist yet.
pub fn fresh_home() -> (tempfile::TempDir, PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    let home = parent.path().join("home");
    (parent, home)
}

pub struct Running {
    pub child: Child,
    pub home: PathBuf,
    pub addresses: BTreeMap<String, SocketAddr>,
}

impl Running {
    /// Spawns `caracal <args>` and waits until it has written its run file.
    pub fn start(home: &Path, args: &[String]) -> Running {
        let child = caracal(home)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut running = Running {
            child,
            home: home.to_owned(),
            addresses: BTreeMap::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = running.child.try_wait().unwrap() {
                let output = running.child.wait_with_output_ref();
                panic!("caracal exited early with {status}: {output}");
            }
            if let Ok(text) = std::fs::read_to_string(home.join("run.json"))
                && let Ok(run) = serde_json::from_str::<serde_json::Value>(&text)
            {
                for entry in run["roles"].as_array().unwrap() {
                    running.addresses.insert(
                        entry["role"].as_str().unwrap().to_owned(),
                        entry["address"].as_str().unwrap().parse().unwrap(),
                    );
                }
                return running;
            }
            assert!(
                Instant::now() < deadline,
                "caracal did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn address(&self, role: &str) -> SocketAddr {
        self.addresses[role]
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit; returns the status and the output.
    pub fn terminate(mut self) -> (ExitStatus, String, String) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("caracal did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut stdout = String::new();
        let mut stderr = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (self.child.wait().unwrap(), stdout, stderr)
    }

    /// Runs `crates/caracal/tests/interop/<script>` with the published SDK against this stack,
    /// then stops the stack; both must succeed. Returns what the script printed (one JSON
    /// object).
    pub fn run_sdk_client(self, script: &str, env: &[(&str, String)]) -> serde_json::Value {
        let output = Command::new(sdk_python())
            .arg(
                repo_root()
                    .join("crates/caracal/tests/interop")
                    .join(script),
            )
            .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
            .output()
            .expect("python runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let (exit, _, server_log) = self.terminate();
        assert!(
            output.status.success(),
            "{script} failed:\n{stderr}\nserver:\n{server_log}"
        );
        assert!(exit.success(), "{server_log}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

trait ChildExt {
    fn wait_with_output_ref(&mut self) -> String;
}

impl ChildExt for Child {
    fn wait_with_output_ref(&mut self) -> String {
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.stdout.take() {
            let _ = pipe.read_to_string(&mut stdout);
        }
        if let Some(mut pipe) = self.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        format!("stdout: {stdout}\nstderr: {stderr}")
    }
}

pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// The body as sent (a download need not be UTF-8).
    pub bytes: Vec<u8>,
}

/// `GET path` over a fresh connection with `Connection: close`.
pub fn get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(address, "GET", path, headers, "")
}

/// `METHOD path` with `body` over a fresh connection with `Connection: close`.
pub fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        // JSON unless the caller says otherwise.
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let bytes = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}

/// Polls `GET /ready` until it answers 200 (at most 20 s).
pub fn wait_ready(address: SocketAddr) -> Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = get(address, "/ready", &[]);
        if response.status == 200 || Instant::now() > deadline {
            return response;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(command: &mut Command) -> Output {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Checks Prometheus/OpenMetrics text: every sample line is `name{labels} value` with a name
/// under one of `prefixes`, every sample's family has a `# TYPE`, and the exposition ends with
/// `# EOF`.
pub fn check_metrics(text: &str, prefixes: &[&str]) {
    let mut typed = Vec::new();
    let mut samples = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok(), "value of {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            prefixes.iter().any(|prefix| name.starts_with(prefix)),
            "{name} lacks a prefix of {prefixes:?}"
        );
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "labels of {line}"
            );
        }
        assert!(
            typed.iter().any(|family| name.starts_with(family.as_str())),
            "untyped {name}"
        );
        samples += 1;
    }
    assert!(samples > 0, "no samples in\n{text}");
    assert_eq!(text.lines().last(), Some("# EOF"));
}

/// The repository's root, for scripts and interop clients.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv with the published SDKs, installed on first use by `scripts/sdk-venv.sh`. Failing
/// to install fails the test: interop is not optional.
pub fn sdk_python() -> PathBuf {
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/sdk-venv.sh"))
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "installing the published SDK failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    PathBuf::from(stdout.lines().last().expect("the venv path")).join("bin/python")
}

/// A loopback TCP relay to a backend that a drill cuts and restores, like a network partition
/// between one process and its Redis, PostgreSQL or STS.
pub struct Relay {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay {
            port,
            open: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            live: std::sync::Arc::default(),
        };
        let (open, live) = (relay.open.clone(), relay.live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let server = if open.load(Ordering::SeqCst) {
                    TcpStream::connect(target).ok()
                } else {
                    None
                };
                let Some(server) = server else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let mut tracked = live.lock().unwrap();
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
                tracked.extend([client, server]);
            }
        });
        relay
    }

    /// Drops every open connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for stream in self.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether the tests that need PostgreSQL and Redis run: always under `CI=true`; outside CI
/// `CARACAL_TEST_SKIP_EXTERNAL=1` skips them, loudly.
pub fn external_backends() -> bool {
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let opted_out = std::env::var("CARACAL_TEST_SKIP_EXTERNAL").is_ok_and(|value| value == "1");
    assert!(
        !(in_ci && opted_out),
        "CARACAL_TEST_SKIP_EXTERNAL is refused when CI=true"
    );
    if opted_out {
        eprintln!("SKIPPED: needs PostgreSQL and Redis (CARACAL_TEST_SKIP_EXTERNAL=1)");
    }
    !opted_out
}

/// A PostgreSQL schema of its own for one test, dropped when the test ends, however it ends.
pub struct Schema(pub String);

impl Schema {
    pub fn fresh() -> Schema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Schema(format!("test_it_{}_{nanos}", std::process::id()))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc"])
            .arg(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0))
            .output();
    }
}

pub fn json_of(response: &Response) -> serde_json::Value {
    serde_json::from_str(&response.body).unwrap_or(serde_json::Value::Null)
}

/// A zone provisioned through the API for a drill: an application (`billing`, with its
/// secret), a `none` provider, resources with a `GET /entries` operation, and a policy set.
pub struct Provisioned {
    pub api: std::net::SocketAddr,
    pub bearer: String,
    pub id: String,
    pub app_id: String,
    pub secret: String,
    pub sets: String,
}

impl Provisioned {
    pub fn new(
        home: &std::path::Path,
        api: std::net::SocketAddr,
        resources: &[&str],
    ) -> Provisioned {
        let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
        let mut zone = Provisioned {
            api,
            bearer: format!("Bearer {}", token.trim()),
            id: String::new(),
            app_id: String::new(),
            secret: String::new(),
            sets: String::new(),
        };
        zone.id = zone.post("/v1/zones", serde_json::json!({"name": "drill"}))["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let base = format!("/v1/zones/{}", zone.id);
        let app = zone.post(
            &format!("{base}/applications"),
            serde_json::json!({"name": "billing", "registration_method": "managed"}),
        );
        zone.app_id = app["id"].as_str().unwrap().to_owned();
        zone.secret = app["client_secret"].as_str().unwrap().to_owned();
        let provider = zone.post(
            &format!("{base}/providers"),
            serde_json::json!({"name": "none", "identifier": "provider://none", "kind": "none"}),
        );
        for (n, identifier) in resources.iter().enumerate() {
            zone.post(
                &format!("{base}/resources"),
                serde_json::json!({"name": format!("r{n}"), "identifier": identifier, "scopes": ["read"],
                    "upstream_url": "http://127.0.0.1:9/api", "credential_provider_id": provider["id"],
                    "operations": [{"method": "GET", "path": "/entries", "scope": "read"}]}),
            );
        }
        let set = zone.post(
            &format!("{base}/policy-sets"),
            serde_json::json!({"name": "main"}),
        );
        zone.sets = format!("{base}/policy-sets/{}", set["id"].as_str().unwrap());
        zone
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let auth = [("authorization", self.bearer.as_str())];
        let response = request(self.api, "POST", path, &auth, &body.to_string());
        assert!(
            response.status < 300,
            "{path}: {} {}",
            response.status,
            response.body
        );
        json_of(&response)
    }

    /// A new version of the set granting the application `resources` (with a unique policy
    /// name per `n`), activated and loaded by the STS; returns the version id.
    pub fn policy_set(&self, grants: &[(u32, &str)]) -> String {
        let n = grants.first().map_or(0, |(n, _)| *n);
        let app = &self.app_id;
        let grants: Vec<String> = grants
            .iter()
            .map(|(_, resource)| {
                format!(
                    "\"{resource}\": {{\"application\": \"billing\", \"roles\": {{\"{app}\": [\"read\"]}}}}"
                )
            })
            .collect();
        let document = format!(
            "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"billing\": \"{app}\"}}\ngrants := {{{}}}\n",
            grants.join(", ")
        );
        let policy = self.post(
            &format!("/v1/zones/{}/policies", self.id),
            serde_json::json!({"name": format!("grants-{n}"), "content": document}),
        );
        let version = self.post(
            &format!("{}/versions", self.sets),
            serde_json::json!({"manifest": [{"policy_version_id": policy["version_id"]}]}),
        );
        let version_id = version["id"].as_str().unwrap().to_owned();
        self.post(
            &format!("{}/activate", self.sets),
            serde_json::json!({"version_id": version_id}),
        );
        self.wait_loaded(&version_id);
        version_id
    }

    /// The document granting `read` on `resource://ledger`, gated by a human for the high tier.
    pub fn gated_document(&self) -> String {
        let app = &self.app_id;
        format!(
            "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {{\"billing\": \"{app}\"}}\ngrants := {{\"resource://ledger\": {{\"application\": \"billing\", \"roles\": {{\"{app}\": [\"read\"]}}}}}}\nrisk := [{{\"scope\": \"read\", \"tier\": \"high\"}}]\napproval_tiers := [{{\"tier\": \"high\", \"approver\": \"operator\", \"ttl_seconds\": 600}}]\n"
        )
    }

    /// `document` as a new policy and set version, activated and loaded; the version id.
    pub fn activate_document(&self, name: &str, document: &str) -> String {
        let policy = self.post(
            &format!("/v1/zones/{}/policies", self.id),
            serde_json::json!({"name": name, "content": document}),
        );
        let version = self.post(
            &format!("{}/versions", self.sets),
            serde_json::json!({"manifest": [{"policy_version_id": policy["version_id"]}]}),
        );
        let version_id = version["id"].as_str().unwrap().to_owned();
        self.post(
            &format!("{}/activate", self.sets),
            serde_json::json!({"version_id": version_id}),
        );
        self.wait_loaded(&version_id);
        version_id
    }

    pub fn wait_loaded(&self, version_id: &str) {
        let auth = [("authorization", self.bearer.as_str())];
        let deadline = Instant::now() + Duration::from_secs(20);
        while json_of(&get(
            self.api,
            &format!("{}/activation-status?version_id={version_id}", self.sets),
            &auth,
        ))["propagation_status"]
            != "loaded"
        {
            assert!(
                Instant::now() < deadline,
                "the STS never loaded {version_id}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The mandate form of `zone`'s application with `extra` fields (already encoded).
pub fn exchange_form(zone: &Provisioned, extra: &str) -> String {
    format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&zone_id={}&application_id={}&client_secret={}&resource=resource%3A%2F%2Fledger{extra}",
        zone.id, zone.app_id, zone.secret
    )
}

pub fn exchange(sts: SocketAddr, form: &str) -> Response {
    request(
        sts,
        "POST",
        "/oauth/2/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        form,
    )
}

/// As an agent: a lifecycle mandate, a root session, a child session under it and a
/// delegation from root to child for `scope`; returns (root, child, edge).
pub fn delegation(
    zone: &Provisioned,
    sts: SocketAddr,
    coordinator: SocketAddr,
    scope: &str,
) -> (String, String) {
    let (root, child, _) = delegation_with_edge(zone, sts, coordinator, scope);
    (root, child)
}

pub fn delegation_with_edge(
    zone: &Provisioned,
    sts: SocketAddr,
    coordinator: SocketAddr,
    scope: &str,
) -> (String, String, String) {
    let minted = exchange(sts, &exchange_form(zone, "&scope=agent%3Alifecycle"));
    assert_eq!(minted.status, 200, "{}", minted.body);
    let lifecycle = format!(
        "Bearer {}",
        json_of(&minted)["access_token"].as_str().unwrap()
    );
    let start = |parent: Option<&str>| {
        let started = request(
            coordinator,
            "POST",
            &format!("/zones/{}/agents", zone.id),
            &[("authorization", lifecycle.as_str())],
            &serde_json::json!({"application_id": zone.app_id, "labels": [zone.app_id], "parent_id": parent})
                .to_string(),
        );
        assert_eq!(started.status, 201, "{}", started.body);
        json_of(&started)["agent_session_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let root = start(None);
    let child = start(Some(&root));
    let edge = request(
        coordinator,
        "POST",
        &format!("/zones/{}/delegations", zone.id),
        &[("authorization", lifecycle.as_str())],
        &serde_json::json!({"issuer_application_id": zone.app_id, "source_session_id": root,
            "target_session_id": child, "receiver_application_id": zone.app_id,
            "scopes": [scope], "resource_id": "resource://ledger", "ttl_seconds": 600})
        .to_string(),
    );
    assert!(edge.status < 300, "{}", edge.body);
    let edge = json_of(&edge)["id"].as_str().unwrap().to_owned();
    (root, child, edge)
}

/// `name=value` of a `set-cookie` answer.
pub fn cookie_of(response: &Response) -> String {
    response.headers["set-cookie"]
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

pub fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_owned()
}

pub fn form(address: SocketAddr, path: &str, cookie: &str, body: &str) -> Response {
    request(
        address,
        "POST",
        path,
        &[
            ("cookie", cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        body,
    )
}

/// Signs in with `token`; the session cookie.
pub fn sign_in(console: SocketAddr, token: &str) -> String {
    let page = request(console, "GET", "/sign-in", &[], "");
    assert_eq!(page.status, 200);
    let pre = cookie_of(&page);
    let body = format!("token={}&csrf={}", token.trim(), csrf_of(&page.body));
    let signed = form(console, "/sign-in", &pre, &body);
    assert_eq!(signed.status, 303, "{}", signed.body);
    assert_eq!(signed.headers["location"], "/overview");
    let cookie = signed.headers["set-cookie"].clone();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    cookie_of(&signed)
}
