//! `caracal audit …`: export a zone's ledger with its proofs, verify an export offline, show
//! the checkpoint public keys.

use std::sync::Arc;

use anyhow::Context as _;
use caracal_services::Settings;
use caracal_store::{PgOptions, PgStore, SqliteStore, Store, StoreUrl};

use crate::cli::{AuditCommand, ExportArgs};

/// The configured store. SQLite is opened beside a running `caracal up` safely (WAL allows a
/// second connection; nothing here writes rows).
async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
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
        AuditCommand::PublicKey => {
            let store = open_store(settings).await?;
            for (key_id, public_key) in store.checkpoint_keys().await? {
                println!("{key_id} Ed25519 {public_key}");
            }
            Ok(true)
        }
    }
}

async fn export(settings: &Settings, args: &ExportArgs) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    let bundle = caracal_services::ledger::export_bundle(
        store.as_ref(),
        &args.zone,
        args.from_seq,
        args.to_seq,
    )
    .await
    .with_context(|| format!("export of zone `{}`", args.zone))?;
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
