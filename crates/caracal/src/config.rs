//! Effective configuration: flags > `CARACAL_*` environment > `$CARACAL_HOME/caracal.toml` >
//! defaults, each value remembered with its source, then validated into [`Settings`] before
//! anything is bound or written.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use caracal_core::Role;
use caracal_services::{BusUrl, Settings};
use caracal_store::StoreUrl;

use crate::cli::Overrides;

/// Where a value came from, for `caracal config show` and for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(&'static str),
    File(PathBuf),
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Env(name) => write!(f, "env {name}"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Default => f.write_str("default"),
        }
    }
}

/// A configuration problem; the CLI exits with code 2 and prints it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value `{value}` for `{key}` (from {origin}): expected {accepted}")]
    Invalid {
        key: String,
        value: String,
        origin: Source,
        accepted: String,
    },
    #[error("unknown configuration key `{key}` in {path} (accepted: {accepted})")]
    UnknownKey {
        key: String,
        path: PathBuf,
        accepted: String,
    },
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("no data directory: set --home or CARACAL_HOME (HOME is not set either)")]
    NoHome,
}

/// One setting: its canonical key, the variables and flag that set it, and what it accepts.
struct Key {
    name: &'static str,
    env: &'static [&'static str],
    flag: &'static str,
    accepted: &'static str,
    redact: Redact,
}

/// How a value is shown by `config show` and in error messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Redact {
    Nothing,
    /// Only the password of a URL.
    UrlPassword,
    /// The whole value.
    Everything,
}

impl Redact {
    fn apply(self, value: &str) -> String {
        match self {
            Redact::Nothing => value.to_owned(),
            Redact::UrlPassword => caracal_store::redact_url(value),
            Redact::Everything if value.is_empty() => String::new(),
            Redact::Everything => "***".to_owned(),
        }
    }
}

const fn key(
    name: &'static str,
    env: &'static [&'static str],
    flag: &'static str,
    accepted: &'static str,
) -> Key {
    Key {
        name,
        env,
        flag,
        accepted,
        redact: Redact::Nothing,
    }
}

const PORT: &str = "a port number 0-65535 (0 picks a free port)";

