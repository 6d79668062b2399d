//! Policy bundles. Compiling a policy set version's documents into one bundle is shared by
//! the admin API (validation, canaries, simulate) and the STS, which holds each zone's active
//! bundle in memory: reloaded when `caracal.policy.invalidate` names the zone and by a
//! periodic poll of the bindings, a failed compile keeping the previous bundle, no binding
//! meaning deny all. Each load is acknowledged in the store, which is what activation status
//! reports as `loaded` or `failed`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use caracal_bus::Streams;
use caracal_policy::{Bundle, Diagnostic, Request, Verdict};
use caracal_store::{PolicyLoad, PolicyVersion, Store, StoreError, now_ms};
use serde::{Deserialize, Serialize};

/// The stream an activation is announced on.
pub const POLICY_INVALIDATE: &str = "caracal.policy.invalidate";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub policy_version_id: String,
}

/// A request and the decision a set version must give it before it may be activated.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub name: String,
    pub request: Request,
    pub expect: Verdict,
}

/// What a policy set version stores: its manifest and its canary cases.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct SetVersionContent {
    pub manifest: Vec<ManifestEntry>,
    #[serde(default)]
    pub canaries: Vec<Canary>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("policy version `{0}` is not in this zone")]
    MissingVersion(String),
    #[error("policy version `{version}` does not compile")]
    Compile {
        version: String,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("the documents do not merge into one bundle")]
    Merge(Vec<Diagnostic>),
    #[error("policy set version `{0}` is stored malformed")]
    Corrupt(String),
}

impl BundleError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            BundleError::Compile { diagnostics, .. } | BundleError::Merge(diagnostics) => {
                diagnostics
            }
            _ => &[],
        }
    }
}

/// Checks a document on a blocking thread: regorus is CPU work (bounded, but not free).
pub async fn compile_document(
    content: String,
) -> Result<caracal_policy::DataDocument, Vec<Diagnostic>> {
    tokio::task::spawn_blocking(move || caracal_policy::compile(&content))
        .await
        .unwrap_or_else(|_| {
            Err(vec![Diagnostic {
                code: "compile_error".to_owned(),
                message: "the compiler stopped".to_owned(),
            }])
        })
}

pub fn set_version_content(version: &PolicyVersion) -> Result<SetVersionContent, BundleError> {
    serde_json::from_str(&version.content).map_err(|_| BundleError::Corrupt(version.id.clone()))
}

/// Compiles the documents a manifest names (all of `zone_id`) into one bundle.
pub async fn compile_manifest(
    store: &dyn Store,
    zone_id: &str,
    manifest: &[ManifestEntry],
) -> Result<Bundle, BundleError> {
    let mut documents = Vec::with_capacity(manifest.len());
    for entry in manifest {
        let version = store
            .get_policy_version(zone_id, &entry.policy_version_id)
            .await?
            .ok_or_else(|| BundleError::MissingVersion(entry.policy_version_id.clone()))?;
        let document = compile_document(version.content.clone())
            .await
            .map_err(|diagnostics| BundleError::Compile {
                version: version.id.clone(),
                diagnostics,
            })?;
        documents.push(document);
    }
    Bundle::merge(&documents).map_err(BundleError::Merge)
}

/// A zone's bundle as one STS replica holds it.
#[derive(Debug)]
pub struct Loaded {
    pub version_id: String,
    pub manifest_sha256: String,
    pub bundle: Bundle,
    pub loaded_at_ms: i64,
}

/// The STS's bundles, by zone. A zone that is absent has no active set: every request denies.
#[derive(Debug, Clone, Default)]
pub struct PolicyCache {
    zones: Arc<RwLock<HashMap<String, Arc<Loaded>>>>,
    /// When every zone was last confirmed against the store (0: never).
    confirmed_at_ms: Arc<std::sync::atomic::AtomicI64>,
    /// Bundles refused at load (the previous one stayed in force).
    pub load_failures: prometheus_client::metrics::counter::Counter,
}

impl PolicyCache {
    pub fn get(&self, zone_id: &str) -> Option<Arc<Loaded>> {
        self.zones
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(zone_id)
            .cloned()
    }

    fn install(&self, zone_id: &str, loaded: Option<Loaded>) {
        let mut zones = self
            .zones
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match loaded {
            Some(loaded) => zones.insert(zone_id.to_owned(), Arc::new(loaded)),
            None => zones.remove(zone_id),
        };
    }

