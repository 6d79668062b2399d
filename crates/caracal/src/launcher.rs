//! `caracal run -- <command>`: start a program with its workload's credentials in its
//! environment and nothing else of the caller's secrets. The workload (a launcher identity the
//! admin API keeps, with env bindings) authenticates at the STS with its id and `ws_` secret;
//! `POST /v1/run/manifest` names its bindings and `POST /v1/run/credential` releases each one
//! the policy allows. The child gets an allowlist of the host's variables plus the bound ones,
//! runs without a shell, receives the signals the launcher receives, and its exit status is the
//! launcher's. Credentials are fetched once and never renewed.
//!
//! Exit codes: the child's; 128 + N when a signal N ended it; 1 when anything before the
//! spawn failed (identity, the STS, a required binding); 127 when the program cannot start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use caracal_services::sts::run::{Binding, check_env_name};
use serde_json::Value;

const EXIT_PRE_SPAWN: u8 = 1;
const EXIT_NOT_STARTED: u8 = 127;

/// The host's variables a child keeps: what a program needs to find itself, its locale and its
/// terminal. Everything else — tokens, the workload's own secret — stays behind.
fn host_variable_kept(name: &str) -> bool {
    const KEPT: [&str; 17] = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "TMPDIR",
        "TMP",
        "TEMP",
        "LANG",
        "TERM",
        "COLORTERM",
        "NO_COLOR",
        "FORCE_COLOR",
        "CLICOLOR",
        "CI",
        "NODE_ENV",
        "CARACAL_ENV",
    ];
    KEPT.contains(&name) || name.starts_with("LC_") || name.starts_with("XDG_")
}

/// Who the launcher is: `CARACAL_WORKLOAD_ID`, and exactly one of `CARACAL_WORKLOAD_SECRET`
/// and `CARACAL_WORKLOAD_SECRET_FILE`; with neither, outside `CARACAL_ENV=production`, the
/// owner-only file `$CARACAL_HOME/runtime/<workload id>/secret`.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub workload_id: String,
    pub secret: String,
}

pub fn identity(env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Identity> {
    let workload_id = env("CARACAL_WORKLOAD_ID")
        .filter(|id| !id.is_empty())
        .context("CARACAL_WORKLOAD_ID is not set")?;
    let secret = match (
        env("CARACAL_WORKLOAD_SECRET").filter(|secret| !secret.is_empty()),
        env("CARACAL_WORKLOAD_SECRET_FILE").filter(|path| !path.is_empty()),
    ) {
        (Some(secret), None) => secret,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .with_context(|| format!("CARACAL_WORKLOAD_SECRET_FILE `{path}` is unreadable"))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        (Some(_), Some(_)) => {
            bail!("set one of CARACAL_WORKLOAD_SECRET and CARACAL_WORKLOAD_SECRET_FILE, not both")
        }
        (None, None) => local_secret(env, &workload_id)?,
    };
    Ok(Identity {
        workload_id,
        secret,
    })
}

/// A developer machine's secret file, `$CARACAL_HOME/runtime/<workload id>/secret`: never in
/// production, and only if nobody but its owner can read it.
fn local_secret(env: &dyn Fn(&str) -> Option<String>, workload_id: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let unset = "CARACAL_WORKLOAD_SECRET or CARACAL_WORKLOAD_SECRET_FILE must be set";
    if env("CARACAL_ENV").as_deref() == Some("production") {
        bail!("{unset} (CARACAL_ENV=production reads no secret file by default)");
    }
    if !caracal_core::is_plain_id(workload_id) {
        bail!("CARACAL_WORKLOAD_ID `{workload_id}` is not a workload id");
    }
    let home = env("CARACAL_HOME")
        .filter(|home| !home.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| env("HOME").map(|home| std::path::Path::new(&home).join(".caracal")))
        .context(unset)?;
    let path = home.join("runtime").join(workload_id).join("secret");
    let metadata = match std::fs::metadata(&path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("{unset}, or the secret be in {}", path.display())
        }
        Err(error) => return Err(error).with_context(|| path.display().to_string()),
    };
    if metadata.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by others than its owner (chmod 600 it)",
            path.display()
        );
    }
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("{} is unreadable", path.display()))?
        .trim_end_matches(['\r', '\n'])
        .to_owned())
}

/// The STS's address and path prefix, from an `http://host[:port][/prefix]` URL.
async fn sts_address(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("the STS URL `{url}` is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("the STS URL `{url}` must be http:// (put TLS in front of the STS)");
    }
    let host = uri.host().context("the STS URL names no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let address = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve `{host}`"))?
        .next()
        .with_context(|| format!("`{host}` has no address"))?;
    Ok((address, uri.path().trim_end_matches('/').to_owned()))
}

