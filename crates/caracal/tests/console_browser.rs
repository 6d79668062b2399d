//! The console in a real browser: headless Chromium driven through chromedriver (W3C WebDriver,
//! Debian's `chromium` and `chromium-driver`, installed by the project's script) against a
//! running `caracal up`. Signs in with the admin token, visits every screen, sees a hostile zone
//! name rendered as text, creates a zone through the form, and saves a screenshot of each
//! screen under `target/console-screenshots/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use util::{Running, free_ports, fresh_home, repo_root, request, wait_ready};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver command: the answer's status and JSON, read by its length (chromedriver keeps
/// connections open).
fn wire(address: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut bytes = vec![0; length];
    reader.read_exact(&mut bytes).unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

struct Driver {
    child: Child,
    address: SocketAddr,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = wire(
            self.address,
            "DELETE",
            &format!("/session/{}", self.session),
            "",
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(profile: &std::path::Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs");
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(address).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let (status, created) = wire(address, "POST", "/session", &capabilities.to_string());
        assert_eq!(status, 200, "{created}");
        let session = created["value"]["sessionId"].as_str().unwrap().to_owned();
        Driver {
            child,
            address,
            session,
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let path = format!("/session/{}{path}", self.session);
        let (status, answer) = wire(self.address, method, &path, &body);
        assert_eq!(status, 200, "{method} {path}: {answer}");
        answer["value"].clone()
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    fn find(&self, css: &str) -> String {
        let found = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    /// The element's text once the page holding it has settled (a click may still be
    /// navigating: a stale or missing element is looked up again).
    fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let path = format!("/session/{}/element", self.session);
            let query = json!({"using": "css selector", "value": css}).to_string();
            let (status, found) = wire(self.address, "POST", &path, &query);
            if status == 200
                && let Some(element) = found["value"][ELEMENT].as_str()
            {
                let path = format!("/session/{}/element/{element}/text", self.session);
                let (status, text) = wire(self.address, "GET", &path, "");
                if status == 200 {
                    return text["value"].as_str().unwrap().to_owned();
                }
            }
            assert!(Instant::now() < deadline, "no `{css}`: {found}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        );
    }

    fn click(&self, css: &str) {
        let element = self.find(css);
        self.call("POST", &format!("/element/{element}/click"), json!({}));
    }

    /// Waits (10 s at most) until the element's text contains `needle`: a submitted form may
    /// still be loading its answer.
    fn wait_text(&self, css: &str, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.text(css);
            if text.contains(needle) {
                return;
            }
            assert!(Instant::now() < deadline, "no `{needle}` in: {text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (10 s at most) until the page's URL ends with `suffix` — a click may still be
    /// navigating.
    fn wait_url(&self, suffix: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.url().ends_with(suffix) {
            assert!(Instant::now() < deadline, "not at {suffix}: {}", self.url());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        self.call("GET", "/url", Value::Null)
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn screenshot(&self, name: &str) {
        let png = self.call("GET", "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let dir = repo_root().join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }
}

#[test]
fn an_operator_signs_in_and_sees_every_screen_in_chromium() {
    let installed = Command::new("bash")
        .arg(repo_root().join("scripts/install-deps.sh"))
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "installing chromium failed:\n{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let (parent, home) = fresh_home();
    let (running, token) = util::up(&home);
    let (api, console) = (running.address("api"), running.address("console"));
    let bearer = format!("Bearer {}", token.trim());
    let hostile = "<script>alert(1)</script> \"quoted\"";
    let zone = request(
        api,
        "POST",
        "/v1/zones",
        &[("authorization", bearer.as_str())],
        &json!({ "name": hostile }).to_string(),
    );
    assert_eq!(zone.status, 201, "{}", zone.body);

    let profile = parent.path().join("chromium-profile");
    let driver = Driver::start(&profile);
    let base = format!("http://{console}");
    driver.go(&format!("{base}/"));
    assert!(driver.url().ends_with("/sign-in"), "{}", driver.url());
    driver.screenshot("sign-in");
    driver.type_into("input[name=token]", token.trim());
    driver.click("button");
    driver.wait_url("/overview");
    assert_eq!(driver.text("h1"), "Overview");
    assert!(driver.text("main").contains("Nothing contained."));
    driver.screenshot("overview");

    driver.go(&format!("{base}/zones"));
    assert_eq!(driver.text("td.zone-name"), hostile, "rendered as text");
    driver.type_into("input[name=name]", "from the browser");
    driver.click("form.card button");
    driver.wait_text("main", "Zone from the browser created.");
    driver.screenshot("zones");

    driver.click("td.zone-name a");
    driver.wait_text("h1", "Zone ");
    assert!(
        driver.text("h1").starts_with("Zone "),
        "{}",
        driver.text("h1")
    );
    driver.screenshot("zone");
    driver.click("main p a[href$='/sessions']");
    driver.wait_text("h1", "Sessions and delegations");
    assert_eq!(driver.text("h1"), "Sessions and delegations");
    driver.screenshot("sessions");
    driver.go(&driver.url().replace("/sessions", "/audit"));
    assert_eq!(driver.text("h1"), "Audit");
    driver.screenshot("audit");
    driver.go(&format!("{base}/incident"));
    assert_eq!(driver.text("h1"), "Incident");
    driver.screenshot("incident");
    driver.click("form[action='/incident/validate'] button");
    driver.wait_text("main", "Recovered: every check passes.");
    driver.screenshot("incident-validate");
    driver.type_into(
        "form[action='/incident/preserve'] input[name=reason]",
        "drill",
    );
    driver.click("form[action='/incident/preserve'] button");
    driver.wait_text("main", "Download bundle-");
    driver.screenshot("incident-preserve");

    driver.click("header form button");
    driver.wait_url("/sign-in");
    driver.go(&format!("{base}/zones"));
    assert!(
        driver.url().ends_with("/sign-in"),
        "signed out: {}",
        driver.url()
    );
    drop(driver);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// In the browser: approve a hold the STS created and see the agent's retried mint succeed,
/// roll the policy set back to its last known good version, and terminate a session after its
/// impact preview.
#[test]
fn an_operator_approves_rolls_back_and_terminates_in_chromium() {
    let installed = Command::new("bash")
        .arg(repo_root().join("scripts/install-deps.sh"))
        .output()
        .unwrap();
    assert!(installed.status.success());
    let (parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, console) = (running.address("api"), running.address("console"));
    let (sts, coordinator) = (running.address("sts"), running.address("coordinator"));
    assert_eq!(wait_ready(api).status, 200);
    let zone = util::Provisioned::new(&home, api, &["resource://ledger"]);
    let good = zone.policy_set(&[(1, "resource://ledger")]);
    zone.activate_document("gated", &zone.gated_document());
    let (root, child, edge) = util::delegation_with_edge(&zone, sts, coordinator, "read");
    let mint = util::exchange_form(
        &zone,
        &format!("&scope=read&agent_session_id={child}&delegation_edge_id={edge}"),
    );
    let held = util::exchange(sts, &mint);
    assert_eq!(held.status, 401, "{}", held.body);
    let hold = util::json_of(&held)["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let driver = Driver::start(&parent.path().join("chromium-profile"));
    let base = format!("http://{console}");
    driver.go(&format!("{base}/sign-in"));
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    driver.type_into("input[name=token]", token.trim());
    driver.click("button");
    driver.wait_url("/overview");

    // Approve the hold with a reason; the agent's retry then succeeds.
    let zone_page = format!("{base}/zones/{}", zone.id);
    driver.go(&zone_page);
    assert!(driver.text("main").contains(&hold), "the hold is listed");
    driver.type_into("form.action input[name=reason]", "ticket 42");
    driver.click("form.action button[value=approve]");
    driver.wait_text("main", "approved.");
    driver.screenshot("approval");
    let retried = util::exchange(sts, &format!("{mint}&approval_id={hold}"));
    assert_eq!(retried.status, 200, "{}", retried.body);

    // Roll back to the last known good version (the ungated one).
    driver.go(&zone_page);
    driver.click("form.action:has(input[value=rollback]) button");
    driver.wait_text(
        "main",
        &format!("Rolled back: version {good} is active again."),
    );
    driver.screenshot("rollback");

    // Terminate the root session after its impact preview.
    driver.go(&format!("{base}/zones/{}/sessions", zone.id));
    driver.screenshot("session-graph");
    driver.go(&format!(
        "{base}/zones/{}/sessions/{root}/terminate",
        zone.id
    ));
    driver.wait_text("p.impact", "ends 2 session(s) and revokes 1 delegation(s)");
    driver.screenshot("terminate-preview");
    driver.type_into("input[name=reason]", "runaway agent");
    driver.click("form.card button");
    driver.wait_text("main", "2 session(s) ended.");
    drop(driver);
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}