    /// Brings `zone_id` up to its binding. A compile failure keeps the previous bundle and is
    /// acknowledged as `failed`; a store failure changes nothing (the next poll retries).
    pub async fn refresh_zone(
        &self,
        store: &dyn Store,
        zone_id: &str,
        replica: &str,
    ) -> Result<(), StoreError> {
        let Some(binding) = store.policy_binding(zone_id).await? else {
            self.install(zone_id, None);
            return Ok(());
        };
        if self
            .get(zone_id)
            .is_some_and(|loaded| loaded.version_id == binding.active_version_id)
        {
            return Ok(());
        }
        let Some(version) = store
            .get_policy_set_version(zone_id, &binding.active_version_id)
            .await?
        else {
            // The binding names a version that is not there: nothing trustworthy to enforce,
            // so the zone denies everything (fail closed) and the refusal is acknowledged.
            self.install(zone_id, None);
            tracing::error!(zone = zone_id, version = %binding.active_version_id,
                "the active policy set version is missing; the zone denies everything");
            return store
                .record_policy_load(&PolicyLoad {
                    zone_id: zone_id.to_owned(),
                    replica: replica.to_owned(),
                    policy_set_version_id: binding.active_version_id,
                    manifest_sha256: String::new(),
                    status: "failed".to_owned(),
                    detail: "the active policy set version is missing".to_owned(),
                    updated_at_ms: now_ms(),
                })
                .await;
        };
        let compiled = match set_version_content(&version) {
            Ok(content) => compile_manifest(store, zone_id, &content.manifest).await,
            Err(error) => Err(error),
        };
        let (status, detail) = match compiled {
            Ok(bundle) => {
                self.install(
                    zone_id,
                    Some(Loaded {
                        version_id: version.id.clone(),
                        manifest_sha256: version.sha256.clone(),
                        bundle,
                        loaded_at_ms: now_ms(),
                    }),
                );
                ("loaded", String::new())
            }
            Err(BundleError::Store(error)) => return Err(error),
            Err(error) => {
                tracing::error!(zone = zone_id, version = %version.id, %error,
                    "policy bundle refused; the previous bundle stays in force");
                self.load_failures.inc();
                ("failed", error.to_string())
            }
        };
        store
            .record_policy_load(&PolicyLoad {
                zone_id: zone_id.to_owned(),
                replica: replica.to_owned(),
                policy_set_version_id: version.id,
                manifest_sha256: version.sha256,
                status: status.to_owned(),
                detail,
                updated_at_ms: now_ms(),
            })
            .await
    }

    /// Seconds since the bundles were last confirmed against the store (since start, if never):
    /// `caracal_sts_policy_bundle_age_seconds`.
    pub fn age_seconds(&self, now_ms: i64) -> i64 {
        let confirmed = self
            .confirmed_at_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if confirmed == 0 {
            return -1;
        }
        (now_ms - confirmed) / 1000
    }

