//! `caracal incident preserve --out DIR`: one evidence bundle of the deployment's state, and
//! `caracal incident verify-bundle DIR`, which checks it with the published key alone.
//!
//! The bundle: every zone's audit export with its verification result, every stream's length,
//! groups, lag and pending entries, the dead-letter entries, a database snapshot (SQLite
//! `VACUUM INTO`, or `pg_dump`), the audit evidence waiting on disk to be replayed, the
//! effective configuration and its difference from the defaults, the containment switches, the running process's recent log lines, every role's
//! metrics; then `manifest.json` (SHA-256 and size of each file, the parts that failed and the
//! zones whose export does not verify) and `manifest.sig`, the deployment key's signature over
//! the manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use caracal_bus::Streams;
use caracal_services::BusUrl;
use caracal_store::{StoreUrl, redact_url};
use serde_json::{Value, json};

use caracal_services::recovery::Preserved;

use crate::config::Resolved;

const MANIFEST: &str = "manifest.json";
const SIGNATURE: &str = "manifest.sig";
/// The streams whose state and dead letters are preserved.
const STREAMS: [&str; 6] = [
    caracal_bus::stream_names::AUDIT_EVENTS,
    caracal_bus::stream_names::SESSIONS_REVOKE,
    caracal_bus::stream_names::DELEGATIONS_INVALIDATE,
    caracal_bus::stream_names::POLICY_INVALIDATE,
    caracal_bus::stream_names::KEYS_INVALIDATE,
    caracal_bus::stream_names::AGENTS_LIFECYCLE,
];

