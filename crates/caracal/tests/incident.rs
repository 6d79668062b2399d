//! `caracal incident` against a running `caracal up`: a freeze refuses changes and is shown
//! by `status`, release lifts it, and the timeline shows what was recorded, oldest first.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::time::{Duration, Instant};

use util::{Provisioned, Running, caracal, free_ports, fresh_home, json_of, request, wait_ready};

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn contain_freeze_status_release_and_the_timeline_of_a_zone() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let auth = [("authorization", bearer.as_str())];
    let zone = request(api, "POST", "/v1/zones", &auth, r#"{"name":"drill"}"#);
    assert_eq!(zone.status, 201, "{}", zone.body);
    let zone_id = serde_json::from_str::<serde_json::Value>(&zone.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let contained = caracal(&home)
        .args([
            "incident",
            "contain",
            "--freeze",
            "--reason",
            "tamper drill",
        ])
        .output()
        .unwrap();
    assert!(contained.status.success(), "{}", text(&contained));
    let status = caracal(&home)
        .args(["incident", "status"])
        .output()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(1),
        "containment in force: {}",
        text(&status)
    );
    assert!(
        text(&status).contains("freeze (deployment)"),
        "{}",
        text(&status)
    );
    let provider = request(
        api,
        "POST",
        &format!("/v1/zones/{zone_id}/providers"),
        &auth,
        r#"{"name":"p","identifier":"provider://p","kind":"none"}"#,
    );
    assert_eq!(provider.status, 423, "{}", provider.body);
    assert!(provider.body.contains("change_freeze"));

    let missing_zone = caracal(&home)
        .args([
            "incident",
            "contain",
            "--revoke-session",
            "s",
            "--reason",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(missing_zone.status.code(), Some(1));
    assert!(
        text(&missing_zone).contains("--zone is required"),
        "{}",
        text(&missing_zone)
    );

    let released = caracal(&home)
        .args(["incident", "release", "--freeze", "--reason", "drill over"])
        .output()
        .unwrap();
    assert!(released.status.success(), "{}", text(&released));
    let status = caracal(&home)
        .args(["incident", "status"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    // Recovered: every role ready, nothing backed up, nothing contained; a key id that was
    // never the zone's is not published.
    let validated = caracal(&home)
        .args([
            "incident",
            "validate",
            "--zone",
            &zone_id,
            "--old-kid",
            "exposed-kid",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(validated.status.success(), "{}", text(&validated));
    let report: serde_json::Value = serde_json::from_slice(&validated.stdout).unwrap();
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    for expected in [
        "gateway ready",
        "audit DLQ drained",
        "gateway revocation view fresh",
        "STS policy bundles fresh",
        "no containment left in force",
        "rotated signing key no longer published",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    let provider = request(
        api,
        "POST",
        &format!("/v1/zones/{zone_id}/providers"),
        &auth,
        r#"{"name":"p","identifier":"provider://p","kind":"none"}"#,
    );
    assert_eq!(provider.status, 201, "{}", provider.body);

    // The zone's changes reach the ledger (outbox → stream → Audit role); the timeline lists
    // them oldest first.
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let timeline = caracal(&home)
            .args(["incident", "timeline", "--zone", &zone_id, "--json"])
            .output()
            .unwrap();
        assert!(timeline.status.success(), "{}", text(&timeline));
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&timeline.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if lines
            .iter()
            .any(|event| event["event_type"] == "admin.provider.create")
            || Instant::now() > deadline
        {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let types: Vec<&str> = lines
        .iter()
        .map(|event| event["event_type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"admin.provider.create"), "{types:?}");
    let times: Vec<i64> = lines
        .iter()
        .map(|event| event["occurred_at_ms"].as_i64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|pair| pair[0] <= pair[1]),
        "oldest first"
    );

    // One evidence bundle, signed; any change to it is found.
    let bundle = home.parent().unwrap().join("evidence");
    let preserved = caracal(&home)
        .args(["incident", "preserve", "--out"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(preserved.status.success(), "{}", text(&preserved));
    for file in [
        "manifest.json",
        "manifest.sig",
        "streams.json",
        "database.sqlite",
        "config.json",
        "config-diff.json",
        "containment.json",
        "audit/verification.json",
        "metrics/gateway.prom",
        "logs.jsonl",
        "audit-replay",
    ] {
        assert!(bundle.join(file).exists(), "{file} missing from the bundle");
    }
    let verify = |expect: i32, needle: &str| {
        let verified = caracal(&home)
            .args(["incident", "verify-bundle"])
            .arg(&bundle)
            .output()
            .unwrap();
        assert_eq!(verified.status.code(), Some(expect), "{}", text(&verified));
        assert!(text(&verified).contains(needle), "{}", text(&verified));
    };
    verify(0, "files match the signed manifest");
    let logs = std::fs::read_to_string(bundle.join("logs.jsonl")).unwrap();
    assert!(logs.lines().any(|line| line.contains("serving")), "{logs}");
    let config = bundle.join("config.json");
    let original = std::fs::read(&config).unwrap();
    let mut changed = original.clone();
    changed.push(b' ');
    std::fs::write(&config, &changed).unwrap();
    verify(1, "config.json was changed");
    std::fs::write(&config, &original).unwrap();
    std::fs::write(bundle.join("extra.txt"), "planted").unwrap();
    verify(1, "extra.txt is not in the manifest");
    std::fs::remove_file(bundle.join("extra.txt")).unwrap();
    let manifest = bundle.join("manifest.json");
    let manifest_text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        manifest_text.replace("\"complete\": true", "\"complete\": false"),
    )
    .unwrap();
    verify(1, "signature does not verify");

    // The admin token rotates: the old one stops at once, the file holds the new one; with
    // --invalidate-sessions every zone's sessions end too (a reason is required for that).
    let unexplained = caracal(&home)
        .args(["incident", "rotate", "admin-token", "--invalidate-sessions"])
        .output()
        .unwrap();
    assert_eq!(unexplained.status.code(), Some(2), "{}", text(&unexplained));
    let rotated = caracal(&home)
        .args(["incident", "rotate", "admin-token", "--invalidate-sessions"])
        .args(["--reason", "token leaked"])
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{}", text(&rotated));
    assert!(
        text(&rotated).contains(&format!("sessions of zone {zone_id} invalidated: done")),
        "{}",
        text(&rotated)
    );
    let old = request(api, "GET", "/v1/incident/containment", &auth, "");
    assert_eq!(old.status, 401, "{}", old.body);
    let new_token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    assert_ne!(new_token.trim(), token.trim());
    assert_eq!(util::mode(&home.join("admin-token")) & 0o777, 0o600);
    let status = caracal(&home)
        .args(["incident", "status"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// The secret-exposure drill: canaries pass, the application's secret and the zone's signing
/// key are rotated with everything minted under them revoked, and `validate` proves the old
/// secret and the old key no longer work while the new secret does.
#[test]
fn secret_exposure_drill_rotates_and_proves_the_old_material_dead() {
    let (parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let (api, sts) = (running.address("api"), running.address("sts"));
    assert_eq!(wait_ready(api).status, 200);
    let zone = Provisioned::new(&home, api, &["resource://ledger"]);
    let sets = zone.policy_set(&[(1, "resource://ledger")]);
    let (zone, app_id, old_secret) = (zone.id.clone(), zone.app_id.clone(), zone.secret.clone());
    let _ = sets;
    let old_file = parent.path().join("old-secret");
    std::fs::write(&old_file, &old_secret).unwrap();
    let validate = |secret: &std::path::Path, extra: &[&str]| {
        let mut command = caracal(&home);
        command
            .args([
                "incident", "validate", "--json", "--zone", &zone, "--app", &app_id,
            ])
            .args(["--resource", "resource://ledger", "--secret-file"])
            .arg(secret)
            .args(extra);
        command.output().unwrap()
    };
    let before = validate(&old_file, &[]);
    assert!(before.status.success(), "{}", text(&before));

    let jwks = json_of(&util::get(
        sts,
        &format!("/.well-known/jwks.json?zone_id={zone}"),
        &[],
    ));
    let old_kid = jwks["keys"][0]["kid"].as_str().unwrap().to_owned();
    let rotated = caracal(&home)
        .args([
            "incident",
            "rotate",
            "app-secret",
            "--zone",
            &zone,
            "--app",
            &app_id,
        ])
        .args(["--invalidate-sessions", "--reason", "secret exposure"])
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{}", text(&rotated));
    let stdout = String::from_utf8_lossy(&rotated.stdout).into_owned();
    let new_secret = stdout.lines().nth(1).unwrap().trim().to_owned();
    assert_ne!(new_secret, old_secret);
    let keys = caracal(&home)
        .args(["incident", "rotate", "signing-key", "--zone", &zone])
        .args(["--invalidate-sessions", "--reason", "key exposure"])
        .output()
        .unwrap();
    assert!(keys.status.success(), "{}", text(&keys));
    let new_file = parent.path().join("new-secret");
    std::fs::write(&new_file, &new_secret).unwrap();
    let old_path = old_file.display().to_string();
    // The STS replica drops its cached keys when the rotation's message arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = validate(
            &new_file,
            &["--old-secret-file", &old_path, "--old-kid", &old_kid],
        );
        if after.status.success() || Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(after.status.success(), "{}", text(&after));
    let report: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    let passed: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|check| check["ok"] == true)
        .map(|check| check["name"].as_str().unwrap())
        .collect();
    for expected in [
        "canary exchange allowed",
        "canary exchange with a wrong secret denied",
        "canary call authorised by the Gateway",
        "terminated session refused at the Gateway",
        "exposed secret no longer authenticates",
        "rotated signing key no longer published",
    ] {
        assert!(passed.contains(&expected), "{expected}: {report}");
    }
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// The audit-tamper drill: a row edited behind Caracal's back is found by the sweep at the
/// next start (the Audit role not ready, the alert's metric raised), changes are frozen, the
/// evidence is preserved, the finding acknowledged, and `validate` passes once released.
#[test]
fn audit_tamper_drill_detects_contains_preserves_and_validates() {
    let (parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    let token = std::fs::read_to_string(home.join("admin-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let auth = [("authorization", bearer.as_str())];
    let zone = request(api, "POST", "/v1/zones", &auth, r#"{"name":"ledger"}"#);
    let zone_id = json_of(&zone)["id"].as_str().unwrap().to_owned();
    for n in 0..3 {
        let created = request(
            api,
            "POST",
            &format!("/v1/zones/{zone_id}/providers"),
            &auth,
            &format!(r#"{{"name":"p{n}","identifier":"provider://p{n}","kind":"none"}}"#),
        );
        assert_eq!(created.status, 201, "{}", created.body);
    }
    // Wait until the zone's events are in its chain.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let timeline = caracal(&home)
            .args(["incident", "timeline", "--zone", &zone_id, "--json"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&timeline.stdout).lines().count() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the events never reached the ledger"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
    // A full sweep signs a checkpoint over the zone's rows (the stack's runs at start and every
    // tenth minute; here now, so that the tampered row is one a checkpoint covers).
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use caracal_services::ledger::checkpoint_signer;
        use caracal_services::ledger::sweep::{SweepMetrics, Sweeper};
        let store: std::sync::Arc<dyn caracal_store::Store> = std::sync::Arc::new(
            caracal_store::SqliteStore::open(&home.join("caracal.db")).unwrap(),
        );
        let kek_text = std::fs::read_to_string(home.join(caracal_store::KEK_FILE)).unwrap();
        let kek = caracal_crypto::Kek::from_file_text(&kek_text).unwrap();
        let signer = checkpoint_signer(store.as_ref(), &kek).await.unwrap();
        let sweeper = Sweeper::new(
            std::sync::Arc::clone(&store),
            kek,
            std::sync::Arc::new(SweepMetrics::default()),
        )
        .with_checkpoints(signer);
        assert!(sweeper.full().await.unwrap().is_empty());
    });

    // Someone edits a stored event directly in the database.
    let store = caracal_store::SqliteStore::open(&home.join("caracal.db")).unwrap();
    let edited = store
        .run_blocking(|c| {
            c.execute(
                "UPDATE audit_events SET decision = 'deny' WHERE zone_id = ?1 AND chain_seq = 2",
                [&zone_id],
            )
        })
        .unwrap();
    assert_eq!(edited, 1);
    drop(store);

    // The full sweep at start finds it: the Audit role is not ready and the metric is raised.
    let running = Running::start(&home, &args);
    let audit = running.address("audit");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let ready = util::get(audit, "/ready", &[]);
        if ready.body.contains("audit_tamper_detected") || Instant::now() > deadline {
            break ready;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ready.status, 503, "{}", ready.body);
    let metrics = util::get(audit, "/metrics", &[]).body;
    assert!(
        metrics.contains("caracal_audit_tamper_detected_total{kind=\"content_mismatch\"} 1"),
        "{metrics}"
    );
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);

    // Contain, preserve, acknowledge, release, validate.
    let step = |args: &[&str]| {
        let output = caracal(&home).args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", text(&output));
    };
    step(&[
        "incident",
        "contain",
        "--freeze",
        "--reason",
        "audit tamper",
    ]);
    let frozen = request(
        api,
        "POST",
        &format!("/v1/zones/{zone_id}/providers"),
        &auth,
        r#"{"name":"late","identifier":"provider://late","kind":"none"}"#,
    );
    assert_eq!(frozen.status, 423, "{}", frozen.body);
    let bundle = parent.path().join("tamper-evidence");
    let preserved = caracal(&home)
        .args(["incident", "preserve", "--out"])
        .arg(&bundle)
        .output()
        .unwrap();
    // The export that no longer verifies is the evidence: kept and named, not a failed part.
    assert!(preserved.status.success(), "{}", text(&preserved));
    assert!(
        text(&preserved).contains(&format!("UNVERIFIED audit export of zone {zone_id}")),
        "{}",
        text(&preserved)
    );
    let verification: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(bundle.join("audit/verification.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(verification[&zone_id]["ok"], false, "{verification}");
    // The signed manifest names the finding too.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["complete"], true, "{manifest}");
    assert!(
        manifest["unverified"][0]
            .as_str()
            .is_some_and(|entry| entry.starts_with(&format!("zone {zone_id}: "))),
        "{manifest}"
    );
    assert!(bundle.join(format!("audit/{zone_id}.jsonl")).exists());
    let not_yet = caracal(&home)
        .args(["incident", "validate"])
        .output()
        .unwrap();
    assert_eq!(not_yet.status.code(), Some(1), "{}", text(&not_yet));
    assert!(
        text(&not_yet).contains("FAIL audit ready"),
        "{}",
        text(&not_yet)
    );
    step(&[
        "audit",
        "ack-tamper",
        "--reason",
        "edited row restored from backup",
    ]);
    step(&[
        "incident",
        "release",
        "--freeze",
        "--reason",
        "tamper explained",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let validated = loop {
        let validated = caracal(&home)
            .args(["incident", "validate"])
            .output()
            .unwrap();
        if validated.status.success() || Instant::now() > deadline {
            break validated;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(validated.status.success(), "{}", text(&validated));
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

/// A zone provisioned through the API of a running stack: an application (and its secret),
/// resources, and a policy set whose versions grant the application some of them.
/// The bad-policy drill: a version that allows too much is active; `contain --policy
/// last-known-good` puts the previous one back in force, and the STS confirms it loaded.
#[test]
fn bad_policy_drill_rolls_back_to_the_last_known_good_version() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    let zone = Provisioned::new(&home, api, &["resource://ledger", "resource://payroll"]);
    let good = zone.policy_set(&[(1, "resource://ledger")]);
    // The bad version also grants payroll.
    let bad = zone.policy_set(&[(2, "resource://ledger"), (2, "resource://payroll")]);
    let auth = [("authorization", zone.bearer.as_str())];
    let active = || {
        json_of(&util::get(
            api,
            &format!("{}/activation-status", zone.sets),
            &auth,
        ))
    };
    assert_eq!(active()["active_version_id"], bad.as_str());
    let set_id = zone.sets.rsplit('/').next().unwrap().to_owned();
    let contained = caracal(&home)
        .args([
            "incident",
            "contain",
            "--zone",
            &zone.id,
            "--policy",
            "last-known-good",
        ])
        .args([
            "--policy-set",
            &set_id,
            "--reason",
            "payroll was opened by mistake",
        ])
        .output()
        .unwrap();
    assert!(contained.status.success(), "{}", text(&contained));
    assert!(text(&contained).contains("policy rollback to last known good: done"));
    assert_eq!(active()["active_version_id"], good.as_str());
    zone.wait_loaded(&good);
    // The bad version is not remembered as good: a second rollback has nothing to go to.
    let again = caracal(&home)
        .args([
            "incident",
            "contain",
            "--zone",
            &zone.id,
            "--policy",
            "last-known-good",
        ])
        .args(["--policy-set", &set_id, "--reason", "again"])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        text(&again).contains("no_last_known_good"),
        "{}",
        text(&again)
    );
    assert_eq!(active()["active_version_id"], good.as_str());
    let (exit, _, _) = running.terminate();
    assert!(exit.success());
}

#[test]
fn a_stream_key_rotation_keeps_the_old_key_accepted_until_its_file_is_deleted() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let running = Running::start(&home, &args);
    assert_eq!(wait_ready(running.address("api")).status, 200);
    let key_file = home.join("stream-key");
    let old = std::fs::read_to_string(&key_file).unwrap();

    // Rotated while running, as an operator would, then restarted.
    let rotated = caracal(&home)
        .args(["incident", "rotate", "stream-key"])
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{}", text(&rotated));
    assert!(
        text(&rotated).contains("restart every role"),
        "{}",
        text(&rotated)
    );
    let new = std::fs::read_to_string(&key_file).unwrap();
    let previous_file = home.join("stream-key.previous");
    assert_eq!(std::fs::read_to_string(&previous_file).unwrap(), old);
    assert_ne!(new, old);
    assert_eq!(new.trim().len(), 64);
    assert_eq!(
        (util::mode(&key_file), util::mode(&previous_file)),
        (0o600, 0o600)
    );
    let (status, _, stderr) = running.terminate();
    assert!(status.success(), "{stderr}");
    let restarted = Running::start(&home, &args);
    assert_eq!(wait_ready(restarted.address("api")).status, 200);
    let (status, _, stderr) = restarted.terminate();
    assert!(status.success(), "{stderr}");

    // A key given by configuration is the operator's to rotate there.
    let configured = caracal(&home)
        .args([
            "--stream-key",
            &"cd".repeat(32),
            "incident",
            "rotate",
            "stream-key",
        ])
        .output()
        .unwrap();
    assert_eq!(configured.status.code(), Some(1), "{}", text(&configured));
    assert!(
        text(&configured).contains("set by configuration"),
        "{}",
        text(&configured)
    );
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap(),
        new,
        "nothing changed"
    );

    // A damaged previous key stops the start, naming the file.
    std::fs::write(&previous_file, "not a key").unwrap();
    let refused = caracal(&home).args(&args).output().unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("stream-key.previous"),
        "{}",
        text(&refused)
    );
}

#[test]
fn metrics_need_the_configured_bearer_and_the_cli_presents_it() {
    let (parent, home) = fresh_home();
    let bearer = "scrape-me-with-this-token";
    let mut args = free_ports();
    args.extend([
        "--metrics-bearer".to_owned(),
        bearer.to_owned(),
        "up".to_owned(),
    ]);
    let running = Running::start(&home, &args);
    let api = running.address("api");
    assert_eq!(wait_ready(api).status, 200);
    assert_eq!(request(api, "GET", "/metrics", &[], "").status, 401);
    let authorization = format!("Bearer {bearer}");
    let scraped = request(
        api,
        "GET",
        "/metrics",
        &[("authorization", &authorization)],
        "",
    );
    assert_eq!(scraped.status, 200);
    assert!(scraped.body.contains("caracal_api_"));

    // The CLI's own probes present it (given the same configuration), so the bundle holds
    // every role's metrics rather than a refusal.
    let bundle = parent.path().join("bundle");
    let preserved = caracal(&home)
        .env("CARACAL_METRICS_BEARER", bearer)
        .args(["incident", "preserve", "--out"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(preserved.status.success(), "{}", text(&preserved));
    let metrics = std::fs::read_to_string(bundle.join("metrics/api.prom")).unwrap();
    assert!(metrics.contains("caracal_api_"), "{metrics}");
}
