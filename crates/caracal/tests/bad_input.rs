//! Bad input at start: usage errors exit 2 and write nothing; runtime refusals exit 1 with a
//! message naming the problem and leave the data untouched.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

mod util;

use std::net::TcpListener;

use util::{Running, caracal, free_ports, fresh_home, run};

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn usage_and_config_errors_exit_2_and_write_nothing() {
    type Row<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Row] = &[
        (&["up", "--no-such-flag"], &[], "--no-such-flag"),
        (
            &["serve", "gatway"],
            &[],
            "unknown role `gatway` (accepted: api, console, coordinator, sts, gateway, audit)",
        ),
        (&["serve"], &[], "<ROLE>"),
        (
            &["up"],
            &[("CARACAL_API_PORT", "http")],
            "invalid value `http` for `ports.api`",
        ),
        (
            &["up", "--store", "mysql://root:pw@db/x"],
            &[],
            "for `store` (from flag --store): expected sqlite://PATH",
        ),
        (&["up", "--log-format", "xml"], &[], "expected text or json"),
        (
            &["up"],
            &[("CARACAL_CONTROL_ENABLED", "yes")],
            "invalid value `yes` for `control.enabled`",
        ),
        (
            &["bench", "--open-rate", "0"],
            &[],
            "a rate of at least 1 request a second",
        ),
        (
            &["bench", "--open-rate", "NaN"],
            &[],
            "a rate of at least 1 request a second",
        ),
        (
            &["bench", "--connections", "32,0"],
            &[],
            "connections from 1 to 1024",
        ),
        (
            &["bench", "--connections", "many"],
            &[],
            "connections from 1 to 1024",
        ),
    ];
    for (args, env, expected) in cases {
        let (_parent, home) = fresh_home();
        let output = run(caracal(&home).args(*args).envs(env.iter().copied()));
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("root:pw"),
            "secrets are redacted: {stderr}"
        );
        assert!(!home.exists(), "{args:?} wrote to the data directory");
    }
}

#[test]
fn an_unknown_config_file_key_exits_2_and_changes_nothing() {
    let (_parent, home) = fresh_home();
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("caracal.toml"), "[ports]\ngatway = 9000\n").unwrap();
    let output = run(caracal(&home).arg("up"));
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown configuration key `ports.gatway`"),
        "{stderr}"
    );
    let entries: Vec<_> = std::fs::read_dir(&home).unwrap().collect();
    assert_eq!(entries.len(), 1, "only the config file is there");
}

#[test]
fn a_port_in_use_names_the_role_and_leaves_nothing_running() {
    let (_parent, home) = fresh_home();
    let occupied = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = occupied.local_addr().unwrap().port();
    let mut args = free_ports();
    args.extend(["--port".to_owned(), format!("sts={port}"), "up".to_owned()]);
    let output = run(caracal(&home).args(&args));
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("sts: cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(!home.exists(), "a failed bind leaves no data behind");
}

#[test]
fn a_postgres_store_needs_a_shared_bus() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.extend(
        [
            "--store",
            "postgres://postgres:pw@127.0.0.1:5432/test",
            "up",
        ]
        .map(String::from),
    );
    let output = run(caracal(&home).args(&args));
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the embedded bus needs the embedded store"),
        "{stderr}"
    );
    assert!(stderr.contains("postgres://postgres:***@"), "{stderr}");
    assert!(!home.exists(), "refused before anything was written");
}

#[test]
fn unreachable_backends_refuse_to_start() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cases = [
        (
            vec![
                "--store".to_owned(),
                format!("postgres://postgres@127.0.0.1:{port}/test"),
                "--bus".to_owned(),
                "redis://127.0.0.1:6379".to_owned(),
            ],
            "store postgres://postgres@127.0.0.1",
        ),
        (
            vec!["--bus".to_owned(), format!("redis://127.0.0.1:{port}")],
            "bus `redis://127.0.0.1",
        ),
    ];
    for (backend, expected) in cases {
        let (_parent, home) = fresh_home();
        let mut args = free_ports();
        args.extend(backend);
        args.push("up".to_owned());
        let output = run(caracal(&home).args(&args));
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn a_locked_data_directory_is_refused() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let first = Running::start(&home, &args);
    let output = run(caracal(&home).args(&args));
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is in use by another caracal process (pid {})",
            first.child.id()
        )),
        "{stderr}"
    );
    let (status, _, _) = first.terminate();
    assert!(status.success(), "the first process was not disturbed");
}

#[test]
fn a_database_from_a_newer_release_is_refused_untouched() {
    let (_parent, home) = fresh_home();
    let mut args = free_ports();
    args.push("up".to_owned());
    let (status, _, _) = Running::start(&home, &args).terminate();
    assert!(status.success());
    let database = home.join("caracal.db");
    let sql =
        "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (999, 'future', 0);";
    let connection = rusqlite::Connection::open(&database).unwrap();
    connection.execute_batch(sql).unwrap();
    connection
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    drop(connection);
    let before = std::fs::read(&database).unwrap();

    let output = run(caracal(&home).args(&args));
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("store schema version 999 is newer than this binary supports"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&database).unwrap(),
        before,
        "the database is unchanged"
    );
}

#[test]
fn an_open_or_foreign_data_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_parent, home) = fresh_home();
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut args = free_ports();
    args.push("up".to_owned());
    let output = run(caracal(&home).args(&args));
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is accessible by other users (mode 0755)"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&home).unwrap().count(),
        0,
        "nothing was written"
    );

    let (_parent, file) = fresh_home();
    std::fs::write(&file, "not a directory").unwrap();
    let output = run(caracal(&file).args(&args));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr_of(&output).contains("is not a directory"),
        "{}",
        stderr_of(&output)
    );
}
