//! Checking and compiling data documents, and merging a set's documents into a bundle.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The only rules a data document may define.
pub const ALLOWED_RULES: [&str; 6] = [
    "app_ids",
    "grants",
    "confinement",
    "restrict",
    "risk",
    "approval_tiers",
];
/// Largest document accepted, in bytes.
pub const MAX_DOCUMENT: usize = 262_144;
/// Deepest nesting of brackets accepted: data documents are shallow, and the Rego parser
/// recurses (a deeply nested document would exhaust the stack or the CPU).
pub const MAX_NESTING: usize = 12;
/// Longest a document's evaluation may take.
const EVALUATION_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);
/// The input and data schema these documents are written against.
pub const SCHEMA_VERSION: &str = "2026-05-20";
const HEADER: &str = "# caracal:data-document";
const PACKAGE: &str = "data.caracal.authz";
/// Built-ins a data document may not call: they reach outside or make results vary.
const FORBIDDEN: [&str; 6] = [
    "http.send",
    "net.lookup_ip_addr",
    "net.cidr_",
    "opa.runtime",
    "rand.intn",
    "time.now_ns",
];

/// One reason a document is refused: a stable code and what the checker or compiler said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub code: String,
    pub message: String,
}

fn diagnostic(code: &str, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// A checked document: each rule it defines, evaluated to JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataDocument {
    pub rules: BTreeMap<String, Value>,
}

