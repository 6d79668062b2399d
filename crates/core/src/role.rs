//! The roles one `caracal` process can run, with their default ports and metric prefixes.

use std::fmt;
use std::str::FromStr;

/// One of the six roles of DESIGN.md section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Api,
    Console,
    Coordinator,
    Sts,
    Gateway,
    Audit,
}

impl Role {
    /// Every role, in the order `caracal up` starts them and `caracal status` lists them.
    pub const ALL: [Role; 6] = [
        Role::Api,
        Role::Console,
        Role::Coordinator,
        Role::Sts,
        Role::Gateway,
        Role::Audit,
    ];

    /// The lower-case name used on the command line, in config keys and in metric names.
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Console => "console",
            Role::Coordinator => "coordinator",
            Role::Sts => "sts",
            Role::Gateway => "gateway",
            Role::Audit => "audit",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Role::Api => 3000,
            Role::Console => 3001,
            Role::Coordinator => 4000,
            Role::Sts => 8080,
            Role::Gateway => 8081,
            Role::Audit => 8082,
        }
    }

    /// Prefix of every metric this role exposes: `caracal_<role>_`.
    pub fn metric_prefix(self) -> String {
        format!("caracal_{}", self.name())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}` (accepted: api, console, coordinator, sts, gateway, audit)")]
pub struct UnknownRoleError(pub String);

impl FromStr for Role {
    type Err = UnknownRoleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.name() == text)
            .ok_or_else(|| UnknownRoleError(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_ports_are_the_documented_ones() {
        let ports: Vec<(String, u16)> = Role::ALL
            .iter()
            .map(|role| {
                (
                    role.name().parse::<Role>().unwrap().to_string(),
                    role.default_port(),
                )
            })
            .collect();
        let expected = [
            ("api", 3000),
            ("console", 3001),
            ("coordinator", 4000),
            ("sts", 8080),
            ("gateway", 8081),
            ("audit", 8082),
        ];
        let expected: Vec<(String, u16)> = expected
            .iter()
            .map(|(name, port)| (name.to_string(), *port))
            .collect();
        assert_eq!(ports, expected);
    }

    #[test]
    fn unknown_role_names_the_accepted_values() {
        let error = "gatway".parse::<Role>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown role `gatway` (accepted: api, console, coordinator, sts, gateway, audit)"
        );
    }
}
