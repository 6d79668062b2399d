//! Store URLs: `sqlite://PATH` (embedded) or `postgres://…` (production).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    #[error("store URL `{0}` has an unknown scheme (accepted: sqlite://PATH, postgres://…)")]
    UnknownScheme(String),
    #[error("store URL `sqlite://` needs a file path")]
    EmptyPath,
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreUrlError::EmptyPath);
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(text.to_owned()));
        }
        Err(StoreUrlError::UnknownScheme(redact_url(text)))
    }
}

impl fmt::Display for StoreUrl {
    /// Prints the URL with any password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            StoreUrl::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

/// Replaces the password of a `scheme://user:password@host…` URL with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_schemes() {
        assert_eq!(
            "sqlite:///var/lib/caracal.db".parse::<StoreUrl>(),
            Ok(StoreUrl::Sqlite(PathBuf::from("/var/lib/caracal.db")))
        );
        assert!(matches!(
            "postgres://u@h/db".parse::<StoreUrl>(),
            Ok(StoreUrl::Postgres(_))
        ));
        assert_eq!(
            "sqlite://".parse::<StoreUrl>(),
            Err(StoreUrlError::EmptyPath)
        );
        assert_eq!(
            "mysql://root:pw@h/db".parse::<StoreUrl>(),
            Err(StoreUrlError::UnknownScheme("mysql://root:***@h/db".into()))
        );
    }

    #[test]
    fn passwords_are_redacted() {
        let cases = [
            (
                "postgres://caracal:s3cret@db:5432/caracal",
                "postgres://caracal:***@db:5432/caracal",
            ),
            (
                "redis://:s3cret@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            (
                "postgres://caracal@db/caracal",
                "postgres://caracal@db/caracal",
            ),
            ("postgres://db/x?password=no", "postgres://db/x?password=no"),
            ("embedded", "embedded"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected);
        }
        let url: StoreUrl = "postgresql://a:b@c/d".parse().unwrap();
        assert_eq!(
            format!("{url} {url:?}"),
            "postgresql://a:***@c/d StoreUrl(postgresql://a:***@c/d)"
        );
    }
}
