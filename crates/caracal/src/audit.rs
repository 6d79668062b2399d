//! `caracal audit …`: export a zone's ledger with its proofs, verify an export offline, show
//! the checkpoint public keys.

use std::sync::Arc;

use anyhow::Context as _;
use caracal_services::Settings;
use caracal_store::{PgOptions, PgStore, SqliteStore, Store, StoreUrl};

use crate::cli::{AuditCommand, ExportArgs};

/// The configured store. SQLite is opened beside a running `caracal up` safely (WAL allows a
/// second connection; nothing here writes rows).
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &settings.store {
        StoreUrl::Sqlite(path) => {
            Arc::new(SqliteStore::open(path).with_context(|| format!("store {}", path.display()))?)
        }
        StoreUrl::Postgres(url) => {
            let options = PgOptions {
                pool_size: 2,
                schema: settings.store_schema.clone(),
                ..PgOptions::default()
            };
            Arc::new(PgStore::connect(url, &options).await?)
        }
    })
}

/// Runs an audit command; `Ok(false)` means "ran, but the answer is no" (exit 1).
pub async fn run(settings: &Settings, command: &AuditCommand) -> anyhow::Result<bool> {
    match command {
        AuditCommand::Export(args) => export(settings, args).await.map(|()| true),
        AuditCommand::Verify { bundle, public_key } => {
            let text = std::fs::read_to_string(bundle)
                .with_context(|| format!("bundle {}", bundle.display()))?;
            match caracal_audit::bundle::verify(&text, public_key) {
                Ok(verified) => {
                    println!(
                        "OK: zone `{}`, rows {}..={} ({} rows) are in the signed tree of {} rows",
                        verified.zone_id,
                        verified.first_seq,
                        verified.last_seq,
                        verified.rows,
                        verified.tree_size
                    );
                    Ok(true)
                }
                Err(error) => {
                    println!("FAILED: {error}");
                    Ok(false)
                }
            }
        }
        AuditCommand::AckTamper { reason, token_file } => {
            ack_tamper(settings, reason, token_file.as_deref()).await
        }
        AuditCommand::Dlq { replay, token_file } => {
            dead_letters(settings, *replay, token_file.as_deref()).await
        }
        AuditCommand::RotateKey => {
            let store = open_store(settings).await?;
            let ids = store
                .audit_chain_key_ids(caracal_services::ledger::INITIAL_CHAIN_KEY_ID)
                .await?;
            let next = (ids.len() + 1..)
                .map(|n| format!("chain-{n}"))
                .find(|id| !ids.contains(id))
                .unwrap_or_else(|| "chain-next".to_owned());
            store.add_audit_chain_key(&next).await?;
            println!("current audit chain key: {next} (rows written before keep their own key)");
            Ok(true)
        }
        AuditCommand::PublicKey => {
            let store = open_store(settings).await?;
            for (key_id, public_key) in store.checkpoint_keys().await? {
                println!("{key_id} Ed25519 {public_key}");
            }
            Ok(true)
        }
    }
}

/// Epoch milliseconds from RFC 3339 text or a plain integer.
pub fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(millis) = text.parse::<i64>() {
        return Ok(millis);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("`{text}` is neither RFC 3339 nor epoch milliseconds"))?;
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .context("time before 1970")?;
    Ok(i64::try_from(since_epoch.as_millis())?)
}

async fn export(settings: &Settings, args: &ExportArgs) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    let (mut from, mut to) = (args.from_seq, args.to_seq);
    if args.from.is_some() || args.to.is_some() {
        let since = args
            .from
            .as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or(i64::MIN);
        let until = args
            .to
            .as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or(i64::MAX);
        // Chain order is ingestion order: the rows covering the window, contiguous.
        let (first, last) = store
            .audit_seq_range(&args.zone, since, until)
            .await?
            .with_context(|| format!("zone `{}` has no events in that time range", args.zone))?;
        from = from.max(first);
        to = to.min(last);
    }
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} rows")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("reading zone `{}`", args.zone));
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let bundle =
        caracal_services::ledger::export_bundle(store.as_ref(), &args.zone, from, to, &progress)
            .await
            .with_context(|| format!("export of zone `{}`", args.zone))?;
    bar.finish_and_clear();
    match &args.out {
        Some(path) => {
            std::fs::write(path, &bundle).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {} ({} lines)",
                path.display(),
                bundle.lines().count()
            );
        }
        None => print!("{bundle}"),
    }
    Ok(())
}

/// Replays (when asked) then lists the dead letters; `Ok(false)` while any is left.
async fn dead_letters(
    settings: &Settings,
    replay: bool,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    use serde_json::Value;
    let refused = |status: hyper::StatusCode, json: &Value| {
        anyhow::anyhow!(
            "refused ({}): {}",
            status.as_u16(),
            crate::admin_http::error_code(json)
        )
    };
    if replay {
        let mut replayed = 0;
        let skipped = loop {
            let (status, json) = crate::admin_http::post(
                settings,
                token_file,
                "/v1/audit/dlq/replay?limit=1000",
                serde_json::json!({}),
            )
            .await?;
            if !status.is_success() {
                return Err(refused(status, &json));
            }
            let count = |name: &str| json.get(name).and_then(Value::as_u64).unwrap_or(0);
            replayed += count("replayed");
            // Replayed entries leave the stream; stop once a pass re-sends nothing more.
            if count("replayed") == 0 || count("scanned") < 1000 {
                break count("skipped");
            }
        };
        println!("replayed {replayed} dead letter(s); {skipped} not replayable");
    }
    let mut reasons = std::collections::BTreeMap::<(String, bool), u64>::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(cursor) => format!("/v1/audit/dlq?limit=1000&after={cursor}"),
            None => "/v1/audit/dlq?limit=1000".to_owned(),
        };
        let (status, json) = crate::admin_http::get(settings, token_file, &path).await?;
        if !status.is_success() {
            return Err(refused(status, &json));
        }
        for item in json
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let reason = item
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            let replayable = item.get("replayable").and_then(Value::as_bool) == Some(true);
            *reasons.entry((reason.to_owned(), replayable)).or_default() += 1;
        }
        after = json
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if after.is_none() {
            break;
        }
    }
    let total: u64 = reasons.values().sum();
    println!("{total} audit dead letter(s)");
    for ((reason, replayable), count) in &reasons {
        let kind = if *replayable {
            "replayable"
        } else {
            "not replayable"
        };
        println!("{count:>8}  {reason} ({kind})");
    }
    Ok(total == 0)
}

async fn ack_tamper(
    settings: &Settings,
    reason: &str,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let (status, json) = crate::admin_http::post(
        settings,
        token_file,
        "/v1/audit/tamper/ack",
        serde_json::json!({ "reason": reason }),
    )
    .await?;
    if status.is_success() {
        println!(
            "acknowledged {} finding(s)",
            json.get("acknowledged")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        );
        Ok(true)
    } else {
        println!(
            "refused ({}): {}",
            status.as_u16(),
            crate::admin_http::error_code(&json)
        );
        Ok(false)
    }
}
