//! The audit event as producers send it, and its canonical content encoding.

use serde::{Deserialize, Serialize};

/// One audit event. The JSON keys are the reference's wire contract (`*_json` documents,
/// `occurred_at`), except that time travels as milliseconds since the epoch in
/// `occurred_at_ms` beside the RFC 3339 text, so hashing never depends on date parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub zone_id: String,
    pub event_type: String,
    pub request_id: String,
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_set_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_set_version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha: Option<String>,
    pub evaluation_status: String,
    #[serde(default = "empty_list")]
    pub determining_policies_json: serde_json::Value,
    #[serde(default = "empty_list")]
    pub diagnostics_json: serde_json::Value,
    #[serde(default = "empty_object")]
    pub metadata_json: serde_json::Value,
    pub occurred_at_ms: i64,
}

fn empty_list() -> serde_json::Value {
    serde_json::Value::Array(Vec::new())
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("audit event is not valid JSON: {0}")]
    Json(String),
    #[error("audit event field `{0}` is empty")]
    Empty(&'static str),
    #[error("audit event field `{0}` is longer than {1} bytes")]
    TooLong(&'static str, usize),
}

/// Bounds that keep one event from dominating a batch or the store.
const MAX_FIELD: usize = 512;
const MAX_DOCUMENTS: usize = 64 * 1024;

impl Event {
    /// Parses and checks an event from the bytes a producer sent.
    pub fn parse(data: &[u8]) -> Result<Event, EventError> {
        let event: Event =
            serde_json::from_slice(data).map_err(|error| EventError::Json(error.to_string()))?;
        event.check()?;
        Ok(event)
    }

    /// Parses, checks and canonicalises in one pass: what ingestion needs, with the documents
    /// canonicalised once rather than once to check and again to hash.
    pub fn parse_content(data: &[u8]) -> Result<Content, EventError> {
        let event: Event =
            serde_json::from_slice(data).map_err(|error| EventError::Json(error.to_string()))?;
        event.checked_content()
    }

    pub fn check(&self) -> Result<(), EventError> {
        self.checked_content().map(|_| ())
    }

    /// The event's content, if every field is within its bounds.
    pub fn checked_content(&self) -> Result<Content, EventError> {
        for (name, value) in [
            ("id", &self.id),
            ("zone_id", &self.zone_id),
            ("event_type", &self.event_type),
            ("request_id", &self.request_id),
            ("decision", &self.decision),
            ("evaluation_status", &self.evaluation_status),
        ] {
            if value.is_empty() {
                return Err(EventError::Empty(name));
            }
            if value.len() > MAX_FIELD {
                return Err(EventError::TooLong(name, MAX_FIELD));
            }
        }
        let content = self.content();
        let documents = [
            &content.determining_policies,
            &content.diagnostics,
            &content.metadata,
        ];
        if documents
            .iter()
            .map(|document| document.len())
            .sum::<usize>()
            > MAX_DOCUMENTS
        {
            return Err(EventError::TooLong("*_json", MAX_DOCUMENTS));
        }
        Ok(content)
    }

    /// The three JSON documents in canonical form: keys sorted, no insignificant whitespace
    /// (what `serde_json` prints for a `Value`), the NUL character removed from every string
    /// and key so no backend can refuse or alter a stored row.
    pub fn canonical_documents(&self) -> [String; 3] {
        [
            canonical_json(&self.determining_policies_json),
            canonical_json(&self.diagnostics_json),
            canonical_json(&self.metadata_json),
        ]
    }

    /// The hashed fields in their canonical text form.
    pub fn content(&self) -> Content {
        let [determining_policies, diagnostics, metadata] = self.canonical_documents();
        Content {
            id: self.id.clone(),
            zone_id: self.zone_id.clone(),
            event_type: self.event_type.clone(),
            request_id: self.request_id.clone(),
            decision: self.decision.clone(),
            policy_set_id: self.policy_set_id.clone().unwrap_or_default(),
            policy_set_version_id: self.policy_set_version_id.clone().unwrap_or_default(),
            manifest_sha: self.manifest_sha.clone().unwrap_or_default(),
            evaluation_status: self.evaluation_status.clone(),
            determining_policies,
            diagnostics,
            metadata,
            occurred_at_ms: self.occurred_at_ms,
        }
    }

    /// The bytes of the content hash, specified in ARCHITECTURE.md ("Audit chain encoding").
    pub fn content_bytes(&self) -> Vec<u8> {
        self.content().bytes()
    }
}

/// The hashed fields of an event as text: what the ledger stores, and all a verifier needs.
/// Absent optional fields are empty; documents are canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub id: String,
    pub zone_id: String,
    pub event_type: String,
    pub request_id: String,
    pub decision: String,
    pub policy_set_id: String,
    pub policy_set_version_id: String,
    pub manifest_sha: String,
    pub evaluation_status: String,
    pub determining_policies: String,
    pub diagnostics: String,
    pub metadata: String,
    pub occurred_at_ms: i64,
}

