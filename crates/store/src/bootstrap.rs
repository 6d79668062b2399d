//! First-start and every-start setup of a deployment: the KEK and the bootstrap admin token.

use caracal_crypto::{AdminToken, Kek, KekError, RandomError, hex, random_bytes};

use crate::model::{KekRecord, NewAdminToken, TokenScope};
use crate::{DataDir, DataDirError, Store, StoreError};

pub const KEK_FILE: &str = "kek";
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
const BOOTSTRAP_CREATOR: &str = "bootstrap";

/// What a start found or created.
#[derive(Debug)]
pub struct Bootstrap {
    pub kek: Kek,
    pub admin_token: BootstrapToken,
}

/// The bootstrap admin token: freshly minted (shown once), or already present.
#[derive(Debug)]
pub enum BootstrapToken {
    Minted(AdminToken),
    Existing,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("KEK file {path}: {source}")]
    KekFile { path: String, source: KekError },
    #[error(
        "the KEK file is missing but the store was initialised with KEK `{kek_id}`; restore \
         {path} from backup (sealed secrets cannot be opened without it)"
    )]
    KekMissing { kek_id: String, path: String },
    #[error(
        "the KEK file {path} (key `{found}`) does not belong to this store (expects `{expected}` \
         or its check value differs); restore the right file"
    )]
    KekMismatch {
        path: String,
        found: String,
        expected: String,
    },
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// Loads or creates the KEK and the bootstrap admin token.
///
/// Order matters for crash safety: each secret file is written (fsynced, renamed) before the
/// database records it, so a crash can leave an unused file but never a database that refers
/// to a secret nobody holds.
pub async fn bootstrap(data_dir: &DataDir, store: &dyn Store) -> Result<Bootstrap, BootstrapError> {
    let kek = load_or_create_kek(data_dir, store).await?;
    let admin_token = ensure_admin_token(data_dir, store).await?;
    Ok(Bootstrap { kek, admin_token })
}

async fn load_or_create_kek(data_dir: &DataDir, store: &dyn Store) -> Result<Kek, BootstrapError> {
    let path = data_dir.path().join(KEK_FILE).display().to_string();
    let recorded = store.deployment_kek().await?;
    let on_disk = data_dir
        .read_file(KEK_FILE)?
        .map(|text| Kek::from_file_text(&text))
        .transpose()
        .map_err(|source| BootstrapError::KekFile {
            path: path.clone(),
            source,
        })?;

    match (recorded, on_disk) {
        (Some(record), Some(kek)) => {
            if kek.key_id() != record.kek_id || kek.check_value() != record.kek_check {
                return Err(BootstrapError::KekMismatch {
                    path,
                    found: kek.key_id().to_owned(),
                    expected: record.kek_id,
                });
            }
            Ok(kek)
        }
        (Some(record), None) => Err(BootstrapError::KekMissing {
            kek_id: record.kek_id,
            path,
        }),
        (None, existing) => {
            let kek = match existing {
                Some(kek) => kek,
                None => {
                    let kek = Kek::generate().map_err(|source| BootstrapError::KekFile {
                        path: path.clone(),
                        source,
                    })?;
                    data_dir.write_private_file(KEK_FILE, &kek.to_file_text())?;
                    kek
                }
            };
            store
                .record_deployment_kek(&KekRecord {
                    kek_id: kek.key_id().to_owned(),
                    kek_check: kek.check_value(),
                })
                .await?;
            Ok(kek)
        }
    }
}

async fn ensure_admin_token(
    data_dir: &DataDir,
    store: &dyn Store,
) -> Result<BootstrapToken, BootstrapError> {
    if store.has_active_token_by(BOOTSTRAP_CREATOR).await? {
        return Ok(BootstrapToken::Existing);
    }
    let token = AdminToken::generate()?;
    data_dir.write_private_file(ADMIN_TOKEN_FILE, &format!("{}\n", token.expose()))?;
    let id_bytes: [u8; 16] = random_bytes()?;
    store
        .insert_admin_token(
            &NewAdminToken {
                id: format!("tok_{}", hex(&id_bytes)),
                name: "bootstrap".to_owned(),
                digest: token.digest(),
                scope: TokenScope::Global,
                capabilities: "write,approve".to_owned(),
                created_by: BOOTSTRAP_CREATOR.to_owned(),
            },
            &[],
        )
        .await?;
    Ok(BootstrapToken::Minted(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::SqliteStore;

    async fn start(home: &std::path::Path) -> (DataDir, SqliteStore, Bootstrap) {
        let data_dir = DataDir::open(home).unwrap();
        let store = SqliteStore::open(&home.join("caracal.db")).unwrap();
        let bootstrap = bootstrap(&data_dir, &store).await.unwrap();
        (data_dir, store, bootstrap)
    }

    #[tokio::test]
    async fn first_start_mints_later_starts_reuse() {
        let parent = tempfile::tempdir().unwrap();
        let home = parent.path().join("home");
        let (data_dir, store, first) = start(&home).await;
        let BootstrapToken::Minted(token) = first.admin_token else {
            panic!("first start must mint a token");
        };
        let file = data_dir.read_file(ADMIN_TOKEN_FILE).unwrap().unwrap();
        assert_eq!(file.trim_end(), token.expose());
        let stored: String = store
            .run_blocking(|c| {
                c.query_row("SELECT token_sha256 FROM admin_tokens", [], |r| r.get(0))
            })
            .unwrap();
        assert_eq!(stored, token.digest().as_str());
        let database = std::fs::read(home.join("caracal.db")).unwrap();
        let plaintext = token.expose().as_bytes();
        assert!(
            !database
                .windows(plaintext.len())
                .any(|window| window == plaintext)
        );
        let kek_id = first.kek.key_id().to_owned();
        drop((data_dir, store));

        let (_data_dir, _store, second) = start(&home).await;
        assert!(matches!(second.admin_token, BootstrapToken::Existing));
        assert_eq!(second.kek.key_id(), kek_id);
    }

    #[tokio::test]
    async fn a_foreign_or_missing_kek_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let home = parent.path().join("home");
        drop(start(&home).await);
        std::fs::write(home.join(KEK_FILE), Kek::generate().unwrap().to_file_text()).unwrap();
        let data_dir = DataDir::open(&home).unwrap();
        let store = SqliteStore::open(&home.join("caracal.db")).unwrap();
        let error = bootstrap(&data_dir, &store).await.unwrap_err();
        assert!(
            matches!(error, BootstrapError::KekMismatch { .. }),
            "{error}"
        );
        std::fs::remove_file(home.join(KEK_FILE)).unwrap();
        let error = bootstrap(&data_dir, &store).await.unwrap_err();
        assert!(
            matches!(error, BootstrapError::KekMissing { .. }),
            "{error}"
        );
    }
}
