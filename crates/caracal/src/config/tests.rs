use std::collections::HashMap;

use super::*;

/// A home directory with an optional `caracal.toml`, and an environment to resolve against.
struct Case {
    _directory: tempfile::TempDir,
    env: HashMap<String, String>,
}

impl Case {
    fn new(file: Option<&str>, env: &[(&str, &str)]) -> Case {
        let directory = tempfile::tempdir().unwrap();
        if let Some(text) = file {
            std::fs::write(directory.path().join("caracal.toml"), text).unwrap();
        }
        let mut env: HashMap<String, String> = env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        env.insert(
            "CARACAL_HOME".into(),
            directory.path().display().to_string(),
        );
        Case {
            _directory: directory,
            env,
        }
    }

    fn resolve(&self, overrides: &Overrides) -> Result<Resolved, ConfigError> {
        resolve(overrides, &|name| self.env.get(name).cloned())
    }
}

fn shown<'a>(resolved: &'a Resolved, key: &str) -> (&'a str, String) {
    let (_, value, source) = resolved
        .shown
        .iter()
        .find(|(name, _, _)| name == key)
        .unwrap();
    (value.as_str(), source.to_string())
}

#[test]
fn flags_beat_env_beat_file_beat_defaults() {
    let case = Case::new(
        Some(
            "issuer_url = \"https://file.example\"\nbus = \"embedded\"\n[ports]\ngateway = 9001\nsts = 9002\n[log]\nformat = \"json\"\n",
        ),
        &[
            ("CARACAL_ISSUER_URL", "https://env.example"),
            ("CARACAL_GATEWAY_PORT", "9100"),
        ],
    );
    let overrides = Overrides {
        issuer_url: Some("https://flag.example/".into()),
        ..Overrides::default()
    };
    let resolved = case.resolve(&overrides).unwrap();
    assert_eq!(resolved.settings.issuer_url, "https://flag.example");
    assert_eq!(shown(&resolved, "issuer_url").1, "flag --issuer-url");
    assert_eq!(resolved.settings.port(Role::Gateway), 9100);
    assert_eq!(
        shown(&resolved, "ports.gateway").1,
        "env CARACAL_GATEWAY_PORT"
    );
    assert_eq!(resolved.settings.port(Role::Sts), 9002);
    assert!(shown(&resolved, "ports.sts").1.starts_with("file "));
    assert_eq!(resolved.log_format, LogFormat::Json);
    assert_eq!(resolved.settings.port(Role::Api), 3000);
    assert_eq!(
        shown(&resolved, "ports.api"),
        ("3000", "default".to_owned())
    );
    assert_eq!(resolved.settings.bind.to_string(), "127.0.0.1");

    let without_flag = case.resolve(&Overrides::default()).unwrap();
    assert_eq!(without_flag.settings.issuer_url, "https://env.example");
    let port_flag = Overrides {
        ports: vec!["gateway=0".into()],
        ..Overrides::default()
    };
    assert_eq!(
        case.resolve(&port_flag)
            .unwrap()
            .settings
            .port(Role::Gateway),
        0
    );
}

#[test]
fn defaults_follow_the_home_directory() {
    let case = Case::new(None, &[]);
    let resolved = case.resolve(&Overrides::default()).unwrap();
    let home = resolved.settings.home.clone();
    assert_eq!(
        resolved.settings.store.to_string(),
        format!("sqlite://{}", home.join("caracal.db").display())
    );
    assert_eq!(resolved.settings.issuer_url, "http://127.0.0.1:8080");
    assert_eq!(resolved.log_filter, "info");
    assert_eq!(resolved.settings.shutdown_grace, Duration::from_secs(30));
    assert_eq!(
        resolved.settings.audit_retention,
        Some(Duration::from_secs(365 * 86_400))
    );
    let keep_all = Case::new(Some("[audit]\nretention_days = 0\n"), &[]);
    assert_eq!(
        keep_all
            .resolve(&Overrides::default())
            .unwrap()
            .settings
            .audit_retention,
        None
    );
    let no_home = resolve(&Overrides::default(), &|_| None).unwrap_err();
    assert_eq!(no_home, ConfigError::NoHome);
}

#[test]
fn secrets_are_redacted_in_what_is_shown_and_in_errors() {
    let case = Case::new(
        None,
        &[("CARACAL_STORE_URL", "postgres://caracal:hunter2@db/caracal")],
    );
    let resolved = case.resolve(&Overrides::default()).unwrap();
    let rendered = format!("{:?}", resolved.shown);
    assert!(!rendered.contains("hunter2"), "{rendered}");
    assert_eq!(
        shown(&resolved, "store").0,
        "postgres://caracal:***@db/caracal"
    );
    assert!(!format!("{:?}", resolved.settings).contains("hunter2"));

    let bad = Overrides {
        bus: Some("kafka://user:hunter2@broker".into()),
        ..Overrides::default()
    };
    let error = case.resolve(&bad).unwrap_err().to_string();
    assert!(!error.contains("hunter2"), "{error}");
    assert!(error.contains("`bus`"), "{error}");
}