const KEYS: &[Key] = &[
    key(
        "bind",
        &["CARACAL_BIND"],
        "--bind",
        "an IP address such as 127.0.0.1",
    ),
    Key {
        redact: Redact::UrlPassword,
        ..key(
            "store",
            &["CARACAL_STORE_URL"],
            "--store",
            "sqlite://PATH or postgres://…",
        )
    },
    Key {
        redact: Redact::UrlPassword,
        ..key(
            "bus",
            &["CARACAL_BUS_URL"],
            "--bus",
            "embedded, redis://… or rediss://…",
        )
    },
    key(
        "store_pool_size",
        &["CARACAL_STORE_POOL_SIZE"],
        "--store-pool-size",
        "a connection count 1-1024",
    ),
    key(
        "store_schema",
        &["CARACAL_STORE_SCHEMA"],
        "--store-schema",
        "a PostgreSQL schema name of lower-case letters, digits and _ (empty: the search path)",
    ),
    key(
        "store_statement_timeout_ms",
        &["CARACAL_STORE_STATEMENT_TIMEOUT_MS"],
        "--store-statement-timeout-ms",
        "milliseconds 100-600000",
    ),
    Key {
        redact: Redact::Everything,
        ..key(
            "stream_key",
            &["CARACAL_STREAM_KEY"],
            "--stream-key",
            "at least 64 hex characters (32 bytes)",
        )
    },
    Key {
        redact: Redact::Everything,
        ..key(
            "metrics_bearer",
            &["CARACAL_METRICS_BEARER"],
            "--metrics-bearer",
            "16 to 256 visible ASCII characters (empty: /metrics is open)",
        )
    },
    Key {
        redact: Redact::Everything,
        ..key(
            "stream_key_previous",
            &["CARACAL_STREAM_KEY_PREVIOUS"],
            "--stream-key-previous",
            "at least 64 hex characters (32 bytes)",
        )
    },
    key(
        "issuer_url",
        &["CARACAL_ISSUER_URL"],
        "--issuer-url",
        "an http:// or https:// URL without query or fragment",
    ),
    key("ports.api", &["CARACAL_API_PORT"], "--port api=", PORT),
    key(
        "ports.console",
        &["CARACAL_CONSOLE_PORT"],
        "--port console=",
        PORT,
    ),
    key(
        "ports.coordinator",
        &["CARACAL_COORDINATOR_PORT"],
        "--port coordinator=",
        PORT,
    ),
    key("ports.sts", &["CARACAL_STS_PORT"], "--port sts=", PORT),
    key(
        "ports.gateway",
        &["CARACAL_GATEWAY_PORT"],
        "--port gateway=",
        PORT,
    ),
    key(
        "ports.audit",
        &["CARACAL_AUDIT_PORT"],
        "--port audit=",
        PORT,
    ),
    key(
        "log.format",
        &["CARACAL_LOG_FORMAT"],
        "--log-format",
        "text or json",
    ),
    key(
        "log.filter",
        &["CARACAL_LOG", "RUST_LOG"],
        "--log",
        "a RUST_LOG-style filter such as info,caracal=debug",
    ),
    key(
        "audit.retention_days",
        &["CARACAL_AUDIT_RETENTION_DAYS"],
        "--audit-retention-days",
        "whole days 1-36500, or 0 to keep every audit row",
    ),
    key(
        "audit.reclaim_idle_seconds",
        &["CARACAL_AUDIT_RECLAIM_IDLE_SECONDS"],
        "--audit-reclaim-idle-seconds",
        "seconds an audit event read but not stored waits before it is delivered again (eight deliveries, then the DLQ), 1-3600",
    ),
    key(
        "peers",
        &["CARACAL_PEERS"],
        "--peers",
        "roles of other processes as role=host:port, comma-separated (e.g. sts=10.0.0.2:8081); empty for none",
    ),
    key(
        "console.secure_cookies",
        &["CARACAL_CONSOLE_SECURE_COOKIES"],
        "--console-secure-cookies",
        "true when the console is reached over HTTPS (its cookies then carry Secure), else false",
    ),
    key(
        "control.enabled",
        &["CARACAL_CONTROL_ENABLED"],
        "--control-enabled",
        "true to let control keys run catalog commands at POST /v1/control/invoke, else false",
    ),
    key(
        "sts.mint_rate_limit_per_minute",
        &["CARACAL_STS_MINT_RATE_LIMIT_PER_MINUTE"],
        "--mint-rate-limit-per-minute",
        "mints a minute per zone, resource and application, 1-10000000",
    ),
    key(
        "coordinator.max_depth",
        &["CARACAL_COORDINATOR_MAX_DEPTH"],
        "--coordinator-max-depth",
        "session tree depth, 1-100",
    ),
    key(
        "coordinator.max_children",
        &["CARACAL_COORDINATOR_MAX_CHILDREN"],
        "--coordinator-max-children",
        "live children per session, 1-10000",
    ),
    key(
        "coordinator.sessions_per_zone",
        &["CARACAL_COORDINATOR_SESSIONS_PER_ZONE"],
        "--coordinator-sessions-per-zone",
        "live sessions per zone, 1-10000000",
    ),
    key(
        "coordinator.sessions_per_application",
        &["CARACAL_COORDINATOR_SESSIONS_PER_APPLICATION"],
        "--coordinator-sessions-per-application",
        "live sessions per application, 1-10000000",
    ),
    key(
        "coordinator.retention_days",
        &["CARACAL_COORDINATOR_RETENTION_DAYS"],
        "--coordinator-retention-days",
        "whole days 2-36500 ended sessions, edges and expired authority records are kept",
    ),
    key(
        "shutdown_grace_seconds",
        &["CARACAL_SHUTDOWN_GRACE_SECONDS"],
        "--shutdown-grace-seconds",
        "whole seconds 1-3600",
    ),
    key(
        "gateway.sts_url",
        &["CARACAL_GATEWAY_STS_URL"],
        "--gateway-sts-url",
        "the STS's http:// base URL, used when the STS runs in another process; empty means issuer_url",
    ),
    key(
        "gateway.upstream_host_allowlist",
        &["CARACAL_GATEWAY_UPSTREAM_HOST_ALLOWLIST"],
        "--gateway-upstream-host-allowlist",
        "comma-separated host names the Gateway may dial; empty allows any host",
    ),
    key(
        "gateway.max_request_bytes",
        &["CARACAL_GATEWAY_MAX_REQUEST_BYTES"],
        "--gateway-max-request-bytes",
        "request body bytes, 1-1073741824",
    ),
    key(
        "gateway.upstream_timeout_seconds",
        &["CARACAL_GATEWAY_UPSTREAM_TIMEOUT_SECONDS"],
        "--gateway-upstream-timeout-seconds",
        "seconds for the upstream's response head, 1-600",
    ),
    key(
        "gateway.stream_idle_timeout_seconds",
        &["CARACAL_GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS"],
        "--gateway-stream-idle-timeout-seconds",
        "seconds a response body may stay silent, 1-3600",
    ),
    key(
        "gateway.revocation_freshness_seconds",
        &["CARACAL_GATEWAY_REVOCATION_FRESHNESS_SECONDS"],
        "--gateway-revocation-freshness-seconds",
        "seconds after which an unconfirmed revocation view refuses every call, 31-3600",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration plus the provenance of each value.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub settings: Settings,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// `(key, shown value, source)` in display order; secrets already redacted.
    pub shown: Vec<(String, String, Source)>,
}

/// Resolves and validates the configuration. `env` reads one environment variable; it is a
/// parameter so tests can supply an environment without touching the process's.
pub fn resolve(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved, ConfigError> {
    let (home, home_source) = match (&overrides.home, env("CARACAL_HOME")) {
        (Some(path), _) => (path.clone(), Source::Flag("--home")),
        (None, Some(path)) if !path.is_empty() => {
            (PathBuf::from(path), Source::Env("CARACAL_HOME"))
        }
        _ => (
            PathBuf::from(
                env("HOME")
                    .filter(|home| !home.is_empty())
                    .ok_or(ConfigError::NoHome)?,
            )
            .join(".caracal"),
            Source::Default,
        ),
    };
    let (config_path, config_explicit) = match (&overrides.config, env("CARACAL_CONFIG")) {
        (Some(path), _) => (path.clone(), true),
        (None, Some(path)) if !path.is_empty() => (PathBuf::from(path), true),
        _ => (home.join("caracal.toml"), false),
    };
    let file_values = read_file(&config_path, config_explicit)?;
    let flag_values = flag_values(overrides)?;

    let default_store = format!("sqlite://{}", home.join("caracal.db").display());
    let mut raw: BTreeMap<&'static str, (String, Source)> = BTreeMap::new();
    for key in KEYS {
        let value = if let Some(value) = flag_values.get(key.name) {
            (value.clone(), Source::Flag(key.flag))
        } else if let Some((name, value)) = key.env.iter().find_map(|name| {
            env(name)
                .filter(|value| !value.is_empty())
                .map(|value| (*name, value))
        }) {
            (value, Source::Env(name))
        } else if let Some(value) = file_values.get(key.name) {
            (value.clone(), Source::File(config_path.clone()))
        } else {
            (default_value(key.name, &default_store), Source::Default)
        };
        raw.insert(key.name, value);
    }

    let parse = Parser { raw: &raw };
    let mut ports = BTreeMap::new();
    for role in Role::ALL {
        let name = port_key(role);
        ports.insert(role, parse.value(name, |text| text.parse::<u16>().ok())?);
    }
    let gateway = gateway_config(&parse)?;
    let settings = Settings {
        gateway,
        home: home.clone(),
        bind: parse.value("bind", |text| text.parse::<IpAddr>().ok())?,
        ports,
        store: parse.value("store", |text| text.parse::<StoreUrl>().ok())?,
        bus: parse.value("bus", |text| text.parse::<BusUrl>().ok())?,
        issuer_url: parse.value("issuer_url", parse_issuer_url)?,
        shutdown_grace: parse.value("shutdown_grace_seconds", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|seconds| (1..=3600).contains(seconds))
                .map(Duration::from_secs)
        })?,
        audit_retention: parse.value("audit.retention_days", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|days| *days <= 36_500)
                .map(|days| (days > 0).then(|| Duration::from_secs(days * 86_400)))
        })?,
        peers: parse.value("peers", parse_peers)?,
        console_secure_cookies: parse.value("console.secure_cookies", |text| match text {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        })?,
        control_enabled: parse.value("control.enabled", |text| match text {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        })?,
        audit_reclaim_idle: parse.value("audit.reclaim_idle_seconds", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|seconds| (1..=3600).contains(seconds))
                .map(Duration::from_secs)
        })?,
        coordinator_max_depth: parse.value("coordinator.max_depth", |text| {
            text.parse::<u64>().ok().filter(|n| (1..=100).contains(n))
        })?,
        coordinator_max_children: parse.value("coordinator.max_children", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|n| (1..=10_000).contains(n))
        })?,
        coordinator_sessions_per_zone: parse.value("coordinator.sessions_per_zone", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|n| (1..=10_000_000).contains(n))
        })?,
        coordinator_sessions_per_application: parse.value(
            "coordinator.sessions_per_application",
            |text| {
                text.parse::<u64>()
                    .ok()
                    .filter(|n| (1..=10_000_000).contains(n))
            },
        )?,
        coordinator_retention: parse.value("coordinator.retention_days", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|days| (2..=36_500).contains(days))
                .map(|days| Duration::from_secs(days * 86_400))
        })?,
        mint_rate_limit_per_minute: parse.value("sts.mint_rate_limit_per_minute", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|limit| (1..=10_000_000).contains(limit))
        })?,
        store_pool_size: parse.value("store_pool_size", |text| {
            text.parse::<usize>()
                .ok()
                .filter(|size| (1..=1024).contains(size))
        })?,
        store_statement_timeout: parse.value("store_statement_timeout_ms", |text| {
            text.parse::<u64>()
                .ok()
                .filter(|millis| (100..=600_000).contains(millis))
                .map(Duration::from_millis)
        })?,
        store_schema: parse.value("store_schema", |text| {
            let valid = text.len() <= 63
                && text
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
            valid.then(|| (!text.is_empty()).then(|| text.to_owned()))
        })?,
        stream_key: parse.key_hex("stream_key")?,
        stream_key_previous: parse.key_hex("stream_key_previous")?,
        metrics_bearer: parse.value("metrics_bearer", |text| match text {
            "" => Some(None),
            text if (16..=256).contains(&text.len())
                && text.bytes().all(|byte| byte.is_ascii_graphic()) =>
            {
                Some(Some(caracal_services::SecretBytes(
                    text.as_bytes().to_vec(),
                )))
            }
            _ => None,
        })?,
    };
    let log_format = parse.value("log.format", |text| match text {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        _ => None,
    })?;
    let log_filter = parse.value("log.filter", |text| {
        tracing_subscriber::EnvFilter::try_new(text)
            .ok()
            .map(|_| text.to_owned())
    })?;

    let mut shown = vec![
        ("home".to_owned(), home.display().to_string(), home_source),
        (
            "config".to_owned(),
            config_path.display().to_string(),
            if config_explicit {
                Source::Flag("--config")
            } else {
                Source::Default
            },
        ),
    ];
    for key in KEYS {
        if let Some((value, source)) = raw.get(key.name) {
            let value = key.redact.apply(value);
            shown.push((key.name.to_owned(), value, source.clone()));
        }
    }
    Ok(Resolved {
        settings,
        log_format,
        log_filter,
        shown,
    })
}

