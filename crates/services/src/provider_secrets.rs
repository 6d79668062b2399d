//! Provider secrets in clear, for the two places allowed to see them: the admin API's audited
//! reveal and the STS's upstream directive to an authenticated Gateway.

use std::collections::BTreeMap;

use caracal_store::{Provider, SealedSecret, StoreError, now_ms};

use crate::state::Shared;

/// What a provider secret is sealed for: an envelope opens only for this purpose.
pub const SECRET_PURPOSE: &str = "provider-secret";

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a provider secret does not open under the loaded KEK")]
    Unopenable,
}

/// `value` sealed under the KEK for `purpose`, as the secret `secret_ref` of `zone_id`.
pub fn sealed(
    shared: &Shared,
    zone_id: &str,
    secret_ref: String,
    purpose: &str,
    value: &str,
) -> Result<SealedSecret, caracal_crypto::EnvelopeError> {
    Ok(SealedSecret {
        zone_id: zone_id.to_owned(),
        secret_ref,
        purpose: purpose.to_owned(),
        kek_id: shared.kek.key_id().to_owned(),
        envelope: shared.kek.seal(purpose, value.as_bytes())?,
        version: 0,
        updated_at_ms: now_ms(),
    })
}

/// `provider`'s secrets by configuration key.
pub async fn open(
    shared: &Shared,
    provider: &Provider,
) -> Result<BTreeMap<String, String>, OpenError> {
    let mut secrets = BTreeMap::new();
    for reference in &provider.secret_refs {
        let Some(sealed) = shared
            .store
            .get_sealed_secret(&provider.zone_id, reference)
            .await?
        else {
            continue;
        };
        let plaintext = shared
            .kek
            .open(SECRET_PURPOSE, &sealed.envelope)
            .map_err(|error| {
                tracing::error!(%error, reference, "a provider secret does not open");
                OpenError::Unopenable
            })?;
        let key = reference.rsplit('/').next().unwrap_or_default().to_owned();
        secrets.insert(key, String::from_utf8_lossy(&plaintext).into_owned());
    }
    Ok(secrets)
}