/// One form POST to the STS: its status and JSON answer.
async fn post(
    sts: &(SocketAddr, String),
    route: &str,
    launch_id: &str,
    fields: &[(&str, &str)],
) -> anyhow::Result<(http::StatusCode, Value)> {
    let body = serde_urlencoded::to_string(fields)?;
    crate::admin_http::send(
        sts.0,
        http::Method::POST,
        &format!("{}{route}", sts.1),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-caracal-launch-id", launch_id),
        ],
        body,
    )
    .await
    .with_context(|| format!("the STS at {} did not answer", sts.0))
}

fn refusal(status: http::StatusCode, answer: &Value) -> String {
    let code = answer
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("error");
    let description = answer
        .get("error_description")
        .and_then(Value::as_str)
        .unwrap_or_default();
    format!("{status} {code}: {description}")
}

/// The variables the bindings set: each binding's credential, and `<ENV>_EXPIRES_AT` when the
/// STS gave one. A required binding that fails stops the launch; an optional one with
/// `on_failure: warn` is skipped with a line on stderr.
async fn credentials(
    sts: &(SocketAddr, String),
    identity: &Identity,
    launch_id: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let auth = [
        ("workload_id", identity.workload_id.as_str()),
        ("secret", identity.secret.as_str()),
    ];
    let (status, manifest) = post(sts, "/v1/run/manifest", launch_id, &auth).await?;
    if !status.is_success() {
        bail!(
            "the STS refused the workload: {}",
            refusal(status, &manifest)
        );
    }
    let bindings: Vec<Binding> = manifest
        .get("bindings")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .context("the STS's manifest does not parse")?
        .unwrap_or_default();
    let mut variables = BTreeMap::new();
    for binding in &bindings {
        // The STS's word is not enough to set a variable that changes what runs.
        if let Err(problem) = check_env_name(&binding.env) {
            bail!("the manifest binds `{}`: {problem}", binding.env);
        }
        let mut fields = auth.to_vec();
        fields.push(("env", binding.env.as_str()));
        let (status, answer) = post(sts, "/v1/run/credential", launch_id, &fields).await?;
        let credential = answer.get("credential").and_then(Value::as_str);
        match credential {
            Some(credential) if status.is_success() => {
                variables.insert(binding.env.clone(), credential.to_owned());
                if let Some(expires_at) = answer.get("expires_at").and_then(Value::as_i64) {
                    variables.insert(
                        format!("{}_EXPIRES_AT", binding.env),
                        expires_at.to_string(),
                    );
                }
            }
            _ if binding.optional && binding.on_failure == "warn" => {
                eprintln!(
                    "caracal run: optional credential skipped: {} ({})",
                    binding.env,
                    refusal(status, &answer)
                );
            }
            _ => bail!(
                "no credential for {}: {}",
                binding.env,
                refusal(status, &answer)
            ),
        }
    }
    Ok(variables)
}

/// The child's environment: the kept host variables, then the bound ones.
pub fn child_environment(
    host: impl Iterator<Item = (String, String)>,
    bound: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut environment: BTreeMap<String, String> =
        host.filter(|(name, _)| host_variable_kept(name)).collect();
    environment.extend(
        bound
            .iter()
            .map(|(name, value)| (name.clone(), value.clone())),
    );
    environment
}

pub async fn run(sts_url: &str, command: &[String]) -> ExitCode {
    let Some((program, arguments)) = command.split_first() else {
        eprintln!("error: caracal run needs a command after `--`");
        return ExitCode::from(EXIT_PRE_SPAWN);
    };
    let prepared = async {
        let identity = identity(&|name| std::env::var(name).ok())?;
        let sts = sts_address(sts_url).await?;
        let launch_id = uuid::Uuid::now_v7().to_string();
        credentials(&sts, &identity, &launch_id).await
    };
    let bound = match prepared.await {
        Ok(bound) => bound,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(EXIT_PRE_SPAWN);
        }
    };
    let environment = child_environment(std::env::vars(), &bound);
    // Listening before the start: a signal in between must reach the child, not end us alone.
    let signals = match Signals::listen() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("error: cannot listen for signals: {error}");
            return ExitCode::from(EXIT_PRE_SPAWN);
        }
    };
    let mut child = match tokio::process::Command::new(program)
        .args(arguments)
        .env_clear()
        .envs(&environment)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            eprintln!("error: cannot start `{program}`: {error}");
            return ExitCode::from(EXIT_NOT_STARTED);
        }
    };
    match supervise(&mut child, signals).await {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_PRE_SPAWN)
        }
    }
}

/// The signals the launcher passes on.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
        })
    }
}