#[test]
fn bad_input_names_the_key_and_the_accepted_values() {
    type Row<'a> = (
        Option<&'a str>,
        &'a [(&'a str, &'a str)],
        Overrides,
        &'a str,
    );
    let cases: &[Row] = &[
        (
            None,
            &[("CARACAL_API_PORT", "70000")],
            Overrides::default(),
            "invalid value `70000` for `ports.api` (from env CARACAL_API_PORT): expected a port number 0-65535 (0 picks a free port)",
        ),
        (
            None,
            &[],
            Overrides {
                log_format: Some("yaml".into()),
                ..Overrides::default()
            },
            "invalid value `yaml` for `log.format` (from flag --log-format): expected text or json",
        ),
        (
            None,
            &[],
            Overrides {
                ports: vec!["gatway=1".into()],
                ..Overrides::default()
            },
            "invalid value `gatway=1` for `--port` (from flag --port): expected ROLE=PORT with ROLE one of api, console, coordinator, sts, gateway, audit",
        ),
        (
            None,
            &[],
            Overrides {
                issuer_url: Some("ftp://x".into()),
                ..Overrides::default()
            },
            "invalid value `ftp://x` for `issuer_url` (from flag --issuer-url): expected an http:// or https:// URL without query or fragment",
        ),
        (
            None,
            &[("CARACAL_SHUTDOWN_GRACE_SECONDS", "0")],
            Overrides::default(),
            "invalid value `0` for `shutdown_grace_seconds` (from env CARACAL_SHUTDOWN_GRACE_SECONDS): expected whole seconds 1-3600",
        ),
        (
            None,
            &[("CARACAL_AUDIT_RETENTION_DAYS", "-1")],
            Overrides::default(),
            "invalid value `-1` for `audit.retention_days` (from env CARACAL_AUDIT_RETENTION_DAYS): expected whole days 1-36500, or 0 to keep every audit row",
        ),
        (
            None,
            &[],
            Overrides {
                bind: Some("localhost".into()),
                ..Overrides::default()
            },
            "invalid value `localhost` for `bind` (from flag --bind): expected an IP address such as 127.0.0.1",
        ),
        (
            None,
            &[("CARACAL_GATEWAY_REVOCATION_FRESHNESS_SECONDS", "30")],
            Overrides::default(),
            "invalid value `30` for `gateway.revocation_freshness_seconds` (from env CARACAL_GATEWAY_REVOCATION_FRESHNESS_SECONDS): expected seconds after which an unconfirmed revocation view refuses every call, 31-3600",
        ),
        (
            None,
            &[],
            Overrides {
                gateway_sts_url: Some("https://sts.internal".into()),
                ..Overrides::default()
            },
            "invalid value `https://sts.internal` for `gateway.sts_url` (from flag --gateway-sts-url): expected the STS's http:// base URL, used when the STS runs in another process; empty means issuer_url",
        ),
        (
            None,
            &[("CARACAL_GATEWAY_MAX_REQUEST_BYTES", "0")],
            Overrides::default(),
            "invalid value `0` for `gateway.max_request_bytes` (from env CARACAL_GATEWAY_MAX_REQUEST_BYTES): expected request body bytes, 1-1073741824",
        ),
    ];
    for (file, env, overrides, expected) in cases {
        let case = Case::new(*file, env);
        assert_eq!(case.resolve(overrides).unwrap_err().to_string(), *expected);
    }
}

#[test]
fn bad_config_files_are_refused() {
    let unknown = Case::new(Some("[ports]\ngatway = 1\n"), &[]);
    let error = unknown.resolve(&Overrides::default()).unwrap_err();
    assert!(
        matches!(&error, ConfigError::UnknownKey { key, .. } if key == "ports.gatway"),
        "{error}"
    );
    assert!(
        error.to_string().contains("accepted: bind, store, bus"),
        "{error}"
    );

    let home_in_file = Case::new(Some("home = \"/tmp\"\n"), &[]);
    assert!(matches!(
        home_in_file.resolve(&Overrides::default()),
        Err(ConfigError::UnknownKey { .. })
    ));

    let wrong_kind = Case::new(Some("[ports]\napi = true\n"), &[]);
    let error = wrong_kind
        .resolve(&Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("invalid value `true` for `ports.api` (from file "),
        "{error}"
    );

    let broken = Case::new(Some("bind = \n"), &[]);
    assert!(matches!(
        broken.resolve(&Overrides::default()),
        Err(ConfigError::File { .. })
    ));

    let missing = Overrides {
        config: Some("/nonexistent/caracal.toml".into()),
        ..Overrides::default()
    };
    assert!(matches!(
        Case::new(None, &[]).resolve(&missing),
        Err(ConfigError::File { .. })
    ));
}
