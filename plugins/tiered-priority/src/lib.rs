//! `tiered-priority`: a prioritizer for cllm (world `prioritizer`).
//!
//! A request's queue priority (higher runs first) is the first of these that applies:
//!
//! 1. the value of its tier header (`x-tier` unless configured otherwise) looked up in
//!    `tiers` (names compared ignoring ASCII case, surrounding spaces trimmed);
//! 2. the longest key of `prefixes` that its `client-id` starts with;
//! 3. the priority the request asked for itself (`requested-priority`);
//! 4. `default`.
//!
//! The server forwards only the headers its config lists, so list the tier header there.
//!
//! # Config (sidecar `tiered_priority.json`)
//!
//! | key        | default    | meaning                                           |
//! |------------|------------|---------------------------------------------------|
//! | `header`   | `"x-tier"` | header holding the tier name (lower-case)          |
//! | `tiers`    | `{}`       | tier name → priority                              |
//! | `prefixes` | `{}`       | client-id prefix → priority                        |
//! | `default`  | `0`        | priority when nothing else applies                |
//!
//! Example:
//! `{"tiers": {"gold": 100, "silver": 50, "bronze": 0}, "prefixes": {"vip-": 80, "batch-": -10}, "default": 0}`.
//! The config is read once, on the first call. Invalid JSON or unknown keys are logged as an
//! error and the defaults are used.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use cllm::policy::host::{self, LogLevel};
use cllm::policy::types::RequestInfo;
use exports::cllm::policy::priority::Guest;
use serde::Deserialize;

wit_bindgen::generate!({ path: "../../wit/policy.wit", world: "prioritizer" });

/// The plugin's settings, from its sidecar JSON.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// Name of the header holding the tier.
    header: String,
    /// Tier name → priority.
    tiers: BTreeMap<String, i32>,
    /// Client-id prefix → priority.
    prefixes: BTreeMap<String, i32>,
    /// Priority when no rule matches and the request asked for none.
    default: i32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: "x-tier".to_owned(),
            tiers: BTreeMap::new(),
            prefixes: BTreeMap::new(),
            default: 0,
        }
    }
}

impl Config {
    /// Parses the config JSON (empty text means the defaults) and normalizes the header and
    /// tier names.
    fn parse(text: &str) -> Result<Config, serde_json::Error> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let mut config: Config = serde_json::from_str(text)?;
        config.header.make_ascii_lowercase();
        config.tiers = config
            .tiers
            .into_iter()
            .map(|(name, p)| (name.trim().to_ascii_lowercase(), p))
            .collect();
        Ok(config)
    }

    /// Reads the config from the host, falling back to the defaults (with an error logged)
    /// when it is not valid.
    fn load() -> Config {
        Config::parse(&host::config()).unwrap_or_else(|err| {
            host::log(
                LogLevel::Error,
                &format!("bad config ({err}); using the defaults"),
            );
            Config::default()
        })
    }

    /// The priority for `request`, by the rules in the crate doc.
    fn priority(&self, request: &RequestInfo) -> i32 {
        let tier = request
            .headers
            .iter()
            .find(|(name, _)| *name == self.header)
            .and_then(|(_, value)| self.tiers.get(&value.trim().to_ascii_lowercase()));
        let prefix = self
            .prefixes
            .iter()
            .filter(|(prefix, _)| request.client_id.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, p)| p);
        tier.or(prefix)
            .copied()
            .or(request.requested_priority)
            .unwrap_or(self.default)
    }
}

/// The config, read on the first call.
static CONFIG: OnceLock<Config> = OnceLock::new();

/// The exported `priority` interface.
struct TieredPriority;

impl Guest for TieredPriority {
    fn priority(request: RequestInfo) -> i32 {
        CONFIG.get_or_init(Config::load).priority(&request)
    }
}

export!(TieredPriority);

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client: &str, tier: Option<&str>, requested: Option<i32>) -> RequestInfo {
        RequestInfo {
            request_id: "r".into(),
            client_id: client.into(),
            endpoint: "/generate".into(),
            prompt_tokens: 1,
            max_new_tokens: 1,
            requested_priority: requested,
            headers: tier
                .map(|t| vec![("x-tier".to_owned(), t.to_owned())])
                .unwrap_or_default(),
        }
    }

    #[test]
    fn rules_in_order() {
        let config = Config::parse(
            r#"{"tiers": {"Gold": 100, "silver": 50}, "prefixes": {"vip-": 80, "vip-team-": 90, "batch-": -10}, "default": 7}"#,
        )
        .unwrap();
        let p = |client, tier, requested| config.priority(&request(client, tier, requested));
        assert_eq!(p("vip-1", Some(" gold "), Some(3)), 100);
        assert_eq!(p("vip-1", Some("platinum"), Some(3)), 80);
        assert_eq!(p("vip-team-1", None, None), 90);
        assert_eq!(p("batch-9", None, Some(3)), -10);
        assert_eq!(p("alice", None, Some(3)), 3);
        assert_eq!(p("alice", None, None), 7);
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(Config::parse(r#"{"tier": {}}"#).is_err());
        assert!(Config::parse(r#"{"tiers": {"gold": "high"}}"#).is_err());
        assert_eq!(Config::parse(" ").unwrap().header, "x-tier");
    }
}