impl Content {
    /// The content bytes (ARCHITECTURE.md, "Audit chain encoding"). Stored documents are hashed
    /// as stored: a document rewritten into another form, even an equivalent one, no longer
    /// matches its hash.
    pub fn bytes(&self) -> Vec<u8> {
        let occurred = self.occurred_at_ms.to_string();
        let fields: [&str; 13] = [
            &self.id,
            &self.zone_id,
            &self.event_type,
            &self.request_id,
            &self.decision,
            &self.policy_set_id,
            &self.policy_set_version_id,
            &self.manifest_sha,
            &self.evaluation_status,
            &self.determining_policies,
            &self.diagnostics,
            &self.metadata,
            &occurred,
        ];
        let mut bytes =
            Vec::with_capacity(32 + fields.iter().map(|field| field.len() + 4).sum::<usize>());
        bytes.extend_from_slice(b"caracal-audit-event-v1\n");
        for field in fields {
            let field = strip_nul(field);
            bytes.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
            bytes.extend_from_slice(field.as_bytes());
        }
        bytes
    }
}

fn strip_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', ""))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

fn without_nul(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::String(text) => serde_json::Value::String(text.replace('\0', "")),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(without_nul).collect())
        }
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .map(|(key, value)| (key.replace('\0', ""), without_nul(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `value` printed with sorted keys and no whitespace.
pub fn canonical_json(value: &serde_json::Value) -> String {
    // serde_json's map is ordered by key (the `preserve_order` feature is off), so printing a
    // `Value` is canonical.
    serde_json::to_string(&without_nul(value)).unwrap_or_else(|_| "null".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Event {
        Event::parse(
            br#"{"id":"ev-1","zone_id":"zone-1","event_type":"token.exchange","request_id":"req-1",
                 "decision":"allow","evaluation_status":"complete",
                 "determining_policies_json":[{"id":"baseline"}],"diagnostics_json":[],
                 "metadata_json":{"b":1,"a":"x"},"occurred_at_ms":1760000000000}"#,
        )
        .unwrap()
    }

    #[test]
    fn canonical_documents_sort_keys_and_drop_whitespace_and_nul() {
        let mut event = sample();
        assert_eq!(event.canonical_documents()[2], r#"{"a":"x","b":1}"#);
        event.metadata_json = serde_json::json!({"k\u{0}ey": ["a\u{0}b", {"z": 1, "y": 2}]});
        assert_eq!(
            event.canonical_documents()[2],
            r#"{"key":["ab",{"y":2,"z":1}]}"#
        );
    }

    #[test]
    fn the_content_encoding_is_length_prefixed_so_fields_cannot_run_together() {
        let mut left = sample();
        let mut right = sample();
        left.event_type = "ab".into();
        left.request_id = "c".into();
        right.event_type = "a".into();
        right.request_id = "bc".into();
        assert_ne!(left.content_bytes(), right.content_bytes());
        assert!(
            sample()
                .content_bytes()
                .starts_with(b"caracal-audit-event-v1\n\x00\x00\x00\x04ev-1")
        );
    }

    #[test]
    fn bad_events_are_refused_with_the_field_named() {
        assert!(matches!(Event::parse(b"{"), Err(EventError::Json(_))));
        assert!(matches!(
            Event::parse(br#"{"id":"x"}"#),
            Err(EventError::Json(_))
        ));
        let mut event = sample();
        event.zone_id.clear();
        assert_eq!(event.check(), Err(EventError::Empty("zone_id")));
        event = sample();
        event.request_id = "r".repeat(513);
        assert_eq!(event.check(), Err(EventError::TooLong("request_id", 512)));
    }
}