/// Waits for the child, passing it every SIGINT, SIGTERM, SIGHUP and SIGQUIT the launcher
/// receives; its exit code, or 128 + the signal that ended it.
async fn supervise(child: &mut tokio::process::Child, mut signals: Signals) -> anyhow::Result<u8> {
    use std::os::unix::process::ExitStatusExt as _;

    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
        .context("the child has no process id")?;
    let status = loop {
        let forwarded = tokio::select! {
            status = child.wait() => break status?,
            _ = signals.interrupt.recv() => rustix::process::Signal::INT,
            _ = signals.terminate.recv() => rustix::process::Signal::TERM,
            _ = signals.hangup.recv() => rustix::process::Signal::HUP,
            _ = signals.quit.recv() => rustix::process::Signal::QUIT,
        };
        // The child may have just exited; its status comes from `wait` on the next turn.
        let _ = rustix::process::kill_process(pid, forwarded);
    };
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(EXIT_PRE_SPAWN),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(143),
        (None, None) => 143,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests stop loudly")]
mod tests {
    use std::collections::BTreeMap;

    use super::{Identity, child_environment, identity};

    #[test]
    fn the_identity_is_the_id_and_exactly_one_secret_source() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("secret");
        std::fs::write(&file, "ws_from_file\n").unwrap();
        let file = file.to_str().unwrap().to_owned();
        let with = |pairs: Vec<(&'static str, String)>| {
            let pairs: BTreeMap<&str, String> = pairs.into_iter().collect();
            identity(&move |name| pairs.get(name).cloned())
        };
        assert_eq!(
            with(vec![
                ("CARACAL_WORKLOAD_ID", "wl".into()),
                ("CARACAL_WORKLOAD_SECRET", "ws_1".into())
            ])
            .unwrap(),
            Identity {
                workload_id: "wl".into(),
                secret: "ws_1".into()
            }
        );
        assert_eq!(
            with(vec![
                ("CARACAL_WORKLOAD_ID", "wl".into()),
                ("CARACAL_WORKLOAD_SECRET_FILE", file.clone())
            ])
            .unwrap()
            .secret,
            "ws_from_file"
        );
        for refused in [
            vec![("CARACAL_WORKLOAD_SECRET", "ws_1".into())],
            vec![("CARACAL_WORKLOAD_ID", "wl".into())],
            vec![
                ("CARACAL_WORKLOAD_ID", "wl".into()),
                ("CARACAL_WORKLOAD_SECRET", "ws_1".into()),
                ("CARACAL_WORKLOAD_SECRET_FILE", file.clone()),
            ],
            vec![
                ("CARACAL_WORKLOAD_ID", "wl".into()),
                ("CARACAL_WORKLOAD_SECRET_FILE", "/no/such/file".into()),
            ],
        ] {
            assert!(with(refused.clone()).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn outside_production_the_secret_may_be_an_owner_only_file_under_the_home() {
        use std::os::unix::fs::PermissionsExt as _;
        let home = tempfile::tempdir().unwrap();
        let directory = home.path().join("runtime/wl");
        std::fs::create_dir_all(&directory).unwrap();
        let file = directory.join("secret");
        std::fs::write(&file, "ws_local\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let home = home.path().to_str().unwrap().to_owned();
        let with = |pairs: Vec<(&'static str, String)>| {
            let pairs: BTreeMap<&str, String> = pairs.into_iter().collect();
            identity(&move |name| pairs.get(name).cloned())
        };
        let base = || {
            vec![
                ("CARACAL_WORKLOAD_ID", "wl".to_owned()),
                ("CARACAL_HOME", home.clone()),
            ]
        };
        assert_eq!(with(base()).unwrap().secret, "ws_local");
        let mut production = base();
        production.push(("CARACAL_ENV", "production".into()));
        let refused = with(production).unwrap_err().to_string();
        assert!(refused.contains("production"), "{refused}");
        let mut escaping = base();
        escaping[0].1 = "../wl".into();
        assert!(with(escaping).is_err(), "an id is not a path");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let refused = with(base()).unwrap_err().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
        std::fs::remove_file(&file).unwrap();
        let refused = with(base()).unwrap_err().to_string();
        assert!(refused.contains("runtime/wl/secret"), "{refused}");
    }

    #[test]
    fn the_child_keeps_only_allowlisted_host_variables_and_its_bindings() {
        let host = [
            ("PATH", "/bin"),
            ("LC_ALL", "C"),
            ("XDG_RUNTIME_DIR", "/run/u"),
            ("CARACAL_WORKLOAD_SECRET", "ws_1"),
            ("CARACAL_ADMIN_TOKEN", "cat_1"),
            ("AWS_SECRET_ACCESS_KEY", "k"),
            ("LD_PRELOAD", "/evil.so"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        let bound: BTreeMap<String, String> = [("BILLING_KEY".to_owned(), "sk".to_owned())].into();
        let environment = child_environment(host.into_iter(), &bound);
        assert_eq!(
            environment.keys().collect::<Vec<_>>(),
            ["BILLING_KEY", "LC_ALL", "PATH", "XDG_RUNTIME_DIR"]
        );
    }
}