fn port_key(role: Role) -> &'static str {
    match role {
        Role::Api => "ports.api",
        Role::Console => "ports.console",
        Role::Coordinator => "ports.coordinator",
        Role::Sts => "ports.sts",
        Role::Gateway => "ports.gateway",
        Role::Audit => "ports.audit",
    }
}

fn default_value(name: &str, default_store: &str) -> String {
    let port = |role: Role| role.default_port().to_string();
    match name {
        "bind" => "127.0.0.1".to_owned(),
        "store" => default_store.to_owned(),
        "bus" => "embedded".to_owned(),
        "issuer_url" => "http://127.0.0.1:8080".to_owned(),
        "ports.api" => port(Role::Api),
        "ports.console" => port(Role::Console),
        "ports.coordinator" => port(Role::Coordinator),
        "ports.sts" => port(Role::Sts),
        "ports.gateway" => port(Role::Gateway),
        "ports.audit" => port(Role::Audit),
        "log.format" => "text".to_owned(),
        "log.filter" => "info".to_owned(),
        "shutdown_grace_seconds" => "30".to_owned(),
        "audit.retention_days" => "365".to_owned(),
        "audit.reclaim_idle_seconds" => "30".to_owned(),
        "console.secure_cookies" => "false".to_owned(),
        "control.enabled" => "false".to_owned(),
        "peers" => String::new(),
        "sts.mint_rate_limit_per_minute" => "1000".to_owned(),
        "coordinator.max_depth" => "10".to_owned(),
        "coordinator.max_children" => "10".to_owned(),
        "coordinator.sessions_per_zone" => "50".to_owned(),
        "coordinator.sessions_per_application" => "200".to_owned(),
        "coordinator.retention_days" => "30".to_owned(),
        "store_pool_size" => "16".to_owned(),
        "store_statement_timeout_ms" => "5000".to_owned(),
        "gateway.max_request_bytes" => "10485760".to_owned(),
        "gateway.upstream_timeout_seconds" => "30".to_owned(),
        "gateway.stream_idle_timeout_seconds" => "60".to_owned(),
        "gateway.revocation_freshness_seconds" => "70".to_owned(),
        _ => String::new(),
    }
}