pub async fn preserve(resolved: &Resolved, out: &Path) -> anyhow::Result<Preserved> {
    let settings = &resolved.settings;
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} exists and is not empty", out.display());
    }
    std::fs::create_dir_all(out.join("audit"))
        .and_then(|()| std::fs::create_dir_all(out.join("metrics")))
        .with_context(|| format!("creating {}", out.display()))?;
    let store = crate::audit::open_store(settings).await?;
    // The parts that could not be collected, each with why (its `*error*` file has the detail).
    let mut failed: Vec<String> = Vec::new();

    // Audit: every zone's export, verified as a third party would. An export that does not
    // verify is what this bundle exists to keep: a finding, not a part that failed.
    let keys = store.checkpoint_keys().await?;
    let mut verification = BTreeMap::new();
    let mut unverified = Vec::new();
    for zone in store.list_zones().await? {
        let result = match caracal_services::ledger::export_bundle(
            store.as_ref(),
            &zone.id,
            0,
            i64::MAX,
            &|_, _| {},
        )
        .await
        {
            Ok(bundle) => {
                std::fs::write(out.join(format!("audit/{}.jsonl", zone.id)), &bundle)?;
                let mut refusal = "no checkpoint key is published".to_owned();
                let verified = keys.iter().find_map(|(_, public_key)| {
                    caracal_audit::bundle::verify(&bundle, public_key)
                        .map_err(|error| refusal = error.to_string())
                        .ok()
                });
                match verified {
                    Some(verified) => {
                        json!({"ok": true, "rows": verified.rows, "tree_size": verified.tree_size})
                    }
                    None => {
                        unverified.push(format!("zone {}: {refusal}", zone.id));
                        json!({"ok": false, "error": refusal})
                    }
                }
            }
            // A zone without a signed checkpoint yet has nothing provable to export.
            Err(error) => json!({"ok": false, "error": format!("{error:#}")}),
        };
        verification.insert(zone.id, result);
    }
    write_json(out, "audit/verification.json", &json!(verification))?;

    // Streams: state and dead letters.
    match open_bus(settings).await {
        Ok(streams) => {
            let mut state = BTreeMap::new();
            let mut dead = String::new();
            for stream in STREAMS {
                state.insert(
                    stream.to_owned(),
                    stream_state(streams.as_ref(), stream).await,
                );
                let dead_stream = caracal_bus::dead_letter_stream(stream);
                state.insert(
                    dead_stream.clone(),
                    stream_state(streams.as_ref(), &dead_stream).await,
                );
                if let Ok(entries) = streams.range(&dead_stream, None, 10_000).await {
                    for entry in entries {
                        dead.push_str(
                            &json!({"stream": dead_stream, "id": entry.id, "fields": entry.fields})
                                .to_string(),
                        );
                        dead.push('\n');
                    }
                }
            }
            write_json(out, "streams.json", &json!(state))?;
            std::fs::write(out.join("dead-letters.jsonl"), dead)?;
        }
        Err(error) => {
            failed.push(format!("streams: {error:#}"));
            write_json(out, "streams.json", &json!({"error": format!("{error:#}")}))?;
        }
    }

    // Evidence this process could not hand to the ledger yet, waiting on disk to be replayed.
    if let Err(error) = copy_replay_files(&settings.home, out) {
        failed.push(format!("audit replay files: {error:#}"));
        write_json(
            out,
            "audit-replay-error.json",
            &json!({"error": format!("{error:#}")}),
        )?;
    }

    // The database, as it is now.
    if let Err(error) = snapshot_database(settings, out).await {
        failed.push(format!("database snapshot: {error:#}"));
        write_json(
            out,
            "database-error.json",
            &json!({"error": format!("{error:#}")}),
        )?;
    }

    // Configuration, and what differs from the defaults.
    let config: Vec<Value> = resolved
        .shown
        .iter()
        .map(|(key, value, source)| json!({"key": key, "value": value, "source": source.to_string()}))
        .collect();
    let changed: Vec<&Value> = config
        .iter()
        .filter(|entry| entry["source"] != "default")
        .collect();
    write_json(out, "config.json", &json!(config))?;
    write_json(out, "config-diff.json", &json!(changed))?;

    let containment: Vec<Value> = store
        .list_containment()
        .await?
        .into_iter()
        .map(|switch| json!({"kind": switch.kind, "zone_id": switch.zone_id, "reason": switch.reason, "actor": switch.actor, "since_ms": switch.since_ms}))
        .collect();
    write_json(out, "containment.json", &json!(containment))?;

    // The recent log lines the running process keeps (all roles of an embedded stack).
    match crate::admin_http::get(settings, None, "/v1/incident/logs").await {
        Ok((status, answer)) if status.is_success() => {
            let lines: Vec<String> = answer
                .get("lines")
                .and_then(Value::as_array)
                .map(|lines| {
                    lines
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|line| format!("{line}\n"))
                        .collect()
                })
                .unwrap_or_default();
            std::fs::write(out.join("logs.jsonl"), lines.concat())?;
        }
        Ok((status, answer)) => {
            failed.push(format!("recent logs: the API answered {status}"));
            write_json(
                out,
                "logs-error.json",
                &json!({"status": status.as_u16(), "answer": answer}),
            )?;
        }
        Err(error) => {
            failed.push(format!("recent logs: {error:#}"));
            write_json(
                out,
                "logs-error.json",
                &json!({"error": format!("{error:#}")}),
            )?;
        }
    }

    // Every running role's metrics.
    let client = crate::status::probe_client(settings);
    for (role, address) in crate::status::targets(resolved, &[]) {
        let text = match caracal_services::peer_probe::get(&client, address, "/metrics").await {
            Ok((200, body)) => String::from_utf8_lossy(&body).into_owned(),
            Ok((status, _)) => format!("# {role} at {address} answered {status}\n"),
            Err(reason) => format!("# {role} at {address}: {reason}\n"),
        };
        std::fs::write(out.join(format!("metrics/{role}.prom")), text)?;
    }

    // The manifest, signed with the deployment key.
    let kek_text = std::fs::read_to_string(settings.home.join(caracal_store::KEK_FILE))
        .context("the deployment KEK (needed to sign the manifest)")?;
    let kek = caracal_crypto::Kek::from_file_text(&kek_text)
        .map_err(|error| anyhow::anyhow!("the KEK file: {error}"))?;
    let signer = caracal_services::ledger::checkpoint_signer(store.as_ref(), &kek).await?;
    let files = manifest_entries(out)?;
    let manifest = json!({
        "created_at_ms": caracal_store::now_ms(),
        "key_id": signer.key_id(),
        "public_key": signer.public_key_hex(),
        "complete": failed.is_empty(),
        "failed": &failed,
        "unverified": &unverified,
        "files": &files,
    });
    let text = serde_json::to_string_pretty(&manifest)?;
    std::fs::write(out.join(MANIFEST), &text)?;
    let signature = signer.sign_manifest(&caracal_crypto::sha256(text.as_bytes()));
    std::fs::write(out.join(SIGNATURE), format!("{signature}\n"))?;
    Ok(Preserved {
        failed,
        unverified,
        files: files.len(),
        key_id: signer.key_id().to_owned(),
    })
}