    /// Refreshes every zone that has a binding, and forgets zones that lost theirs.
    pub async fn refresh_all(&self, store: &dyn Store, replica: &str) -> Result<(), StoreError> {
        let started = now_ms();
        self.refresh_bindings(store, replica).await?;
        self.confirmed_at_ms
            .store(started, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn refresh_bindings(&self, store: &dyn Store, replica: &str) -> Result<(), StoreError> {
        let bindings = store.policy_bindings().await?;
        let known: Vec<String> = self
            .zones
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .cloned()
            .collect();
        for zone_id in known {
            if !bindings.iter().any(|binding| binding.zone_id == zone_id) {
                self.install(&zone_id, None);
            }
        }
        for binding in bindings {
            self.refresh_zone(store, &binding.zone_id, replica).await?;
        }
        Ok(())
    }
}

/// The STS's loader: a full refresh every `poll`, and a zone's refresh as soon as an
/// invalidation names it. The stream is read without a consumer group (every replica needs
/// every message, and nothing is left pending); a message only triggers a reload from the
/// store, so it carries no authority and an unsigned one can do no harm.
pub async fn run_loader(
    cache: PolicyCache,
    store: Arc<dyn Store>,
    streams: Arc<dyn Streams>,
    replica: String,
    poll: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // What is already on the stream is covered by the first full refresh: skip to its end.
    let mut last_entry = caracal_bus::last_entry_id(streams.as_ref(), POLICY_INVALIDATE).await;
    let mut next_full = tokio::time::Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        if tokio::time::Instant::now() >= next_full {
            if let Err(error) = cache.refresh_all(store.as_ref(), &replica).await {
                tracing::warn!(%error, "policy poll failed; bundles stay as they are");
            }
            next_full = tokio::time::Instant::now() + poll;
        }
        match streams
            .range(POLICY_INVALIDATE, last_entry.as_deref(), 256)
            .await
        {
            Ok(entries) => {
                for entry in &entries {
                    if let Some(zone_id) = entry.fields.get("zone_id")
                        && let Err(error) =
                            cache.refresh_zone(store.as_ref(), zone_id, &replica).await
                    {
                        tracing::warn!(%error, zone = %zone_id, "policy reload failed; the poll retries");
                    }
                }
                if let Some(last) = entries.last() {
                    last_entry = Some(last.id.clone());
                }
            }
            Err(error) => tracing::debug!(%error, "policy invalidations unreadable; polling"),
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use caracal_store::prelude::*;
    use caracal_store::{NewZone, PolicyHeader, SqliteStore};

    use super::*;

    const DOCUMENT: &str = "# caracal:data-document\npackage caracal.authz\nimport rego.v1\napp_ids := {\"billing\": \"app-1\"}\ngrants := {\"resource://ledger\": {\"application\": \"billing\", \"roles\": {\"app-1\": [\"ledger:read\"]}}}\n";

    /// A set version over one policy version with `content`, in zone `z`.
    async fn set_version(store: &SqliteStore, n: usize, content: &str) -> String {
        let header = |id: String| PolicyHeader {
            id,
            zone_id: "z".into(),
            name: format!("p{n}"),
            description: String::new(),
            created_at_ms: 1,
            archived_at_ms: None,
        };
        store
            .create_policy(&header(format!("p{n}")), &[])
            .await
            .unwrap();
        store
            .add_policy_version(
                "z",
                &format!("p{n}"),
                &format!("pv{n}"),
                content,
                "sha",
                &[],
            )
            .await
            .unwrap();
        if n == 1 {
            store
                .create_policy_set(&header("s".into()), &[])
                .await
                .unwrap();
        }
        let manifest = format!(r#"{{"manifest":[{{"policy_version_id":"pv{n}"}}],"canaries":[]}}"#);
        store
            .add_policy_set_version(
                "z",
                "s",
                &format!("sv{n}"),
                &manifest,
                &format!("m{n}"),
                &[],
            )
            .await
            .unwrap()
            .id
    }

    #[tokio::test]
    async fn the_sts_loads_the_active_bundle_keeps_it_over_a_bad_one_and_acknowledges_both() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("s.db")).unwrap();
        store
            .create_zone(
                &NewZone {
                    id: "z".into(),
                    name: "z".into(),
                    slug: "z".into(),
                },
                &[],
            )
            .await
            .unwrap();
        let cache = PolicyCache::default();
        cache.refresh_all(&store, "sts-a").await.unwrap();
        assert!(
            cache.get("z").is_none(),
            "no binding: nothing loaded, every request denies"
        );

        let good = set_version(&store, 1, DOCUMENT).await;
        store
            .activate_policy_set_version("z", &good, &[])
            .await
            .unwrap();
        cache.refresh_all(&store, "sts-a").await.unwrap();
        let loaded = cache.get("z").unwrap();
        assert_eq!(loaded.version_id, good);
        assert_eq!(loaded.bundle.app_ids["billing"], "app-1");

        // Stored around the API's checks, a version that does not compile is refused.
        let bad = set_version(&store, 2, "package nothing").await;
        store
            .activate_policy_set_version("z", &bad, &[])
            .await
            .unwrap();
        cache.refresh_zone(&store, "z", "sts-a").await.unwrap();
        assert_eq!(
            cache.get("z").unwrap().version_id,
            good,
            "the previous bundle stays"
        );
        let loads = store.policy_loads("z").await.unwrap();
        assert_eq!(
            loads
                .iter()
                .map(|l| (l.policy_set_version_id.as_str(), l.status.as_str()))
                .collect::<Vec<_>>(),
            [(bad.as_str(), "failed")]
        );
        assert!(
            loads[0].detail.contains("does not compile"),
            "{:?}",
            loads[0]
        );
    }
}