struct Parser<'a> {
    raw: &'a BTreeMap<&'static str, (String, Source)>,
}

impl Parser<'_> {
    fn value<T>(&self, name: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T, ConfigError> {
        let key = KEYS.iter().find(|key| key.name == name);
        let (value, source) = self
            .raw
            .get(name)
            .cloned()
            .unwrap_or_else(|| (String::new(), Source::Default));
        parse(&value).ok_or_else(|| ConfigError::Invalid {
            key: name.to_owned(),
            value: key
                .map_or(Redact::Everything, |key| key.redact)
                .apply(&value),
            origin: source,
            accepted: key.map(|key| key.accepted).unwrap_or_default().to_owned(),
        })
    }

    /// A key given as hex (at least 32 bytes); empty is none.
    fn key_hex(&self, name: &str) -> Result<Option<caracal_services::SecretBytes>, ConfigError> {
        self.value(name, |text| match text {
            "" => Some(None),
            text => caracal_services::decode_key_hex(text)
                .map(|key| Some(caracal_services::SecretBytes(key))),
        })
    }
}

/// `role=host:port,…`: every entry a role name and a socket address; empty is none.
fn parse_peers(text: &str) -> Option<Vec<(Role, std::net::SocketAddr)>> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (role, address) = entry.split_once('=')?;
            Some((role.trim().parse().ok()?, address.trim().parse().ok()?))
        })
        .collect()
}

