//! Readiness: the named checks behind a role's `/ready`, and the verdict drawn from them.

/// One readiness check. `reason` is a stable snake_case code when the check fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub reason: Option<&'static str>,
}

impl Check {
    pub fn pass(name: &'static str) -> Check {
        Check {
            name,
            ok: true,
            reason: None,
        }
    }

    pub fn fail(name: &'static str, reason: &'static str) -> Check {
        Check {
            name,
            ok: false,
            reason: Some(reason),
        }
    }
}

/// The checks of one role, in the order they ran. A role is ready only if every check passed;
/// a role with no checks at all is not ready (fail closed: nothing vouched for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    checks: Vec<Check>,
}

impl Readiness {
    pub fn new(checks: Vec<Check>) -> Readiness {
        Readiness { checks }
    }

    pub fn is_ready(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|check| check.ok)
    }

    /// The reason of the first failed check: the one operators should look at first.
    pub fn first_reason(&self) -> Option<&'static str> {
        if self.checks.is_empty() {
            return Some("no_checks");
        }
        self.checks
            .iter()
            .find(|check| !check.ok)
            .and_then(|check| check.reason)
    }

    pub fn checks(&self) -> &[Check] {
        &self.checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(checks: Vec<Check>, ready: bool, reason: Option<&str>) {
        let readiness = Readiness::new(checks);
        assert_eq!(readiness.is_ready(), ready);
        assert_eq!(readiness.first_reason(), reason);
    }

    #[test]
    fn verdicts() {
        check(vec![Check::pass("store")], true, None);
        check(
            vec![Check::pass("store"), Check::fail("shutdown", "draining")],
            false,
            Some("draining"),
        );
        check(
            vec![
                Check::fail("store", "store_unreachable"),
                Check::fail("shutdown", "draining"),
            ],
            false,
            Some("store_unreachable"),
        );
        check(vec![], false, Some("no_checks"));
    }
}