/// `$CARACAL_HOME/audit-replay/*` into the bundle's `audit-replay/` (empty when nothing waits).
fn copy_replay_files(home: &Path, out: &Path) -> anyhow::Result<()> {
    let target = out.join(caracal_services::REPLAY_DIR);
    std::fs::create_dir_all(&target)?;
    let source = home.join(caracal_services::REPLAY_DIR);
    let entries = match std::fs::read_dir(&source) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| source.display().to_string()),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), target.join(entry.file_name()))
                .with_context(|| entry.path().display().to_string())?;
        }
    }
    Ok(())
}

fn write_json(out: &Path, name: &str, value: &Value) -> anyhow::Result<()> {
    std::fs::write(out.join(name), serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {name}"))
}

async fn open_bus(settings: &caracal_services::Settings) -> anyhow::Result<Arc<dyn Streams>> {
    Ok(match (&settings.bus, &settings.store) {
        (BusUrl::Redis(url), _) => Arc::new(
            caracal_bus::RedisBus::connect(url)
                .await
                .with_context(|| format!("bus {}", redact_url(url)))?,
        ),
        (BusUrl::Embedded, StoreUrl::Sqlite(path)) => Arc::new(caracal_bus::EmbeddedBus::new(
            caracal_store::SqliteStore::open(path)?,
        )),
        (BusUrl::Embedded, StoreUrl::Postgres(_)) => {
            bail!("the embedded bus needs the embedded store")
        }
    })
}

async fn stream_state(streams: &dyn Streams, stream: &str) -> Value {
    match streams.info(stream).await {
        Ok(info) => json!({
            "length": info.length,
            "groups": info.groups.iter().map(|group| json!({
                "name": group.name,
                "pending": group.pending,
                "lag": group.lag,
                "oldest_pending_age_seconds": group.oldest_pending_age.map(|age| age.as_secs()),
            })).collect::<Vec<_>>(),
        }),
        Err(error) => json!({"error": error.to_string()}),
    }
}

async fn snapshot_database(
    settings: &caracal_services::Settings,
    out: &Path,
) -> anyhow::Result<()> {
    match &settings.store {
        StoreUrl::Sqlite(path) => {
            let target = out.join("database.sqlite");
            let store = caracal_store::SqliteStore::open(path)?;
            let target_text = target.display().to_string();
            store
                .run_alone(move |connection| connection.execute("VACUUM INTO ?1", [target_text]))
                .await?;
            Ok(())
        }
        StoreUrl::Postgres(url) => {
            let mut command = std::process::Command::new("pg_dump");
            command
                .arg("--format=custom")
                .arg("--file")
                .arg(out.join("database.pgdump"))
                .arg(url);
            if let Some(schema) = &settings.store_schema {
                command.arg("--schema").arg(schema);
            }
            let output = command.output().context("running pg_dump")?;
            if !output.status.success() {
                bail!(
                    "pg_dump failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            Ok(())
        }
    }
}

/// `{path, sha256, bytes}` of every file under `dir` but the manifest and its signature.
fn manifest_entries(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let mut paths = Vec::new();
    collect(dir, dir, &mut paths)?;
    paths.sort();
    paths
        .into_iter()
        .filter(|path| path != MANIFEST && path != SIGNATURE)
        .map(|path| {
            let bytes = std::fs::read(dir.join(&path))?;
            Ok(json!({
                "path": path,
                "sha256": caracal_crypto::hex(&caracal_crypto::sha256(&bytes)),
                "bytes": bytes.len(),
            }))
        })
        .collect()
}

fn collect(root: &Path, dir: &Path, paths: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path: PathBuf = entry?.path();
        if path.is_dir() {
            collect(root, &path, paths)?;
        } else if let Ok(relative) = path.strip_prefix(root) {
            paths.push(relative.display().to_string());
        }
    }
    Ok(())
}

/// Checks the bundle in `dir`: the manifest's signature (with `public_key`, else the key the
/// manifest names, which must then be one the deployment published), every listed file's hash,
/// and that nothing was added. Prints each failure; `Ok(false)` if any.
pub async fn verify_bundle(
    resolved: &Resolved,
    dir: &Path,
    public_key: Option<&str>,
) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).context("manifest.json")?;
    let signature = std::fs::read_to_string(dir.join(SIGNATURE)).context("manifest.sig")?;
    let manifest: Value = serde_json::from_str(&text).context("manifest.json is not JSON")?;
    let key = match public_key {
        Some(key) => key.to_owned(),
        None => {
            let named = manifest
                .get("public_key")
                .and_then(Value::as_str)
                .context("the manifest names no public key; pass --public-key")?;
            let store = crate::audit::open_store(&resolved.settings).await?;
            let published = store.checkpoint_keys().await?;
            if !published.iter().any(|(_, key)| key == named) {
                println!("FAILED: the manifest's key is not one this deployment published");
                return Ok(false);
            }
            named.to_owned()
        }
    };
    let mut ok = true;
    if caracal_audit::merkle::verify_manifest(
        &caracal_crypto::sha256(text.as_bytes()),
        signature.trim(),
        &key,
    )
    .is_err()
    {
        println!("FAILED: the manifest's signature does not verify");
        ok = false;
    }
    let listed: BTreeMap<String, String> = manifest
        .get("files")
        .and_then(Value::as_array)
        .map(|files| {
            files
                .iter()
                .filter_map(|file| {
                    Some((
                        file.get("path")?.as_str()?.to_owned(),
                        file.get("sha256")?.as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    for entry in manifest_entries(dir)? {
        let field = |name: &str| entry.get(name).and_then(Value::as_str);
        let path = field("path").unwrap_or_default();
        match listed.get(path) {
            None => {
                println!("FAILED: {path} is not in the manifest");
                ok = false;
            }
            Some(hash) if Some(hash.as_str()) != field("sha256") => {
                println!("FAILED: {path} was changed");
                ok = false;
            }
            Some(_) => {}
        }
    }
    for path in listed.keys() {
        if !dir.join(path).exists() {
            println!("FAILED: {path} is missing");
            ok = false;
        }
    }
    if ok {
        println!("OK: {} files match the signed manifest", listed.len());
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_replay_files_are_copied_into_the_bundle() {
        let parent = tempfile::tempdir().unwrap();
        let (home, out) = (parent.path().join("home"), parent.path().join("out"));
        copy_replay_files(&home, &out).unwrap();
        assert_eq!(
            std::fs::read_dir(out.join("audit-replay")).unwrap().count(),
            0,
            "no replay directory: an empty one in the bundle"
        );
        std::fs::create_dir_all(home.join("audit-replay")).unwrap();
        std::fs::write(home.join("audit-replay/1.jsonl"), "{\"id\":\"e-1\"}\n").unwrap();
        copy_replay_files(&home, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("audit-replay/1.jsonl")).unwrap(),
            "{\"id\":\"e-1\"}\n"
        );
        let entries = manifest_entries(&out).unwrap();
        assert_eq!(entries[0]["path"], "audit-replay/1.jsonl");
    }
}