fn gateway_config(
    parse: &Parser<'_>,
) -> Result<caracal_services::gateway::GatewayConfig, ConfigError> {
    let issuer: String = parse.value("issuer_url", parse_issuer_url)?;
    let sts_url: String = parse.value("gateway.sts_url", |text| {
        if text.is_empty() {
            return Some(issuer.clone());
        }
        parse_issuer_url(text).filter(|url| url.starts_with("http://"))
    })?;
    let seconds = |name: &str, range: std::ops::RangeInclusive<u64>| {
        parse.value(name, |text| {
            text.parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .map(Duration::from_secs)
        })
    };
    let mut config = caracal_services::gateway::GatewayConfig::new(sts_url);
    config.host_allowlist = parse.value("gateway.upstream_host_allowlist", |text| {
        let hosts: Vec<String> = text
            .split(',')
            .map(|host| host.trim().to_ascii_lowercase())
            .filter(|host| !host.is_empty())
            .collect();
        hosts
            .iter()
            .all(|host| {
                host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            })
            .then_some(hosts)
    })?;
    config.max_request_bytes = parse.value("gateway.max_request_bytes", |text| {
        text.parse::<u64>()
            .ok()
            .filter(|n| (1..=1 << 30).contains(n))
    })?;
    config.upstream_timeout = seconds("gateway.upstream_timeout_seconds", 1..=600)?;
    config.stream_idle_timeout = seconds("gateway.stream_idle_timeout_seconds", 1..=3600)?;
    config.revocation_freshness = seconds("gateway.revocation_freshness_seconds", 31..=3600)?;
    Ok(config)
}

fn parse_issuer_url(text: &str) -> Option<String> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))?;
    let host = rest.split('/').next().unwrap_or_default();
    let acceptable = !host.is_empty()
        && text.len() <= 2048
        && !text.contains(['?', '#', ' '])
        && text.is_ascii();
    acceptable.then(|| text.trim_end_matches('/').to_owned())
}

