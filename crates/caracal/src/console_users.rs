//! `caracal console add-user`: a local operator account of the console. The password is stored
//! Argon2id-hashed; the account acts through an admin token of its own (global, `read` or
//! `write,approve`), minted here, stored as a digest like every token, its plaintext sealed
//! under the KEK beside the account for the console to open at sign-in. Revoking that token
//! (`DELETE /v1/admin-tokens/{id}`) disables the account.

use anyhow::{Context as _, bail};
use caracal_services::Settings;

use crate::cli::ConsoleCommand;

/// Shortest password accepted.
const MIN_PASSWORD: usize = 12;

pub async fn run(settings: &Settings, command: &ConsoleCommand) -> anyhow::Result<bool> {
    match command {
        ConsoleCommand::AddUser {
            email,
            capability,
            password_file,
        } => add_user(settings, email, capability, password_file.as_deref()).await,
    }
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email
            .chars()
            .all(|character| !character.is_whitespace() && !character.is_control())
        && !email.contains(['<', '>', '"', '\''])
}

async fn add_user(
    settings: &Settings,
    email: &str,
    capability: &str,
    password_file: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let email = email.trim().to_ascii_lowercase();
    if !valid_email(&email) {
        bail!("`{email}` is not an email address");
    }
    let capabilities = match capability {
        "read" => "read",
        "write" => "write,approve",
        other => bail!("--capability must be read or write, not `{other}`"),
    };
    let password = match password_file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line
        }
    };
    let password = password.trim_end_matches(['\r', '\n']).to_owned();
    if password.chars().count() < MIN_PASSWORD {
        bail!("the password must have at least {MIN_PASSWORD} characters");
    }
    let kek_text = std::fs::read_to_string(settings.home.join(caracal_store::KEK_FILE))
        .context("the deployment KEK (it seals the account's token)")?;
    let kek = caracal_crypto::Kek::from_file_text(&kek_text)
        .map_err(|error| anyhow::anyhow!("the KEK file: {error}"))?;
    let password_hash = tokio::task::spawn_blocking(move || caracal_crypto::hash_secret(&password))
        .await?
        .map_err(|error| anyhow::anyhow!("hashing the password: {error}"))?;
    let token = caracal_crypto::AdminToken::generate()?;
    let token_envelope = kek
        .seal(
            caracal_services::console::USER_TOKEN_PURPOSE,
            token.expose().as_bytes(),
        )
        .map_err(|error| anyhow::anyhow!("sealing the account's token: {error}"))?;
    let token_id = uuid::Uuid::now_v7().to_string();
    let store = crate::audit::open_store(settings).await?;
    let created = store
        .create_console_user(
            &caracal_store::ConsoleUser {
                email: email.clone(),
                password_hash,
                token_envelope,
                token_id: token_id.clone(),
                kek_id: kek.key_id().to_owned(),
                created_at_ms: caracal_store::now_ms(),
            },
            &caracal_store::NewAdminToken {
                id: token_id.clone(),
                name: format!("console:{email}"),
                digest: token.digest(),
                scope: caracal_store::TokenScope::Global,
                capabilities: capabilities.to_owned(),
                created_by: "caracal console add-user".to_owned(),
            },
        )
        .await;
    match created {
        Ok(()) => {
            println!("added {email} ({capability}); its admin token is {token_id}");
            Ok(true)
        }
        Err(caracal_store::StoreError::Conflict(_)) => {
            println!("{email} already has an account");
            Ok(false)
        }
        Err(error) => Err(error.into()),
    }
}