/// Checks a document and evaluates its rules with regorus. Refusals list every diagnostic.
pub fn compile(content: &str) -> Result<DataDocument, Vec<Diagnostic>> {
    if content.len() > MAX_DOCUMENT {
        return Err(vec![diagnostic(
            "document_too_large",
            format!("documents are at most {MAX_DOCUMENT} bytes"),
        )]);
    }
    if nesting(content) > MAX_NESTING {
        return Err(vec![diagnostic(
            "too_deeply_nested",
            format!("brackets nest at most {MAX_NESTING} deep"),
        )]);
    }
    let mut problems = Vec::new();
    if content.lines().map(str::trim).find(|line| !line.is_empty()) != Some(HEADER) {
        problems.push(diagnostic(
            "missing_data_document_header",
            format!("the first line must be `{HEADER}`"),
        ));
    }
    for builtin in FORBIDDEN {
        if content.contains(builtin) {
            problems.push(diagnostic(
                "forbidden_builtin",
                format!("`{builtin}` may not be used in a data document"),
            ));
        }
    }
    if mentions_input(content) {
        problems.push(diagnostic(
            "input_not_allowed",
            "a data document defines data; it may not read `input`",
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let rules = evaluate(content)?;
    check_rules(&rules)?;
    Ok(DataDocument { rules })
}

/// The deepest bracket nesting outside strings and comments (an unbalanced close counts as
/// nothing: the parser reports it).
fn nesting(content: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = None;
    let mut escaped = false;
    let mut in_comment = false;
    for character in content.chars() {
        if in_comment {
            in_comment = character != '\n';
            continue;
        }
        if let Some(quote) = in_string {
            if escaped {
                escaped = false;
            } else if character == '\\' && quote == '"' {
                escaped = true;
            } else if character == quote {
                in_string = None;
            }
            continue;
        }
        match character {
            '"' | '`' => in_string = Some(character),
            '#' => in_comment = true,
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Whether `input` appears as an identifier (not inside a longer word).
fn mentions_input(content: &str) -> bool {
    let bytes = content.as_bytes();
    content.match_indices("input").any(|(at, _)| {
        let before = at.checked_sub(1).and_then(|i| bytes.get(i)).copied();
        let after = bytes.get(at + 5).copied();
        let word = |byte: Option<u8>| byte.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        !word(before) && !word(after)
    })
}

fn evaluate(content: &str) -> Result<BTreeMap<String, Value>, Vec<Diagnostic>> {
    let compile_error =
        |error: &dyn std::fmt::Display| vec![diagnostic("compile_error", error.to_string())];
    let mut engine = regorus::Engine::new();
    // Evaluating a document is bounded in time: a pathological one is refused, never a hang.
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: EVALUATION_LIMIT,
        check_interval: std::num::NonZeroU32::MIN,
    });
    let package = engine
        .add_policy("document.rego".to_owned(), content.to_owned())
        .map_err(|error| compile_error(&error))?;
    if package != PACKAGE {
        return Err(vec![diagnostic(
            "wrong_package",
            format!(
                "the package must be `caracal.authz`, not `{}`",
                package.trim_start_matches("data.")
            ),
        )]);
    }
    let results = engine
        .eval_query(PACKAGE.to_owned(), false)
        .map_err(|error| compile_error(&error))?;
    let value = results
        .result
        .first()
        .and_then(|result| result.expressions.first())
        .map(|expression| expression.value.clone());
    let Some(value) = value else {
        return Err(vec![diagnostic("no_rules", "the document defines no rule")]);
    };
    let json = value.to_json_str().map_err(|error| compile_error(&error))?;
    let rules: BTreeMap<String, Value> =
        serde_json::from_str(&json).map_err(|error| compile_error(&error))?;
    if rules.is_empty() {
        return Err(vec![diagnostic("no_rules", "the document defines no rule")]);
    }
    Ok(rules)
}

fn check_rules(rules: &BTreeMap<String, Value>) -> Result<(), Vec<Diagnostic>> {
    let mut problems = Vec::new();
    for (name, value) in rules {
        if !ALLOWED_RULES.contains(&name.as_str()) {
            problems.push(diagnostic(
                "rule_not_allowed",
                format!("`{name}` is not one of {}", ALLOWED_RULES.join(", ")),
            ));
            continue;
        }
        if let Err(message) = check_shape(name, value) {
            problems.push(diagnostic(&format!("malformed_{name}"), message));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn strings(value: &Value) -> bool {
    value
        .as_array()
        .is_some_and(|items| items.iter().all(Value::is_string))
}

/// A field of a record rule, and how its value is checked.
type FieldCheck = (&'static str, fn(&Value) -> bool);

fn check_shape(name: &str, value: &Value) -> Result<(), String> {
    let object_of = |value: &Value, check: &dyn Fn(&Value) -> bool| {
        value.as_object().is_some_and(|map| map.values().all(check))
    };
    let records = |value: &Value, fields: &[FieldCheck]| {
        value.as_array().is_some_and(|items| {
            items.iter().all(|item| {
                fields
                    .iter()
                    .all(|(field, check)| item.get(field).is_some_and(check))
            })
        })
    };
    let ok = match name {
        "app_ids" => object_of(value, &Value::is_string),
        "grants" => object_of(value, &|grant| {
            grant.get("application").is_some_and(Value::is_string)
                && grant
                    .get("roles")
                    .is_some_and(|roles| object_of(roles, &strings))
        }),
        "confinement" => records(
            value,
            &[("label_prefix", Value::is_string), ("scopes", strings)],
        ),
        "restrict" => strings(value),
        "risk" => records(
            value,
            &[("scope", Value::is_string), ("tier", Value::is_string)],
        ),
        "approval_tiers" => records(
            value,
            &[
                ("tier", Value::is_string),
                ("approver", Value::is_string),
                ("ttl_seconds", Value::is_u64),
            ],
        ),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` does not have the documented shape"))
    }
}

/// The merged data of a policy set version: what the decision contract reads.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Bundle {
    pub app_ids: BTreeMap<String, String>,
    pub grants: BTreeMap<String, Grant>,
    pub confinement: Vec<Confinement>,
    pub restrict: Vec<String>,
    pub risk: Vec<Risk>,
    pub approval_tiers: Vec<ApprovalTier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub application: String,
    pub roles: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    pub label_prefix: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Risk {
    pub scope: String,
    pub tier: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalTier {
    pub tier: String,
    pub approver: String,
    pub ttl_seconds: u64,
    #[serde(default)]
    pub privacy: Option<String>,
}

impl Bundle {
    /// Merges checked documents. Two documents defining the same application key or resource
    /// differently is a conflict, not a silent override.
    pub fn merge(documents: &[DataDocument]) -> Result<Bundle, Vec<Diagnostic>> {
        let mut bundle = Bundle::default();
        let mut problems = Vec::new();
        for document in documents {
            for (name, value) in &document.rules {
                let merged = match name.as_str() {
                    "app_ids" => merge_map(&mut bundle.app_ids, value, name),
                    "grants" => merge_map(&mut bundle.grants, value, name),
                    "confinement" => extend(&mut bundle.confinement, value),
                    "restrict" => extend(&mut bundle.restrict, value),
                    "risk" => extend(&mut bundle.risk, value),
                    "approval_tiers" => extend(&mut bundle.approval_tiers, value),
                    _ => Err(format!("`{name}` is not allowed")),
                };
                if let Err(message) = merged {
                    problems.push(diagnostic("conflicting_definition", message));
                }
            }
        }
        if problems.is_empty() {
            Ok(bundle)
        } else {
            Err(problems)
        }
    }
}

fn merge_map<T: serde::de::DeserializeOwned + PartialEq>(
    into: &mut BTreeMap<String, T>,
    value: &Value,
    rule: &str,
) -> Result<(), String> {
    let map: BTreeMap<String, T> =
        serde_json::from_value(value.clone()).map_err(|error| format!("`{rule}`: {error}"))?;
    for (key, item) in map {
        match into.get(&key) {
            Some(existing) if *existing != item => {
                return Err(format!(
                    "`{rule}.{key}` is defined differently by two documents"
                ));
            }
            _ => {
                into.insert(key, item);
            }
        }
    }
    Ok(())
}

fn extend<T: serde::de::DeserializeOwned>(into: &mut Vec<T>, value: &Value) -> Result<(), String> {
    let items: Vec<T> = serde_json::from_value(value.clone()).map_err(|error| error.to_string())?;
    into.extend(items);
    Ok(())
}