/// `--port ROLE=PORT` flags and the single-valued flags, keyed by canonical name.
fn flag_values(overrides: &Overrides) -> Result<BTreeMap<&'static str, String>, ConfigError> {
    let mut values = BTreeMap::new();
    let singles = [
        ("bind", &overrides.bind),
        ("store", &overrides.store),
        ("bus", &overrides.bus),
        ("issuer_url", &overrides.issuer_url),
        ("log.format", &overrides.log_format),
        ("log.filter", &overrides.log),
        ("shutdown_grace_seconds", &overrides.shutdown_grace_seconds),
        ("audit.retention_days", &overrides.audit_retention_days),
        (
            "audit.reclaim_idle_seconds",
            &overrides.audit_reclaim_idle_seconds,
        ),
        ("console.secure_cookies", &overrides.console_secure_cookies),
        ("control.enabled", &overrides.control_enabled),
        ("peers", &overrides.peers),
        (
            "sts.mint_rate_limit_per_minute",
            &overrides.mint_rate_limit_per_minute,
        ),
        ("coordinator.max_depth", &overrides.coordinator_max_depth),
        (
            "coordinator.max_children",
            &overrides.coordinator_max_children,
        ),
        (
            "coordinator.sessions_per_zone",
            &overrides.coordinator_sessions_per_zone,
        ),
        (
            "coordinator.sessions_per_application",
            &overrides.coordinator_sessions_per_application,
        ),
        (
            "coordinator.retention_days",
            &overrides.coordinator_retention_days,
        ),
        ("store_pool_size", &overrides.store_pool_size),
        ("store_schema", &overrides.store_schema),
        (
            "store_statement_timeout_ms",
            &overrides.store_statement_timeout_ms,
        ),
        ("stream_key", &overrides.stream_key),
        ("stream_key_previous", &overrides.stream_key_previous),
        ("metrics_bearer", &overrides.metrics_bearer),
        ("gateway.sts_url", &overrides.gateway_sts_url),
        (
            "gateway.upstream_host_allowlist",
            &overrides.gateway_upstream_host_allowlist,
        ),
        (
            "gateway.max_request_bytes",
            &overrides.gateway_max_request_bytes,
        ),
        (
            "gateway.upstream_timeout_seconds",
            &overrides.gateway_upstream_timeout_seconds,
        ),
        (
            "gateway.stream_idle_timeout_seconds",
            &overrides.gateway_stream_idle_timeout_seconds,
        ),
        (
            "gateway.revocation_freshness_seconds",
            &overrides.gateway_revocation_freshness_seconds,
        ),
    ];
    for (name, value) in singles {
        if let Some(value) = value {
            values.insert(name, value.clone());
        }
    }
    for assignment in &overrides.ports {
        let invalid = || ConfigError::Invalid {
            key: "--port".to_owned(),
            value: assignment.clone(),
            origin: Source::Flag("--port"),
            accepted: "ROLE=PORT with ROLE one of api, console, coordinator, sts, gateway, audit"
                .to_owned(),
        };
        let (role, port) = assignment.split_once('=').ok_or_else(invalid)?;
        let role: Role = role.parse().map_err(|_| invalid())?;
        values.insert(port_key(role), port.to_owned());
    }
    Ok(values)
}

/// Reads `caracal.toml` into canonical `key -> text` pairs. A missing file is fine unless it was
/// named explicitly; an unknown key or a value of the wrong kind is an error.
fn read_file(path: &Path, explicit: bool) -> Result<BTreeMap<String, String>, ConfigError> {
    let file_error = |message: String| ConfigError::File {
        path: path.to_owned(),
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        // Under a home that is missing or not a directory the default file is simply absent;
        // the data-directory check reports the real problem.
        Err(error)
            if !explicit
                && matches!(
                    error.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
        {
            return Ok(BTreeMap::new());
        }
        Err(error) => return Err(file_error(error.to_string())),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| file_error(error.message().to_owned()))?;
    let mut values = BTreeMap::new();
    flatten(&table, "", path, &mut values)?;
    Ok(values)
}

fn flatten(
    table: &toml::Table,
    prefix: &str,
    path: &Path,
    values: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let accepted = || {
        KEYS.iter()
            .map(|key| key.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (name, value) in table {
        let full = format!("{prefix}{name}");
        let known = KEYS.iter().any(|key| key.name == full);
        let is_section = KEYS
            .iter()
            .any(|key| key.name.starts_with(&format!("{full}.")));
        match value {
            toml::Value::Table(inner) if is_section => {
                flatten(inner, &format!("{full}."), path, values)?
            }
            toml::Value::String(text) if known => {
                values.insert(full, text.clone());
            }
            toml::Value::Integer(number) if known => {
                values.insert(full, number.to_string());
            }
            _ if known => {
                return Err(ConfigError::Invalid {
                    value: value.to_string(),
                    origin: Source::File(path.to_owned()),
                    accepted: KEYS
                        .iter()
                        .find(|key| key.name == full)
                        .map(|key| key.accepted)
                        .unwrap_or_default()
                        .to_owned(),
                    key: full,
                });
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: full,
                    path: path.to_owned(),
                    accepted: accepted(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
